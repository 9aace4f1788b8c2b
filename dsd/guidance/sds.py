"""SDS (DreamFusion, Poole et al. 2022; Alg. 4): fresh ε and t ~ U[t_min, t_max] every step,
grad = w(t)·(ε̂_g(x_t, t) − ε)."""

from __future__ import annotations

from dataclasses import dataclass

from dsd.config import GuidanceConfig
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.priors.base import add_noise, per_row
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


@register("guidance", "sds", SDSConfig)
class SDS(Guidance):
    def grad(self, x, ctx: GuidanceContext):
        t_min, t_max = timestep_bounds(self.prior.num_train_timesteps, self.cfg.t_min, self.cfg.t_max)
        t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max)).to(x.device)
        noise = ctx.randn_like_rows(x)
        a = self.prior.alpha(t)
        eps_hat = self.prior.eps(add_noise(x, noise, a), t, ctx.cond, self.cfg.cfg_scale)
        grad = per_row(loss_weight(a), x) * (eps_hat - noise)
        return grad, {"t": float(t.float().mean())}
