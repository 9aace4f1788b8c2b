"""The pieces of representation=nerf: rays from our Cameras, the hash-grid field, ray sampling.

Built from nerfstudio components (HashEncoding, MLP, SHEncoding, RayBundle, PDFSampler); the
composition follows nerfstudio's GenerfactoField and threestudio's `implicit-volume` geometry.
The scene is the ball of radius `bound` (samples never leave it), the hash grid covers its cube.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # nerfstudio is imported where a field is built, so 2D runs never need it
    from nerfstudio.cameras.rays import RayBundle, RaySamples


def resolve_implementation(name: str, device: torch.device | str) -> str:
    """auto -> tcnn when tiny-cuda-nn imports and the device is CUDA, else torch."""
    if name != "auto":
        return name
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        return "torch"
    return "tcnn" if torch.device(device).type == "cuda" else "torch"


def sphere_near_far(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry/exit distances (..., 1) of unit-direction rays through the sphere |x| = radius at the
    origin; rays that miss get near = far (zero-length samples, pure background)."""
    b = (origins * directions).sum(-1, keepdim=True)  # t of the closest point is −b
    c = (origins * origins).sum(-1, keepdim=True) - radius**2
    half_chord = (b * b - c).clamp_min(0).sqrt()
    near = (-b - half_chord).clamp_min(0)  # a camera inside the ball starts at its centre
    far = (-b + half_chord).clamp_min(0)
    return near, torch.maximum(far, near)


def stratified_samples(bundle: RayBundle, num_samples: int, generator: torch.Generator | None) -> RaySamples:
    """Uniform bins between near and far, jittered within each bin when `generator` is given
    (nerfstudio's UniformSampler draws from the global RNG; a per-seed generator keeps seeds
    independent of who shares their batch)."""
    n = bundle.origins.shape[0]
    device = bundle.origins.device
    edges = torch.linspace(0.0, 1.0, num_samples + 1, device=device).expand(n, -1)  # (N, S+1)
    if generator is not None:
        mids = 0.5 * (edges[:, 1:] + edges[:, :-1])
        lower = torch.cat([edges[:, :1], mids], -1)
        upper = torch.cat([mids, edges[:, -1:]], -1)
        u = torch.rand(n, num_samples + 1, generator=generator, device=generator.device).to(device)
        edges = lower + (upper - lower) * u
    near, far = bundle.nears, bundle.fars

    def to_euclidean(s: Tensor) -> Tensor:
        return near + s * (far - near)

    t = to_euclidean(edges)
    return bundle.get_ray_samples(
        bin_starts=t[:, :-1, None], bin_ends=t[:, 1:, None],
        spacing_starts=edges[:, :-1, None], spacing_ends=edges[:, 1:, None],
        spacing_to_euclidean_fn=to_euclidean,
    )


class NerfField(nn.Module):
    """Hash grid → small MLP → (density, geometry feature) → albedo MLP; optional background MLP.

    Density = softplus(raw + blob) with threestudio's "blob_magic3d" bias
    blob = blob_density · (1 − |x| / blob_radius) (dreamfusion-sd.yaml: scale 10, std 0.5), so the
    start is a soft sphere; the colour is view-independent (albedo, threestudio's text-to-3D default).
    """

    def __init__(self, bound: float, num_levels: int, min_res: int, max_res: int, log2_hashmap_size: int,
                 features_per_level: int, hidden_dim: int, num_layers: int, geo_feat_dim: int,
                 blob_density: float, blob_radius: float, background_mlp: bool, implementation: str) -> None:
        from nerfstudio.field_components.encodings import HashEncoding, SHEncoding
        from nerfstudio.field_components.mlp import MLP

        super().__init__()
        self.bound, self.geo_feat_dim = bound, geo_feat_dim
        self.blob_density, self.blob_radius = blob_density, blob_radius
        self.encoding = HashEncoding(num_levels=num_levels, min_res=min_res, max_res=max_res,
                                     log2_hashmap_size=log2_hashmap_size, features_per_level=features_per_level,
                                     implementation=implementation)
        self.density_mlp = MLP(in_dim=self.encoding.get_out_dim(), num_layers=num_layers, layer_width=hidden_dim,
                               out_dim=1 + geo_feat_dim, activation=nn.ReLU(), out_activation=None,
                               implementation=implementation)
        self.rgb_mlp = MLP(in_dim=geo_feat_dim, num_layers=num_layers, layer_width=hidden_dim, out_dim=3,
                           activation=nn.ReLU(), out_activation=nn.Sigmoid(), implementation=implementation)
        self.background = None
        if background_mlp:  # threestudio's neural-environment-map-background: colour from the view direction
            self.direction_encoding = SHEncoding(levels=4, implementation=implementation)
            self.background = MLP(in_dim=self.direction_encoding.get_out_dim(), num_layers=2, layer_width=32,
                                  out_dim=3, activation=nn.ReLU(), out_activation=nn.Sigmoid(),
                                  implementation=implementation)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"encoding": list(self.encoding.parameters()),
                  "network": [*self.density_mlp.parameters(), *self.rgb_mlp.parameters()]}
        if self.background is not None:
            groups["background"] = list(self.background.parameters())
        return groups

    def blob(self, positions: Tensor) -> Tensor:
        """Density bias (..., 1) of the initial soft sphere."""
        return self.blob_density * (1 - positions.norm(dim=-1, keepdim=True) / self.blob_radius)

    def density(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (..., 3) in [−bound, bound]³ -> density (..., 1) ≥ 0, features (..., geo_feat_dim)."""
        unit = ((positions / self.bound + 1) / 2).clamp(0, 1)  # the hash grid lives on [0, 1]³
        h = self.density_mlp(self.encoding(unit.reshape(-1, 3))).reshape(*positions.shape[:-1], -1).float()
        raw, features = h.split([1, self.geo_feat_dim], dim=-1)
        return nn.functional.softplus(raw + self.blob(positions)), features

    def rgb(self, features: Tensor) -> Tensor:
        """Albedo (..., 3) in [0, 1] from the geometry features."""
        return self.rgb_mlp(features.reshape(-1, self.geo_feat_dim)).reshape(*features.shape[:-1], 3).float()

    def background_rgb(self, directions: Tensor) -> Tensor:
        """Background colour (..., 3) from unit view directions (..., 3)."""
        assert self.background is not None
        # tcnn's SH encoding takes directions mapped to [0, 1]; the torch one takes unit vectors
        d = (directions + 1) / 2 if self.direction_encoding.tcnn_encoding is not None else directions
        out = self.background(self.direction_encoding(d.reshape(-1, 3)))
        return out.reshape(*directions.shape[:-1], 3).float()


def grid_points(resolution: int, bound: float) -> Tensor:
    """(R, R, R, 3) lattice over [−bound, bound]³, indexed [x, y, z]."""
    axis = torch.linspace(-bound, bound, resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)

