"""representation=nerf: a hash-grid radiance field rendered by volume rendering (nerfstudio parts).

Sampling: stratified uniform samples between the entry and exit of the scene ball, optionally
followed by importance samples (nerfstudio's PDFSampler on the no-grad coarse weights). Proposal
networks (nerfacto) are not used: they need their own interlevel loss and extra field passes, and
on CPU the cost is the field evaluations: one 32² view, forward+backward, 1 thread, took ~215 ms with
64 uniform samples, ~110 ms with 32, and ~580 ms with 32 uniform + 32 importance samples (a coarse
pass plus 65 fine samples), so uniform sampling is the default.

Learning rates: per group as threestudio's prolificdreamer/magic3d configs (encoding 0.01,
networks 0.001, background 0.001). `trainer.lr` is ignored unless `use_trainer_lr=true`, which
scales every group so that the encoding gets trainer.lr and the others keep their ratios.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dsd.cameras import Cameras, camera_rays, orbit_cameras
from dsd.config import RepresentationConfig
from dsd.errors import UserError
from dsd.registry import register
from dsd.representations.base import Representation, fit_renders
from dsd.representations.nerf_field import (
    NerfField,
    resolve_implementation,
    sphere_near_far,
    stratified_samples,
)


@dataclass
class NerfConfig(RepresentationConfig):
    name: str = "nerf"
    implementation: str = "auto"  # auto (tcnn on CUDA when importable) | torch | tcnn
    bound: float = 1.0  # the scene is the ball of this radius; the hash grid covers its cube
    # hash grid sized for CPU (threestudio: 16 levels, 2^19 entries, max res ≥ 2048)
    num_levels: int = 8
    min_res: int = 16
    max_res: int = 256
    log2_hashmap_size: int = 16
    features_per_level: int = 2
    hidden_dim: int = 32
    num_layers: int = 2  # nerfstudio MLP layers (2 = one hidden layer, as threestudio's density net)
    geo_feat_dim: int = 15
    # initial soft sphere, threestudio "blob_magic3d" (dreamfusion-sd.yaml: scale 10, std 0.5)
    blob_density: float = 10.0
    blob_radius: float = 0.5
    # sampling
    num_samples: int = 64  # stratified samples per ray
    num_importance_samples: int = 0  # extra PDF samples from a no-grad coarse pass (0: off)
    eval_chunk_rays: int = 8192  # rays per chunk when rendering without gradients
    eval_occupancy_res: int = 64  # no-grad renders skip samples in empty cells of this lattice (0: off)
    eval_cull_density: float = 0.01  # "empty": density below this in a cell and its neighbours
    stratified: bool = True  # jitter samples while training (from this representation's own generator)
    sample_seed: int = 0
    # background: a fixed colour or threestudio's neural environment map (MLP of the view direction)
    background: str = "color"  # color | mlp
    background_color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # coarse-to-fine render resolution: resolutions[k] from step resolution_milestones[k-1] on
    # (threestudio's resolution_milestones); resolutions=[] defers to camera.resolution (None)
    resolutions: list[int] = field(default_factory=lambda: [32, 64])
    resolution_milestones: list[int] = field(default_factory=lambda: [5000])
    # optimizer (threestudio prolificdreamer.yaml: encoding 0.01, networks 0.001, background 0.001)
    lr_encoding: float = 0.01
    lr_network: float = 0.001
    lr_background: float = 0.001
    use_trainer_lr: bool = False
    # Regularizer weights: a number, or threestudio's ramp [start_step, start_value, end_value,
    # end_step] (see `ramp_at`). Defaults: threestudio dreamfusion-sd.yaml:86-88 (orient
    # [0, 10, 1000, 5000], sparsity 1, opaque 0); z-variance (HiFA) and convexity (DSD's
    # configs/dsd.yaml) off. A weight of 0 at a step skips its work; orient and convexity need
    # normals, which triple the CPU cost of a step (lambda_orient=0 turns them off).
    lambda_orient: Any = field(default_factory=lambda: [0, 10.0, 1000.0, 5000])
    lambda_sparsity: Any = 1.0
    lambda_opaque: Any = 0.0
    lambda_z_variance: Any = 0.0
    lambda_convex: Any = 0.0
    convexity_res: int = 8  # normal map size of the convexity loss (DSD threestudio/systems/dsd.py:16)
    # evaluation camera (final_image / initialize_to without cameras)
    eval_elevation_deg: float = 15.0
    eval_distance: float = 2.0
    eval_fovy_deg: float = 50.0  # as camera.eval_fovy
    eval_resolution: int = 64
    init_fit_steps: int = 100
    # mesh export: marching cubes of the density
    mesh_resolution: int = 128
    mesh_threshold: float = 1.0  # with the init blob the isosurface sits at r ≈ 0.47


LAMBDAS = ("lambda_orient", "lambda_sparsity", "lambda_opaque", "lambda_z_variance", "lambda_convex")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_weight(value) -> bool:
    """A weight >= 0, or a ramp [start_step, start_value, end_value, end_step] with start_step <
    end_step and both values >= 0."""
    if _is_number(value):
        return value >= 0
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
        return False
    start_step, start_value, end_value, end_step = value
    return start_step < end_step and start_value >= 0 and end_value >= 0


def ramp_at(value, step: int) -> float:
    """A weight at training `step`: a number as is, or threestudio's ramp [start_step, start_value,
    end_value, end_step] (its `C`, threestudio/utils/misc.py:66-96 in the DSD repo): start_value up
    to start_step, linear to end_value at end_step, end_value after."""
    if _is_number(value):
        return float(value)
    start_step, start_value, end_value, end_step = (float(v) for v in value)
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start_value + (end_value - start_value) * progress


def depth_variance(weights: Tensor, depths: Tensor, opacity: Tensor) -> Tensor:
    """Per ray (N, 1): variance of the sample depths (N, S, 1) under the ray's weights (N, S, 1)
    normalized by its opacity (N, 1), i.e. how spread out along the ray the surface is (HiFA's
    z-variance, as threestudio's nerf_volume_renderer.py:334-349)."""
    w = weights / opacity.clamp_min(1e-5)[:, None]
    mean = (w * depths).sum(-2, keepdim=True)
    return (w * (depths - mean) ** 2).sum(-2)


def convexity_loss(normal_map: Tensor, res: int) -> Tensor:
    """DSD's "naive convexity loss" (threestudio/systems/dsd.py:85-105 of the DSD repo) of a normal
    map (V, H, W, 3) encoded as threestudio's comp_normal: (n̂ + 1)/2 · opacity, world-space n̂.
    The map is resized to res × res (bilinear); for each pair of horizontal neighbours (left,
    right) and vertical ones (lower, upper) it takes the z component of their cross product, a
    sine of the turn between them, and returns −(mean horizontal + mean vertical): negative when
    normals turn the way a convex surface's do, zero for a flat map. Like the original it works on
    the encoded world normals, so it is not invariant to the camera's azimuth."""
    small = torch.nn.functional.interpolate(normal_map.permute(0, 3, 1, 2), size=(res, res), mode="bilinear",
                                            align_corners=False).permute(0, 2, 3, 1)

    def cross_z(a: Tensor, b: Tensor) -> Tensor:
        return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]

    horizontal = cross_z(small[:, :, :-1], small[:, :, 1:])  # left × right
    vertical = cross_z(small[:, 1:], small[:, :-1])  # lower × upper (row 0 is the top)
    return -(horizontal.mean() + vertical.mean())


# Peak memory of one training step on CPU (normals on, as at step 0 of the defaults): about 1 GiB
# once per step, plus per ray sample of every seed a part for the MLPs and the autograd graph and
# a part per hash-grid feature (levels x features per level). Fitted to the step's share of
# ru_maxrss at the defaults (8 x 2 features; 1 and 2 seeds at 64 and 128 px: 1.68, 2.37, 3.88,
# 6.76 GiB) and a 16 x 2 grid with 2^19 entries (64 px: 1.91, 3.07 GiB) (benchmarks/
# cpu_defaults.py --only memory, docs/benchmarks.md). The MLP width was not varied.
STEP_FIXED_BYTES = 1.0 * 2**30
STEP_BYTES_PER_SAMPLE = 1000.0
STEP_BYTES_PER_SAMPLE_FEATURE = 120.0


def step_memory_bytes(cfg: NerfConfig, size: int, views: int, seeds: int = 1) -> float:
    """Estimated peak bytes of one training step of `seeds` seeds at `size`² px and `views` views each."""
    samples = seeds * views * size * size * (cfg.num_samples + cfg.num_importance_samples)
    per_sample = STEP_BYTES_PER_SAMPLE + STEP_BYTES_PER_SAMPLE_FEATURE * cfg.num_levels * cfg.features_per_level
    return STEP_FIXED_BYTES + samples * per_sample


def require_nerfstudio() -> None:
    """nerfstudio is imported only when a NeRF is built (2D and Gaussian runs work without it)."""
    try:
        import nerfstudio  # noqa: F401
    except ImportError:
        raise UserError(
            "representation=nerf needs nerfstudio, which is not installed; `make install` installs it "
            "(pip install --no-deps nerfstudio==1.1.5 after the project: its own pins would pull an old gsplat), "
            "or use representation=gaussians or representation=image."
        ) from None


def validate(cfg: NerfConfig) -> None:
    def bad(key: str, value, accepted: str) -> UserError:
        return UserError(f"representation.{key}={value!r} is not accepted; {accepted}.")

    for key in LAMBDAS:
        if not is_weight(getattr(cfg, key)):
            raise bad(key, getattr(cfg, key), "give a weight >= 0 or a ramp [start_step, start_value, end_value, "
                      "end_step] with start_step < end_step and weights >= 0")
    if cfg.convexity_res < 2:
        raise bad("convexity_res", cfg.convexity_res, "use >= 2 (pixels of the resized normal map per side)")

    if cfg.implementation not in ("auto", "torch", "tcnn"):
        raise bad("implementation", cfg.implementation, "use auto, torch or tcnn")
    if cfg.background not in ("color", "mlp"):
        raise bad("background", cfg.background, "use color or mlp")
    if len(cfg.background_color) != 3:
        raise bad("background_color", list(cfg.background_color), "give three numbers in [0, 1]")
    if cfg.resolutions and (len(cfg.resolutions) != len(cfg.resolution_milestones) + 1 or min(cfg.resolutions) < 1):
        raise bad("resolutions", list(cfg.resolutions),
                  "give one positive resolution more than resolution_milestones")
    if list(cfg.resolution_milestones) != sorted(cfg.resolution_milestones):
        raise bad("resolution_milestones", list(cfg.resolution_milestones), "give increasing steps")
    if cfg.num_samples < 1 or cfg.num_importance_samples < 0:
        raise bad("num_samples", cfg.num_samples, "use ≥ 1 samples (and ≥ 0 importance samples)")


@register("representation", "nerf", NerfConfig)
class NerfRepresentation(Representation):
    """One hash-grid NeRF per seed, starting from the same soft sphere for every seed."""

    is_3d = True
    step_memory_bytes = staticmethod(step_memory_bytes)  # read by dsd.trainer.resolve_seed_batch

    def __init__(self, cfg: NerfConfig, prior=None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        validate(cfg)
        require_nerfstudio()
        from nerfstudio.model_components.ray_samplers import PDFSampler

        self.cfg = cfg
        self.field = NerfField(
            bound=cfg.bound, num_levels=cfg.num_levels, min_res=cfg.min_res, max_res=cfg.max_res,
            log2_hashmap_size=cfg.log2_hashmap_size, features_per_level=cfg.features_per_level,
            hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers, geo_feat_dim=cfg.geo_feat_dim,
            blob_density=cfg.blob_density, blob_radius=cfg.blob_radius, background_mlp=cfg.background == "mlp",
            implementation=resolve_implementation(cfg.implementation, device),
        )
        self.register_buffer("background_color", torch.tensor(list(cfg.background_color), dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # for the weight ramps; resumes
        self.importance_sampler = PDFSampler(train_stratified=False, include_original=True)
        self.generator = torch.Generator().manual_seed(cfg.sample_seed)
        self._last: dict[str, Tensor] = {}
        self._occupancy: tuple[tuple[int, ...], Tensor] | None = None  # (parameter versions, grid)
        self._last_shape: tuple[int, int, int] = (0, 0, 0)  # (V, H, W) of the last render
        self.to(device)

    # ---- schedules ----------------------------------------------------------------------
    def resolution_at(self, step: int) -> int | None:
        """Render width = height for `step` (coarse→fine); the trainer sizes its cameras with it.
        None when `resolutions` is empty: use camera.resolution."""
        if not self.cfg.resolutions:
            return None
        return int(self.cfg.resolutions[bisect.bisect_right(self.cfg.resolution_milestones, step)])

    def weights_at(self, step: int) -> dict[str, float]:
        """Every regularizer's weight at `step` (names without "lambda_")."""
        return {key.removeprefix("lambda_"): ramp_at(getattr(self.cfg, key), step) for key in LAMBDAS}

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.step.fill_(step + 1)

    def get_extra_state(self) -> dict:
        """The jitter stream goes into checkpoints, so a resumed run samples as an unbroken one."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # ---- rendering ------------------------------------------------------------------------
    def render(self, cameras: Cameras | None = None, with_alpha: bool = False) -> Tensor:
        """Volume-render `cameras` (V views): (V, 3, H, W) in [0, 1] (with alpha, the accumulated
        opacity: (V, 4, H, W)). Keeps what regularizers() needs."""
        if cameras is None:
            cameras = self.eval_cameras()
        V, H, W = len(cameras), cameras.height, cameras.width
        device = self.background_color.device
        c2w = cameras.c2w.to(device)
        cameras = Cameras(c2w, cameras.fovy_deg.to(device), cameras.elevation_deg, cameras.azimuth_deg,
                          cameras.distance, W, H)
        origins, directions = (t.reshape(-1, 3) for t in camera_rays(cameras))  # (N, 3), N = V·H·W
        chunk = len(origins) if torch.is_grad_enabled() else self.cfg.eval_chunk_rays  # bound eval memory
        # the occupancy lattice pays off only when it has fewer points than the samples it culls
        big = len(origins) * self.cfg.num_samples > 4 * self.cfg.eval_occupancy_res**3
        occupied = self.occupancy() if big and not torch.is_grad_enabled() else None
        parts = [self.render_rays(o, d, occupied) for o, d in zip(origins.split(chunk), directions.split(chunk))]
        rgb = torch.cat([p[0] for p in parts])
        self._last = parts[0][1] if len(parts) == 1 else {
            key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1] if key != "orient"}
        self._last_shape = (V, H, W)
        rgb = rgb.reshape(V, H, W, 3).permute(0, 3, 1, 2).clamp(0, 1)
        if not with_alpha:
            return rgb
        alpha = self._last["opacity"].reshape(V, H, W, 1).permute(0, 3, 1, 2)
        return torch.cat([rgb, alpha.clamp(0, 1)], dim=1)

    @torch.no_grad()
    def occupancy(self) -> Tensor | None:
        """(R, R, R) bool: lattice cells whose density (dilated by one cell) reaches eval_cull_density.
        Renders without gradients skip the other samples (nerfacc's occupancy-grid idea, without
        its training-time updates). Kept until a field parameter changes (an optimizer step or a
        load bumps the tensors' in-place version counters), so a turntable's chunks share one."""
        c = self.cfg
        if c.eval_occupancy_res <= 0:
            return None
        version = tuple(p._version for p in self.field.parameters())
        if self._occupancy is not None and self._occupancy[0] == version:
            return self._occupancy[1]
        axis = torch.linspace(-c.bound, c.bound, c.eval_occupancy_res, device=self.background_color.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        density = torch.cat([self.field.density(p)[0] for p in points.split(65536)])
        grid = density.reshape(1, 1, *(c.eval_occupancy_res,) * 3) >= c.eval_cull_density
        occupied = torch.nn.functional.max_pool3d(grid.float(), 3, stride=1, padding=1)[0, 0] > 0
        self._occupancy = (version, occupied)
        return occupied

    def render_rays(self, origins: Tensor, directions: Tensor,
                    occupied: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Rays (N, 3) -> colours (N, 3) and the per-ray quantities the regularizers use.
        With `occupied` (no-grad renders) the field is evaluated only at samples in occupied cells."""
        from nerfstudio.cameras.rays import RayBundle
        from nerfstudio.model_components.renderers import AccumulationRenderer, RGBRenderer

        near, far = sphere_near_far(origins, directions, self.cfg.bound)
        bundle = RayBundle(origins=origins, directions=directions, pixel_area=torch.ones_like(near),
                           nears=near, fars=far)
        jitter = self.generator if (self.training and self.cfg.stratified) else None
        samples = stratified_samples(bundle, self.cfg.num_samples, jitter)
        if self.cfg.num_importance_samples > 0:
            with torch.no_grad():
                coarse, _ = self.field.density(samples.frustums.get_positions())
                samples = self.importance_sampler(bundle, samples, samples.get_weights(coarse),
                                                  num_samples=self.cfg.num_importance_samples)

        weight = self.weights_at(int(self.step))
        need_normals = (weight["orient"] > 0 or weight["convex"] > 0) and torch.is_grad_enabled()
        positions = samples.frustums.get_positions()  # (N, S, 3)
        if need_normals:
            positions.requires_grad_(True)
        if occupied is None:
            density, features = self.field.density(positions)  # (N, S, 1), (N, S, F)
            colors = self.field.rgb(features)  # (N, S, 3)
        else:
            res = occupied.shape[0]
            cell = ((positions / self.cfg.bound + 1) / 2 * (res - 1)).round().long().clamp(0, res - 1)
            keep = occupied[cell[..., 0], cell[..., 1], cell[..., 2]]  # (N, S)
            density = positions.new_zeros(*keep.shape, 1)
            colors = positions.new_zeros(*keep.shape, 3)
            if keep.any():
                density[keep], features = self.field.density(positions[keep])
                colors[keep] = self.field.rgb(features)
        weights = samples.get_weights(density)  # (N, S, 1)
        background = (self.field.background_rgb(directions) if self.field.background is not None
                      else self.background_color)
        rgb = RGBRenderer.combine_rgb(colors, weights, background_color=background)  # (N, 3)
        opacity = AccumulationRenderer.forward(weights)  # (N, 1)

        last = {"opacity": opacity}
        if weight["z_variance"] > 0:
            mid = (samples.frustums.starts + samples.frustums.ends) / 2  # (N, S, 1)
            last["z_variance"] = depth_variance(weights, mid, opacity)  # (N, 1)
        if need_normals:
            # normals = −∇σ / |∇σ| (threestudio "analytic" normals), differentiable for the losses
            (grad,) = torch.autograd.grad(density, positions, torch.ones_like(density), create_graph=True)
            normals = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            facing = (normals * directions[:, None]).sum(-1, keepdim=True).clamp_min(0) ** 2
            # Ref-NeRF orientation loss in threestudio's form: Σ w·max(0, n·d)² / #rays with opacity
            last["orient"] = (weights.detach() * facing).sum() / (opacity > 0).sum().clamp_min(1)
            if weight["convex"] > 0:  # threestudio's comp_normal (nerf_volume_renderer.py:389-398)
                normal = (weights * normals).sum(-2)
                normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                last["normal_map"] = (normal + 1) / 2 * opacity  # (N, 3)
        return rgb, last

    def regularizers(self) -> dict[str, Tensor]:
        """Weighted losses of the last render (threestudio's dreamfusion/magic3d/DSD forms) with the
        weights of the current step; a weight of 0 = absent."""
        last = self._last
        if not last:
            return {}
        weight = self.weights_at(int(self.step))
        opacity = last["opacity"]
        losses = {}
        if "orient" in last and weight["orient"] > 0:
            losses["orient"] = weight["orient"] * last["orient"]
        if weight["sparsity"] > 0:
            losses["sparsity"] = weight["sparsity"] * (opacity**2 + 0.01).sqrt().mean()
        if weight["opaque"] > 0:
            p = opacity.clamp(1e-3, 1 - 1e-3)  # binary entropy of the opacity: pushes it to 0 or 1
            losses["opaque"] = weight["opaque"] * -(p * p.log() + (1 - p) * (1 - p).log()).mean()
        if "z_variance" in last and weight["z_variance"] > 0:
            solid = opacity[:, 0] > 0.5  # only where there is a surface (threestudio's mask)
            zvar = last["z_variance"][solid]
            losses["z_variance"] = weight["z_variance"] * (zvar.mean() if len(zvar) else opacity.sum() * 0)
        if "normal_map" in last and weight["convex"] > 0:
            normal_map = last["normal_map"].reshape(*self._last_shape, 3)
            losses["convex"] = weight["convex"] * convexity_loss(normal_map, self.cfg.convexity_res)
        return losses

    # ---- the rest of the interface ------------------------------------------------------
    def eval_cameras(self, resolution: int | None = None) -> Cameras:
        c = self.cfg
        res = resolution or c.eval_resolution
        one = lambda v: torch.tensor([float(v)])  # noqa: E731
        return orbit_cameras(one(c.eval_elevation_deg), one(0.0), one(c.eval_distance), one(c.eval_fovy_deg),
                             res, res)

    def make_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        from dsd.trainer import make_optimizer

        c = self.cfg
        scale = lr / c.lr_encoding if c.use_trainer_lr else 1.0
        lrs = {"encoding": c.lr_encoding, "network": c.lr_network, "background": c.lr_background}
        groups = [{"params": params, "lr": scale * lrs[key], "name": key}
                  for key, params in self.field.param_groups().items()]
        return make_optimizer(groups, name, scale * c.lr_encoding)

    @torch.no_grad()
    def final_image(self, prior, cameras: Cameras | None = None) -> Tensor:
        cameras = self.eval_cameras() if cameras is None else cameras.rows([0])
        was_training = self.training
        self.eval()
        try:
            image = self.render(cameras)[0]
        finally:
            self.train(was_training)
        return image.permute(1, 2, 0).float().cpu()

    def initialize_to(self, target: Tensor, prior, cameras: Cameras | None = None) -> None:
        pixels = prior.decode(target).clamp(0, 1).float()  # (V, 3, H, W)
        if cameras is None:
            cameras = self.eval_cameras(pixels.shape[-1])
        fit_renders(self, pixels.to(self.background_color.device), cameras, steps=self.cfg.init_fit_steps)

    def export(self, out_dir: Path, prior=None) -> list[Path]:
        from dsd.export_mesh import extract_mesh, write_mesh

        field_ = self.field
        device = self.background_color.device
        inside = lambda p: p.norm(dim=-1) <= self.cfg.bound  # noqa: E731  (what renders can see)
        mesh = extract_mesh(
            density_fn=lambda p: field_.density(p.to(device))[0][..., 0] * inside(p.to(device)),
            color_fn=lambda p: field_.rgb(field_.density(p.to(device))[1]),
            resolution=self.cfg.mesh_resolution, threshold=self.cfg.mesh_threshold, bound=self.cfg.bound,
        )
        if len(mesh.faces) == 0:
            return []
        return write_mesh(mesh, out_dir)
