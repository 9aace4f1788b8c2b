"""ASD: Asynchronous Score Distillation (ScaleDreamer, Ma et al. 2024; theEricMa/ScaleDreamer,
threestudio/models/guidance/stable_diffusion_asd_guidance.py, "ASD file" below).

Every step draws one fresh ε per row, shared by both points, t ~ U{t_min, …, t_max} over a linearly
annealed range, and a later t⁺ = t + ⌊U·clamp(r·(t − t_min), 0, T−1−t)⌋ (clamped to [1, T−1]):
    grad = w(t)·(ε̂_g(x_t, t) − ε̂_c(x_{t⁺}, t⁺)),   x_s = √ᾱ_s·x + √(1−ᾱ_s)·ε
with classifier-free guidance g at t and the plain conditional prediction at t⁺ (no CFG, no
Perp-Neg negatives; ASD file :376-428). Both points go through ONE prior call.

Cost: 3 prior rows per render row and step (conditional + unconditional at t, conditional at t⁺),
plus the Perp-Neg negatives of the rows at t when the prior uses them; no ODE, nothing cached.
ScaleDreamer trains with AdamW betas (0, 0.99), eps 1e-15 (configs/single-prompt_benchmark/
asd_sd_nerf.yaml:110-114): `guidance.adam_betas` sets those betas on the trainer's Adam (eps 1e-15
is ours too); AdamW's weight decay is not modelled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.guidance.sds import lerp_fraction
from dsd.priors.base import add_noise, per_row
from dsd.registry import register
from dsd.schedules import loss_weight, shifted_timestep, timestep_bounds, uniform_timestep


@dataclass
class ASDConfig(GuidanceConfig):
    name: str = "asd"
    # g of ε_u + g·(ε_c − ε_u) at t: guidance_scale 7.5 (asd_sd_nerf.yaml:92), mixed exactly so
    # (ASD file :426, and :423 with Perp-Neg)
    cfg_scale: float = 7.5
    # t range, fractions of T, annealed linearly over the whole run: min_step_percent
    # [0, 0.5, 0.02, 25000] and max_step_percent [0, 0.98, 0.5, 25000] with max_steps 25000
    # (asd_sd_nerf.yaml:95-96, :128; threestudio.utils.misc.C is the linear ramp)
    t_min: float = 0.5
    t_max: float = 0.98
    t_min_final: Optional[float] = 0.02
    t_max_final: Optional[float] = 0.5
    anneal_until: float = 1.0  # fraction of the run
    plus_ratio: float = 0.1  # r of t⁺ (asd_sd_nerf.yaml:93)
    plus_random: bool = True  # U ~ U[0, 1) (asd_sd_nerf.yaml:94); false: U = 1
    # the representation's Adam betas: ScaleDreamer's AdamW (0, 0.99) (asd_sd_nerf.yaml:110-114);
    # its weight decay is not modelled
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.99])


@register("guidance", "asd", ASDConfig)
class ASD(Guidance):
    def __init__(self, cfg: ASDConfig, prior) -> None:
        super().__init__(cfg, prior)
        for lo, hi, key in ((cfg.t_min, cfg.t_max, ""), (cfg.t_min_final, cfg.t_max_final, "_final")):
            if lo is not None and hi is not None and not 0 <= lo <= hi < 1:
                raise UserError(f"guidance.t_min{key}={lo}, guidance.t_max{key}={hi} are not accepted: "
                                "need 0 <= t_min <= t_max < 1.")
        if not 0 < cfg.anneal_until <= 1:
            raise UserError(f"guidance.anneal_until={cfg.anneal_until} must be in (0, 1].")
        if cfg.plus_ratio < 0:
            raise UserError(f"guidance.plus_ratio={cfg.plus_ratio} must be >= 0 (t⁺ is never below t).")

    def adam_betas(self):
        return tuple(self.cfg.adam_betas)

    def timesteps(self, ctx: GuidanceContext) -> tuple[Tensor, Tensor]:
        """t (B,) uniform in this step's range and t⁺ (B,), one of each per sample."""
        cfg, T = self.cfg, self.prior.num_train_timesteps
        lo = lerp_fraction(cfg.t_min, cfg.t_min_final, ctx.step, ctx.steps, cfg.anneal_until)
        hi = lerp_fraction(cfg.t_max, cfg.t_max_final, ctx.step, ctx.steps, cfg.anneal_until)
        t_min, t_max = timestep_bounds(T, lo, hi)
        t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max))
        u = ctx.rand_rows() if cfg.plus_random else torch.ones(len(t), dtype=torch.float64)
        return t, shifted_timestep(t, t_min, cfg.plus_ratio, u, T)

    def grad(self, x, ctx: GuidanceContext):
        noise = ctx.randn_like_rows(x)  # drawn first, as the ASD file (:228 before :234)
        t, t_plus = self.timesteps(ctx)
        t, t_plus = t.to(x.device), t_plus.to(x.device)
        a, a_plus = self.prior.alpha(t), self.prior.alpha(t_plus)
        batch = len(x)
        x_noisy = torch.cat([add_noise(x, noise, a), add_noise(x, noise, a_plus)])
        scales = torch.tensor([self.cfg.cfg_scale] * batch + [1.0] * batch)
        cond = ctx.cond.cat([ctx.cond, ctx.cond.without_negatives()])
        eps = self.prior.eps(x_noisy, torch.cat([t, t_plus]), cond, scales)
        grad = per_row(loss_weight(a), x) * (eps[:batch] - eps[batch:])  # weighting "sds" (ASD file :263)
        return grad, {"t": float(t.float().mean()), "t_plus": float(t_plus.float().mean())}
