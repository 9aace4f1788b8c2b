"""DSD* (sampling-based score distillation, Eq. 7–8 / Alg. 2).

The gradient depends only on the seed's ODE: for the grid pair (g_{k−1}, g_k) of step i,
    grad = σ(g_k)·[ε(x(g_k)) − ε(x(g_{k−1}))] = x0(g_{k−1}) − x0(g_k)          (Eq. 7 with Eq. 5)
so plain gradient steps of size N_ddim/N telescope to the DDIM trajectory in x0 space. Starting
the representation at x0(g_0) (`init=ode_x0`) and taking N = N_ddim steps reproduces the DDIM
sample of the same seed exactly (appendix A); `dsd-sample` computes that sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dsd.config import GuidanceConfig
from dsd.guidance.base import GuidanceContext
from dsd.guidance.dsd import OdeGuidance
from dsd.priors.base import per_row, sigma
from dsd.registry import register


@dataclass
class DSDSamplingConfig(GuidanceConfig):
    name: str = "dsd_sampling"
    ode_cfg_scale: float = 7.5
    ode_steps: int = 10  # N_ddim
    ode_cache: bool = True
    init: str = "ode_x0"
    optimizer: Optional[str] = "sgd"
    lr: Optional[float] = None  # null: N_ddim / N, as Alg. 2


@register("guidance", "dsd_sampling", DSDSamplingConfig)
class DSDSampling(OdeGuidance):
    def grad_pair(self, step: int, steps: int) -> int:
        """k such that step i covers the ODE pair (g_{k−1}, g_k): k = ⌈(i+1)·N_ddim/N⌉."""
        return min(self.cfg.ode_steps, max(1, math.ceil((step + 1) * self.cfg.ode_steps / steps)))

    def grad(self, x, ctx: GuidanceContext):
        k = self.grad_pair(ctx.step, ctx.steps)
        keys = ctx.trajectory_keys()
        index = torch.full((len(x),), k, dtype=torch.long)
        eps_k = self.ode.eps_at(keys, ctx.eps_star, ctx.cond, index)
        eps_prev = self.ode.eps_at(keys, ctx.eps_star, ctx.cond, index - 1)
        s = sigma(self.prior.alpha(self.ode.grid[index]))
        grad = per_row(s, x) * (eps_k - eps_prev).to(x)
        return grad, {"t": float(self.ode.grid[k])}
