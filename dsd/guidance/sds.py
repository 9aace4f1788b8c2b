"""SDS (DreamFusion, Poole et al. 2022; Alg. 4): fresh ε and t ~ U[t_min, t_max] every step,
grad = w(t)·(ε̂_g(x_t, t) − ε).

`form=x0_recon` is MVDream-threestudio's form (threestudio/models/guidance/
multiview_diffusion_guidance.py, recon_loss=True): the target is the one-step reconstruction
x̂0 = x0(x_t, ε̂_g) and grad = x − x̂0 (no w(t)); with `recon_std_rescale` r > 0, x̂0 is first
mixed with itself rescaled to the spread of the unguided reconstruction, per object:
x̂0 ← r·x̂0·std(x0_c)/std(x̂0) + (1 − r)·x̂0, which tames the over-saturation of large CFG scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.priors.base import add_noise, per_row, x0_from_eps
from dsd.registry import register
from dsd.schedules import loss_weight, timestep_bounds, uniform_timestep


@dataclass
class SDSConfig(GuidanceConfig):
    name: str = "sds"
    # g of ε_u + g·(ε_c − ε_u) (dsd.priors.base.classifier_free_guidance). threestudio's SDS default
    # guidance_scale 100 (configs/dreamfusion-sd.yaml:73) is g = 100 in its Perp-Neg branch
    # (threestudio/models/guidance/stable_diffusion_guidance.py:228) but w = 100 of
    # ε_c + w·(ε_c − ε_u), i.e. g = 101, in its default one without Perp-Neg (same file, :251).
    cfg_scale: float = 100.0
    t_min: float = 0.02  # fractions of T
    t_max: float = 0.98
    # Linear annealing of the t range (threestudio's ramps): from [t_min, t_max] at step 0 to
    # [t_min_final, t_max_final] at anneal_until·N, constant after; null: no annealing.
    t_min_final: Optional[float] = None
    t_max_final: Optional[float] = None
    anneal_until: float = 1.0  # fraction of the run
    form: str = "eps"  # eps (DreamFusion) | x0_recon (MVDream-threestudio)
    recon_std_rescale: float = 0.0  # x0_recon only: r above (MVDream-threestudio uses 0.5)


def lerp_fraction(start: float, final: Optional[float], step: int, steps: int, until: float) -> float:
    """`start` annealed linearly to `final` over the first `until` fraction of `steps`."""
    if final is None:
        return start
    progress = min(step / max(until * steps, 1e-9), 1.0)
    return start + (final - start) * progress


@register("guidance", "sds", SDSConfig)
class SDS(Guidance):
    def __init__(self, cfg: SDSConfig, prior) -> None:
        super().__init__(cfg, prior)
        if cfg.form not in ("eps", "x0_recon"):
            raise UserError(f"guidance.form={cfg.form!r} is not accepted; use one of: eps, x0_recon.")
        if not 0 <= cfg.recon_std_rescale <= 1 or not 0 < cfg.anneal_until <= 1:
            raise UserError(f"guidance.recon_std_rescale={cfg.recon_std_rescale} must be in [0, 1] and "
                            f"guidance.anneal_until={cfg.anneal_until} in (0, 1].")
        for lo, hi in ((cfg.t_min, cfg.t_max), (cfg.t_min_final, cfg.t_max_final)):
            if lo is not None and hi is not None and not 0 <= lo <= hi < 1:
                raise UserError(f"guidance t range [{lo}, {hi}] is not accepted: need 0 <= t_min <= t_max < 1.")

    def grad(self, x, ctx: GuidanceContext):
        cfg = self.cfg
        lo = lerp_fraction(cfg.t_min, cfg.t_min_final, ctx.step, ctx.steps, cfg.anneal_until)
        hi = lerp_fraction(cfg.t_max, cfg.t_max_final, ctx.step, ctx.steps, cfg.anneal_until)
        t_min, t_max = timestep_bounds(self.prior.num_train_timesteps, lo, hi)
        t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max)).to(x.device)
        noise = ctx.randn_like_rows(x)
        a = self.prior.alpha(t)
        x_t = add_noise(x, noise, a)
        if cfg.form == "eps":
            eps_hat = self.prior.eps(x_t, t, ctx.cond, cfg.cfg_scale)
            return per_row(loss_weight(a), x) * (eps_hat - noise), {"t": float(t.float().mean())}
        return x - self.reconstruction(x_t, t, a, ctx), {"t": float(t.float().mean())}

    def reconstruction(self, x_t, t, a, ctx: GuidanceContext):
        """x̂0 of the guided prediction, std-rescaled per object (F rows) towards the unguided one."""
        batch, r = len(x_t), self.cfg.recon_std_rescale
        if r == 0:
            return x0_from_eps(x_t, self.prior.eps(x_t, t, ctx.cond, self.cfg.cfg_scale), a)
        scales = torch.tensor([self.cfg.cfg_scale] * batch + [1.0] * batch)  # guided and conditional, one call
        eps = self.prior.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), ctx.cond.cat([ctx.cond, ctx.cond]), scales)
        x0_cfg, x0_cond = x0_from_eps(x_t, eps[:batch], a), x0_from_eps(x_t, eps[batch:], a)
        f = ctx.views_per_sample
        spread = lambda v: v.reshape(batch // f, -1).std(dim=1).repeat_interleave(f)  # noqa: E731
        factor = per_row((spread(x0_cond) + 1e-8) / (spread(x0_cfg) + 1e-8), x0_cfg)
        return r * x0_cfg * factor + (1 - r) * x0_cfg
