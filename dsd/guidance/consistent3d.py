"""Consistent3D (Wu et al., CVPR 2024): Consistency Distillation Sampling with a fixed noise.

Defaults are the official coarse stage (sail-sg/Consistent3D, configs/consistency-coarse.yaml:73-89;
the loss is StableDiffusionGuidance.compute_grad_consistency in
threestudio/models/guidance/stable_diffusion_guidance.py:309-424, "SG" below).

Each seed has a fixed ε* (SG:163 draws one noise and `share_noise` reuses it for every view and
step). At step i, t_next anneals deterministically and t sits a random gap above it (SG:575-580):
    t_next = clamp(⌊T·anneal_sqrt(i)⌋, t_min, t_max − gap_min),  t = clamp(t_next + U{gap}, t_min, t_max)
Their code works in the σ-parametrisation σ = √((1−ᾱ)/ᾱ) with zs = x + σ_t·ε* and feeds the UNet
zs/√(1+σ_t²) (SG:339-341). Since 1 + σ² = 1/ᾱ, that input is √ᾱ·x + √(1−ᾱ)·ε*, exactly our
x_t = add_noise(x, ε*, ᾱ_t): no extra scaling is needed. Their ODE step zs_next = zs + (σ_next − σ_t)·ε̂_t
fed as zs_next/√(1+σ_next²) (SG:358-359) is √ᾱ_next·(x0(x_t, ε̂_t) + σ_next·ε̂_t), i.e. one
deterministic DDIM step `ddim_step(x_t, ε̂_t, ᾱ_t, ᾱ_next)`. With recon_std_rescale = 0 (their
config) `get_rescaled_sample` returns ε̂ unchanged, so their G = ε̂_next − ε̂_t (SG:394, uniform
weight SG:376-377), clamped to ±clip (SG:397-398), and the loss ½‖x − sg(x + G)‖²/B (SG:399-400)
has ∂L/∂x = −G/B. So, with the trainer's mean over views:
    grad = clip(w·(ε̂_g(x_t, t) − ε̂_g(x_next, t_next)))
(the sign is the loss's, not the variable `grad_latents`'s). Their CFG is ε_c + s·(ε_c − ε_u)
(SG:353), i.e. g = s + 1 here. CFG scale and clip bound anneal linearly over the run (threestudio's
C(), threestudio/utils/misc.py:65-86), t_next as √progress (SG:904-916).

Cost: two sequential guided prior calls (x_next needs ε̂_t), 4 prior rows per render row (more
with Perp-Neg negatives; their code raises on Perp-Neg, SG:327-329, ours guides as `Prior.eps`).
x_t depends on the render, so no ODE cache applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.guidance.dsd import check_choice
from dsd.guidance.sds import lerp_fraction
from dsd.ode import ddim_step
from dsd.priors.base import add_noise, per_row
from dsd.registry import register
from dsd.schedules import loss_weight, timestep_bounds, uniform_timestep


@dataclass
class Consistent3DConfig(GuidanceConfig):
    name: str = "consistent3d"
    # guidance_scale [0, 100., 50., 3000] (consistency-coarse.yaml:77) in their ε_c + s·(ε_c − ε_u)
    # form (SG:353): g = s + 1 of ε_u + g·(ε_c − ε_u), linear over the run (3000 = trainer.max_steps, :125)
    cfg_scale: float = 101.0
    cfg_scale_final: Optional[float] = 51.0  # null: constant
    # cur_steps [0, 700, 100, 3000] with perturb_indices sqrt (:84, :87): t_next from 0.7·T to 0.1·T
    t_next_max: float = 0.7
    t_next_min: float = 0.1
    # t − t_next ~ U{end_gap, …, end_gap + perturb_factor − 1} = U{100, …, 299} (:88-89, SG:577)
    gap_min: float = 0.1
    gap_max: float = 0.3  # exclusive
    t_min: float = 0.1  # min_sigma_percent (:79), clamps t and t_next (SG:157-158, :578-580)
    t_max: float = 0.98  # max_sigma_percent (:80)
    weighting: str = "uniform"  # uniform (:76) | sds (w = 1 − ᾱ, their refine stage, consistency-refine.yaml:69)
    # grad_clip [0, 2.0, 8.0, 3000] (:85): |grad| ≤ 2 at step 0, 8 at the end; null: no clipping
    grad_clip: Optional[float] = 2.0
    grad_clip_final: Optional[float] = 8.0


@register("guidance", "consistent3d", Consistent3DConfig)
class Consistent3D(Guidance):
    def __init__(self, cfg: Consistent3DConfig, prior) -> None:
        super().__init__(cfg, prior)
        check_choice("guidance.weighting", cfg.weighting, ("uniform", "sds"))
        if not 0 <= cfg.t_min <= cfg.t_max < 1:
            raise UserError(f"guidance.t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 <= t_min <= t_max < 1.")
        if not 0 <= cfg.t_next_min <= cfg.t_next_max < 1:
            raise UserError(f"guidance.t_next_min={cfg.t_next_min}, t_next_max={cfg.t_next_max}: "
                            f"need 0 <= t_next_min <= t_next_max < 1.")
        if not 0 < cfg.gap_min < cfg.gap_max < 1:
            raise UserError(f"guidance.gap_min={cfg.gap_min}, gap_max={cfg.gap_max}: need 0 < gap_min < gap_max < 1.")
        for key in ("grad_clip", "grad_clip_final", "cfg_scale", "cfg_scale_final"):
            value = getattr(cfg, key)
            if value is not None and value <= 0:
                raise UserError(f"guidance.{key}={value} must be > 0 (or null).")
        if cfg.grad_clip is None and cfg.grad_clip_final is not None:
            raise UserError("guidance.grad_clip_final needs guidance.grad_clip (null turns clipping off).")

    def timesteps(self, ctx: GuidanceContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, t_next), (B,) each: t_next from the schedule, t a random gap above it per sample."""
        T, cfg = self.prior.num_train_timesteps, self.cfg
        t_min, t_max = timestep_bounds(T, cfg.t_min, cfg.t_max)
        gap_lo, gap_hi = timestep_bounds(T, cfg.gap_min, cfg.gap_max)
        lo, hi = timestep_bounds(T, cfg.t_next_min, cfg.t_next_max)
        # their anneal_t on integer endpoints, in their order (SG:914): annealed_timestep mixes the
        # fractions first, which is 1 off at some steps
        scheduled = int(hi + (lo - hi) * math.sqrt(ctx.step / ctx.steps))
        t_next = torch.full((len(ctx.seeds),), scheduled).clamp(t_min, max(t_min, t_max - gap_lo))
        gap = ctx.per_sample(lambda g: uniform_timestep(g, gap_lo, gap_hi - 1))
        return (t_next + gap).clamp(t_min, t_max), t_next

    def grad(self, x, ctx: GuidanceContext):
        cfg = self.cfg
        t, t_next = (s.to(x.device) for s in self.timesteps(ctx))
        scale = lerp_fraction(cfg.cfg_scale, cfg.cfg_scale_final, ctx.step, ctx.steps, 1.0)
        a, a_next = self.prior.alpha(t), self.prior.alpha(t_next)
        x_t = add_noise(x, ctx.eps_star.to(x), a)
        eps_t = self.prior.eps(x_t, t, ctx.cond, scale)
        eps_next = self.prior.eps(ddim_step(x_t, eps_t, a, a_next), t_next, ctx.cond, scale)
        weight = loss_weight(a) if cfg.weighting == "sds" else torch.ones_like(a)
        grad = torch.nan_to_num(per_row(weight, x) * (eps_t - eps_next))
        info = {"t": float(t.float().mean()), "t_next": float(t_next.float().mean()), "cfg_scale": scale}
        if cfg.grad_clip is not None:
            bound = lerp_fraction(cfg.grad_clip, cfg.grad_clip_final, ctx.step, ctx.steps, 1.0)
            grad, info["grad_clip"] = grad.clamp(-bound, bound), bound
        return grad, info
