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

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.model_components.ray_samplers import PDFSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from torch import Tensor

from dsd.cameras import Cameras, orbit_cameras
from dsd.config import RepresentationConfig
from dsd.errors import UserError
from dsd.registry import register
from dsd.representations.base import Representation, fit_renders
from dsd.representations.nerf_field import (
    NerfField,
    camera_rays,
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
    # regularizers (threestudio dreamfusion-sd.yaml: orient ramps 10 -> 1000 over 5000 steps,
    # sparsity 1, opaque 0; z-variance as magic3d/prolificdreamer, off by default). 0 skips the work;
    # lambda_orient=0 turns the orientation ramp off (its normals triple the CPU cost of a step).
    lambda_orient: float = 10.0
    lambda_orient_end: float = 1000.0
    lambda_orient_ramp_steps: int = 5000
    lambda_sparsity: float = 1.0
    lambda_opaque: float = 0.0
    lambda_z_variance: float = 0.0
    # evaluation camera (final_image / initialize_to without cameras)
    eval_elevation_deg: float = 15.0
    eval_distance: float = 2.0
    eval_fovy_deg: float = 50.0  # as camera.eval_fovy
    eval_resolution: int = 64
    init_fit_steps: int = 100
    # mesh export: marching cubes of the density
    mesh_resolution: int = 128
    mesh_threshold: float = 1.0  # with the init blob the isosurface sits at r ≈ 0.47


def validate(cfg: NerfConfig) -> None:
    def bad(key: str, value, accepted: str) -> UserError:
        return UserError(f"representation.{key}={value!r} is not accepted; {accepted}.")

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

    def __init__(self, cfg: NerfConfig, prior=None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.field = NerfField(
            bound=cfg.bound, num_levels=cfg.num_levels, min_res=cfg.min_res, max_res=cfg.max_res,
            log2_hashmap_size=cfg.log2_hashmap_size, features_per_level=cfg.features_per_level,
            hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers, geo_feat_dim=cfg.geo_feat_dim,
            blob_density=cfg.blob_density, blob_radius=cfg.blob_radius, background_mlp=cfg.background == "mlp",
            implementation=resolve_implementation(cfg.implementation, device),
        )
        self.register_buffer("background_color", torch.tensor(list(cfg.background_color), dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # for the orientation ramp; resumes
        self.importance_sampler = PDFSampler(train_stratified=False, include_original=True)
        self.depth_renderer = DepthRenderer(method="expected")
        self.generator = torch.Generator().manual_seed(cfg.sample_seed)
        self._last: dict[str, Tensor] = {}
        self.to(device)

    # ---- schedules ----------------------------------------------------------------------
    def resolution_at(self, step: int) -> int | None:
        """Render width = height for `step` (coarse→fine); the trainer sizes its cameras with it.
        None when `resolutions` is empty: use camera.resolution."""
        if not self.cfg.resolutions:
            return None
        return int(self.cfg.resolutions[bisect.bisect_right(self.cfg.resolution_milestones, step)])

    def lambda_orient_at(self, step: int) -> float:
        c = self.cfg
        if c.lambda_orient == 0:  # one knob turns the whole ramp (and the normals' cost) off
            return 0.0
        frac = min(step / c.lambda_orient_ramp_steps, 1.0) if c.lambda_orient_ramp_steps > 0 else 1.0
        return c.lambda_orient + (c.lambda_orient_end - c.lambda_orient) * frac

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.step.fill_(step + 1)

    def get_extra_state(self) -> dict:
        """The jitter stream goes into checkpoints, so a resumed run samples as an unbroken one."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # ---- rendering ------------------------------------------------------------------------
    def render(self, cameras: Cameras | None = None) -> Tensor:
        """Volume-render `cameras` (V views): (V, 3, H, W) in [0, 1]. Keeps what regularizers() needs."""
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
        return rgb.reshape(V, H, W, 3).permute(0, 3, 1, 2).clamp(0, 1)

    @torch.no_grad()
    def occupancy(self) -> Tensor | None:
        """(R, R, R) bool: lattice cells whose density (dilated by one cell) reaches eval_cull_density.
        Renders without gradients skip the other samples (nerfacc's occupancy-grid idea, without
        its training-time updates: it is recomputed for each no-grad render)."""
        c = self.cfg
        if c.eval_occupancy_res <= 0:
            return None
        axis = torch.linspace(-c.bound, c.bound, c.eval_occupancy_res, device=self.background_color.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        density = torch.cat([self.field.density(p)[0] for p in points.split(65536)])
        grid = density.reshape(1, 1, *(c.eval_occupancy_res,) * 3) >= c.eval_cull_density
        return torch.nn.functional.max_pool3d(grid.float(), 3, stride=1, padding=1)[0, 0] > 0

    def render_rays(self, origins: Tensor, directions: Tensor,
                    occupied: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Rays (N, 3) -> colours (N, 3) and the per-ray quantities the regularizers use.
        With `occupied` (no-grad renders) the field is evaluated only at samples in occupied cells."""
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

        lambda_orient = self.lambda_orient_at(int(self.step))
        need_normals = lambda_orient > 0 and torch.is_grad_enabled()
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
        if self.cfg.lambda_z_variance > 0:
            depth = self.depth_renderer(weights, samples)  # (N, 1)
            mid = (samples.frustums.starts + samples.frustums.ends) / 2  # (N, S, 1)
            last["z_variance"] = (weights * (mid - depth[:, None]) ** 2).sum(-2)  # (N, 1)
        if need_normals:
            # normals = −∇σ / |∇σ| (threestudio "analytic" normals), differentiable for the loss
            (grad,) = torch.autograd.grad(density, positions, torch.ones_like(density), create_graph=True)
            normals = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            facing = (normals * directions[:, None]).sum(-1, keepdim=True).clamp_min(0) ** 2
            # Ref-NeRF orientation loss in threestudio's form: Σ w·max(0, n·d)² / #rays with opacity
            last["orient"] = lambda_orient * (weights.detach() * facing).sum() / (opacity > 0).sum().clamp_min(1)
        return rgb, last

    def regularizers(self) -> dict[str, Tensor]:
        """Weighted losses of the last render (threestudio's dreamfusion/magic3d forms); weight 0 = absent."""
        c, last = self.cfg, self._last
        if not last:
            return {}
        opacity = last["opacity"]
        losses = {}
        if "orient" in last:
            losses["orient"] = last["orient"]
        if c.lambda_sparsity > 0:
            losses["sparsity"] = c.lambda_sparsity * (opacity**2 + 0.01).sqrt().mean()
        if c.lambda_opaque > 0:
            p = opacity.clamp(1e-3, 1 - 1e-3)  # binary entropy of the opacity: pushes it to 0 or 1
            losses["opaque"] = c.lambda_opaque * -(p * p.log() + (1 - p) * (1 - p).log()).mean()
        if c.lambda_z_variance > 0:
            solid = opacity[:, 0] > 0.5
            zvar = last["z_variance"][solid]
            losses["z_variance"] = c.lambda_z_variance * (zvar.mean() if len(zvar) else opacity.sum() * 0)
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
