"""DSD* (sampling-based score distillation, Eq. 7–8 of Sec. 3.2; DDIM equivalence in appendix A).

The gradient depends only on the seed's ODE. The grid pair (g_{k−1}, g_k) has the x0 increment
    Δ_k = σ(g_k)·[ε(x(g_k)) − ε(x(g_{k−1}))] = x0(g_{k−1}) − x0(g_k)             (Eq. 7 with Eq. 5)
Step i of N covers the stretch [i, i+1]·N_ddim/N of the grid (in pairs) and takes, of each pair
it overlaps, the overlapped fraction of Δ_k, divided by the nominal step size N_ddim/N. With
plain SGD at that step size the steps of one pair therefore sum to exactly one Δ_k, for any N
(N < N_ddim: one step covers several pairs), and a representation started at x0(g_0)
(`init=ode_x0`) ends exactly at the DDIM sample x0(g_n) of its seed; `dsd-sample` computes it.
(The paper's Alg. 2, for N ≠ N_ddim, is a different method: see dsd.guidance.dsd_2d.)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
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
    # null: N_ddim/N, with which the steps sum to exactly the DDIM trajectory; another value
    # scales every step by lr/(N_ddim/N)
    lr: Optional[float] = None


def pair_shares(step: int, steps: int, pairs: int) -> dict[int, Fraction]:
    """{k: fraction of pair k's increment that step `step` (0-based) of `steps` covers}: the
    overlap of [step, step+1]·pairs/steps with [k−1, k]. Exact, so each pair's shares sum to 1."""
    start, end = Fraction(step * pairs, steps), Fraction((step + 1) * pairs, steps)
    last = min(pairs, -(-end.numerator // end.denominator))  # ⌈end⌉
    return {k: min(end, k) - max(start, k - 1) for k in range(int(start) + 1, last + 1)}


@register("guidance", "dsd_sampling", DSDSamplingConfig)
class DSDSampling(OdeGuidance):
    def grad(self, x, ctx: GuidanceContext):
        n = self.cfg.ode_steps
        nominal_lr = Fraction(n, ctx.steps)  # the step size the shares are divided by
        keys, batch = ctx.trajectory_keys(), len(x)
        grad = torch.zeros_like(x)
        shares = pair_shares(ctx.step, ctx.steps, n)
        for k, share in shares.items():
            index = torch.full((batch,), k, dtype=torch.long)
            eps_k = self.ode.eps_at(keys, ctx.eps_star, ctx.cond, index)
            eps_prev = self.ode.eps_at(keys, ctx.eps_star, ctx.cond, index - 1)
            increment = per_row(sigma(self.prior.alpha(self.ode.grid[index])), x) * (eps_k - eps_prev).to(x)
            grad = grad + float(share / nominal_lr) * increment
        return grad, {"t": float(self.ode.grid[max(shares)])}
