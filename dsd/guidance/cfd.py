"""CFD: Consistent Flow Distillation (Yan et al., ICLR 2025; runjie-yan/ConsistentFlowDistillation
@ec2e289, threestudio/models/guidance/stable_diffusion_unified_guidance.py:623-701):

    grad = w(t)·(ε̂_g(√ᾱ_t·x + √(1−ᾱ_t)·ε̃, t) − ε̃),    w(t) = σ_t/α_t = √(1−ᾱ_t)/√ᾱ_t (:242, :686)

SDS with its fresh noise replaced by ε̃, a noise that is fixed per seed and consistent across
views, and t annealed deterministically (t_scheduler.py:100-143; min = max, so nothing is drawn).

ε̃ (`noise`):
- world_map (default): a fixed per-seed N(0, I) field on the sphere of directions (an
  equi-angular cube map, `map_resolution` cells per face side, the prior's C channels). A pixel
  casts `supersample`² sub-pixel rays (dsd.representations.nerf_field.camera_rays), each picks the
  cell its direction falls in, and the pixel's noise is Σ_c m_c·n_c / √(Σ_c m_c²) (m_c: sub-rays
  in cell c), which has unit variance exactly: the area-sum renormalisation of their triplane
  noise (noise_generator.py:743-746). So a direction gets the same noise in every view that sees
  it, up to how its pixel footprint is cut into cells. In 2D (no cameras) it is the seed's ε*.
  For a latent prior the rays are cast at latent resolution (their noise_h = noise_w = 64 are
  SD's latent size, configs/cfd/sd-stage1.yaml:72-73).
- gaussians: noise attached to the 3D representation and rendered (representation=gaussians only).
  Each gaussian carries a fixed per-seed N(0, I) vector ε_i (C channels; a buffer of the
  representation, so checkpoints carry it; it follows its gaussian through densification and new
  gaussians draw the seed stream's next values, dsd.representations.gaussians). The vectors are
  blended with the colour's geometry and weights w_i = α_i·T_i, and the background, weighted by the
  final transmittance T, contributes the seed's ε* (a fixed image-space noise, theirs with
  noise_background_fix: true, noise_generator.py:376-380, sd-stage1.yaml:74):
      ε̃ = (Σ_i w_i ε_i + T·ε*) / √(Σ_i w_i² + T²),
  exactly unit variance per pixel, since the ε_i and ε* are independent N(0, 1). A gaussian that
  dominates a pixel in two views gives both the same noise. It is rendered at the prior's
  resolution (the latent's for SD: cameras of the latent's size, the same fov), as theirs is
  computed at noise_h = noise_w = 64 (sd-stage1.yaml:72-73, pooled from the render,
  noise_generator.py:361-362). Gaussians wider than a pixel make the noise spatially correlated
  within a view (white noise only where gaussians are pixel-sized or smaller).
  Their code has no gaussian variant: their attached noise (triplane-noise-generator) takes the
  rendered surface point (depth) at the corners of each noise pixel, rasterises the noise pixel
  onto a 2048² triplane of fixed noise and uses Σ n / √(count) (noise_generator.py:467-484,
  :703-746); pixels not fully covered by opacity > 0.1 (:300, :515-518) take the background noise.
- eps_star: the seed's ε*, the same image-space noise in every view (their base NoiseGenerator
  with sqrt_beta 1, noise_generator.py:37-59 and :81-90; their 2D config, configs/cfd/2d.yaml:41-44).
- random: fresh noise each step (sqrt_beta 0): SDS with CFD's t schedule and weight, an ablation.

Theirs differs from `world_map` (noise_generator.py:128-202): one 180°x360° buffer per seed,
indexed by the camera's elevation/azimuth only (an integer-offset crop, no per-pixel rays, no
interpolation), with pixels of pooled opacity < 0.5 taking a fixed image-space noise. grad() does
not see the render's opacity, so every pixel here looks the world map up. Their released 3D
configs use the triplane noise attached to the surface (rendered depth), not the world map.

Cost: one guided prior call, 2 prior rows per render row at cfg_scale ≠ 1 (as SDS); the noise
lookup costs no prior rows and nothing is cached (noise=gaussians: one extra render per view at the
prior's resolution, with the dense torch compositor).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from dsd.cameras import Cameras
from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.priors.base import add_noise, per_row, sigma
from dsd.priors.procedural import text_seed
from dsd.registry import register
from dsd.schedules import loss_weight

NOISES = ("world_map", "gaussians", "eps_star", "random")
WEIGHTINGS = ("sigma_ratio", "sds", "uniform")
REFERENCE_FOV_DEG = 55.0  # middle of camera.fovy_range's default 40..70°, for the automatic map size


@dataclass
class CFDConfig(GuidanceConfig):
    name: str = "cfd"
    noise: str = "world_map"  # world_map | gaussians | eps_star | random (see the module docstring)
    # g of ε_u + g·(ε_c − ε_u). Their 2D config's guidance_scale 7 (configs/cfd/2d.yaml:58) enters
    # as ε_c + 7·(ε_c − ε_u) (stable_diffusion_unified_guidance.py:453-455), i.e. g = 8.
    cfg_scale: float = 8.0
    weighting: str = "sigma_ratio"  # sigma_ratio: σ_t/α_t (theirs, SD) | sds: 1 − ᾱ | uniform: 1 (their MVDream)
    # t = round(T·((t_max − t_min)(1 − p) + t_min)) with progress p piecewise linear in the run
    # fraction: p = t_progress[k] at run fraction t_progress_at[k] (t_scheduler.py:100-143, their
    # linear_anneal_max = linear_anneal_min and linear_anneal_steps / max_steps; 2d.yaml:30-39).
    t_min: float = 0.02
    t_max: float = 0.98
    t_progress_at: list[float] = field(default_factory=lambda: [0.0, 1.0])
    t_progress: list[float] = field(default_factory=lambda: [0.0, 1.0])
    supersample: int = 4  # world_map: sub-pixel rays per pixel side
    # world_map: cells per cube-face side; null: 3 cells per prior pixel at a 55° fov
    map_resolution: Optional[int] = None


def piecewise_linear(x: float, xs: list[float], ys: list[float]) -> float:
    """The polyline through (xs, ys) at x, constant beyond its ends."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def cfd_timestep(cfg: CFDConfig, step: int, steps: int, num_train_timesteps: int) -> int:
    """The step's deterministic t (their t_scheduler, rounded like unified_guidance.py:623)."""
    progress = piecewise_linear(step / steps, cfg.t_progress_at, cfg.t_progress)
    fraction = (cfg.t_max - cfg.t_min) * (1 - progress) + cfg.t_min
    return min(max(round(num_train_timesteps * fraction), 0), num_train_timesteps - 1)


def cube_cells(directions: Tensor, resolution: int) -> Tensor:
    """Index into a (6·N·N) equi-angular cube map of each unit direction (..., 3). (...) long

    The face is the dominant axis and its sign; the two other components over the dominant one
    are tangents of angles, mapped by atan so that cells are near-equal in angle."""
    axis = directions.abs().argmax(dim=-1)
    major = directions.gather(-1, axis[..., None]).squeeze(-1)
    face = 2 * axis + (major < 0).long()
    coords = []
    for shift in (1, 2):
        other = directions.gather(-1, ((axis + shift) % 3)[..., None]).squeeze(-1)
        angle = torch.atan(other / major.abs()) * (4 / math.pi)  # in [−1, 1]
        coords.append(((angle + 1) / 2 * resolution).long().clamp(0, resolution - 1))
    return (face * resolution + coords[0]) * resolution + coords[1]


def world_map(seed: int, channels: int, resolution: int) -> Tensor:
    """The seed's fixed noise on the sphere: (C, 6·N·N) N(0, 1), from its own stream."""
    generator = torch.Generator().manual_seed(text_seed(f"cfd-world-map:{seed}"))
    return torch.randn(channels, 6 * resolution * resolution, generator=generator)


def world_map_noise(maps: Tensor, cameras: Cameras, size: tuple[int, int], supersample: int,
                    resolution: int) -> Tensor:
    """Each row's noise (B, C, h, w) from its map (B, C, 6·N·N) seen by its camera at h x w pixels."""
    from dsd.cameras import camera_rays

    (h, w), s = size, supersample
    fine = dataclasses.replace(cameras, width=w * s, height=h * s)  # same fov, s x s rays a pixel
    _, directions = camera_rays(fine)  # (B, h·s, w·s, 3)
    batch = len(directions)
    directions = directions.reshape(batch, h, s, w, s, 3).permute(0, 1, 3, 2, 4, 5).reshape(batch, h, w, s * s, 3)
    cells = cube_cells(directions.double(), resolution).to(maps.device)  # (B, h, w, s²)
    channels = maps.shape[1]
    picked = maps.gather(2, cells.reshape(batch, 1, -1).expand(-1, channels, -1))
    total = picked.reshape(batch, channels, h, w, s * s).sum(-1)  # Σ_c m_c·n_c
    square_counts = (cells[..., :, None] == cells[..., None, :]).sum((-1, -2))  # Σ_c m_c²
    return total / square_counts.to(total.dtype).sqrt()[:, None]


def attached_noise(blended: Tensor, square_weights: Tensor, alpha: Tensor, background: Tensor) -> Tensor:
    """(Σ w_i ε_i + T·ε_bg) / √(Σ w_i² + T²), T = 1 − alpha: unit variance per pixel. (B, C, H, W)"""
    transmittance = 1 - alpha
    return (blended + transmittance * background) / (square_weights + transmittance**2).sqrt()


def gaussian_noise_stream(seed: int) -> int:
    """The seed of the stream that draws a seed's per-gaussian noise (its own, apart from ε*'s)."""
    return text_seed(f"cfd-gaussian-noise:{seed}")


@register("guidance", "cfd", CFDConfig)
class CFD(Guidance):
    def __init__(self, cfg: CFDConfig, prior) -> None:
        super().__init__(cfg, prior)
        for key, value, accepted in (("noise", cfg.noise, NOISES), ("weighting", cfg.weighting, WEIGHTINGS)):
            if value not in accepted:
                raise UserError(f"guidance.{key}={value!r} is not accepted; use one of: {', '.join(accepted)}.")
        if not 0 <= cfg.t_min <= cfg.t_max < 1:
            raise UserError(f"guidance.t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 <= t_min <= t_max < 1.")
        at, progress = list(cfg.t_progress_at), list(cfg.t_progress)
        if (len(at) < 2 or len(at) != len(progress) or at[0] != 0 or any(b <= a for a, b in zip(at, at[1:]))
                or at[-1] > 1 or not all(0 <= p <= 1 for p in progress)):
            raise UserError(f"guidance.t_progress_at={at} and guidance.t_progress={progress}: need equally long "
                            "lists (>= 2), run fractions rising from 0 to at most 1 and progress values in [0, 1].")
        if cfg.supersample < 1 or (cfg.map_resolution is not None and cfg.map_resolution < 1):
            raise UserError(f"guidance.supersample={cfg.supersample} and guidance.map_resolution="
                            f"{cfg.map_resolution} must be >= 1 (map_resolution may be null: automatic).")
        channels, height, _ = prior.sample_shape
        self.map_resolution = cfg.map_resolution or math.ceil(3 * height * 90 / REFERENCE_FOV_DEG)
        self._maps: dict[int, Tensor] = {}  # seed -> its world map (fixed, rebuilt from the seed)
        self._channels = channels

    def seed_map(self, seed: int) -> Tensor:
        if seed not in self._maps:
            self._maps[seed] = world_map(seed, self._channels, self.map_resolution)
        return self._maps[seed]

    def noise(self, x: Tensor, ctx: GuidanceContext) -> Tensor:
        """ε̃ of each row (B, C, H, W)."""
        if self.cfg.noise == "random":
            return ctx.randn_like_rows(x)
        if self.cfg.noise == "gaussians":
            return self.rendered_noise(x, ctx)
        if self.cfg.noise == "eps_star" or ctx.cameras is None:
            return ctx.eps_star.to(x)
        maps = torch.stack([self.seed_map(seed) for seed in ctx.seeds]).to(x)
        return world_map_noise(maps, ctx.cameras, tuple(x.shape[-2:]), self.cfg.supersample, self.map_resolution)

    @torch.no_grad()
    def rendered_noise(self, x: Tensor, ctx: GuidanceContext) -> Tensor:
        """noise=gaussians: each row's representation renders its per-gaussian noise from the row's
        camera at x's resolution. (B, C, H, W)"""
        representations = ctx.representations or []
        if ctx.cameras is None or not representations or not all(hasattr(r, "render_features") for r in representations):
            kind = type(representations[0]).__name__ if representations else "none"
            raise UserError(f"guidance.noise=gaussians needs representation=gaussians (noise attached to each "
                            f"gaussian), not {kind}; with other representations use guidance.noise=world_map, "
                            "eps_star or random.")
        (h, w), channels = x.shape[-2:], x.shape[1]
        cameras = dataclasses.replace(ctx.cameras, width=w, height=h)  # the prior's pixels: latent ones for SD
        parts, first = [], 0
        while first < len(x):  # rows of one representation (one seed) are adjacent
            last = first
            while last + 1 < len(x) and representations[last + 1] is representations[first]:
                last += 1
            rows = list(range(first, last + 1))
            representation = representations[first]
            point = representation.point_noise(gaussian_noise_stream(ctx.seeds[first]), channels)
            parts.append(representation.render_features(point, cameras.rows(rows)))
            first = last + 1
        blended, square_weights, alpha = (torch.cat(p).to(x) for p in zip(*parts))
        return attached_noise(blended, square_weights, alpha, ctx.eps_star.to(x))

    def weight(self, a: Tensor) -> Tensor:
        if self.cfg.weighting == "sigma_ratio":
            return sigma(a)
        return loss_weight(a) if self.cfg.weighting == "sds" else torch.ones_like(a)

    def grad(self, x, ctx: GuidanceContext):
        t_value = cfd_timestep(self.cfg, ctx.step, ctx.steps, self.prior.num_train_timesteps)
        t = torch.full((len(x),), t_value, dtype=torch.long, device=x.device)  # one t for every row
        noise = self.noise(x, ctx)
        a = self.prior.alpha(t)
        eps_hat = self.prior.eps(add_noise(x, noise, a), t, ctx.cond, self.cfg.cfg_scale)
        return per_row(self.weight(a), x) * (eps_hat - noise), {"t": float(t_value)}
