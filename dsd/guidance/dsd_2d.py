"""DSD in 2D (the paper's Alg. 2, appendix B "Diverse Score Distillation in 2D"): Eq. 7–8 with
the interpolation of Eq. 9, for any number of optimization steps N.

Alg. 2 (paper txt lines ~352-361, and the text at ~395): δ = T/N_ddim, lr = N_ddim/N, and at step
i = 1..N
    t = T(1 − i/N),  t_δ = min(t + δ, T),  t_ddim = the DDIM grid point in (t, t_δ]
    x̂(s) = √ᾱ(s)·x_π + √(1−ᾱ(s))·ε(t_ddim)   for s = t, t_δ  (ε(t_ddim): the seed's ODE, cached)
    ∇ = lr·σ(t)·[ε̂(x̂(t), t) − ε̂(x̂(t_δ), t_δ)]
"simulating the discrete DDIM solver as closely as possible using the fixed DDIM timesteps"
{1000, 900, …, 100} (N_ddim = 10); here they are the grid g_0..g_{n−1} of dsd.ode (999, 899, …,
99) and a time between grid points is placed linearly between them. The extracted formula for
t_ddim reads T(1 − ⌈·⌉/N_ddim); we take ⌈(T − t_δ)/δ⌉, the grid point at or below t_δ and
above t, which is the one DDIM steps from to reach t. With N = N_ddim, t_δ = t_ddim is a grid point,
x̂(t_δ), x̂(t) are the DDIM states and the steps reproduce the DDIM sample exactly (appendix A);
otherwise the steps are a Riemann sum of the x0 ODE (Eq. 4), only close to DDIM (measured on the
analytic prior: N < N_ddim keeps most seeds on their DDIM sample's reference; N > N_ddim, whose first
steps have t_δ clamped at T, about half). The lr is the SGD step (`optimizer=sgd`, `lr: null` =
N_ddim/N) and one ε̂ (CFG ode_cfg_scale) serves the ODE and both points.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

from dsd.config import GuidanceConfig
from dsd.guidance.base import GuidanceContext
from dsd.guidance.dsd import OdeGuidance
from dsd.priors.base import add_noise, per_row, sigma
from dsd.registry import register


@dataclass
class DSD2DConfig(GuidanceConfig):
    name: str = "dsd_2d"
    ode_cfg_scale: float = 7.5  # along the ODE and at x̂(t), x̂(t_δ): Alg. 2 has one ε_θ
    ode_steps: int = 10  # N_ddim
    ode_cache: bool = True
    init: str = "ode_x0"  # x_π starts at x0(g_0), as the DDIM equivalence assumes
    optimizer: Optional[str] = "sgd"
    lr: Optional[float] = None  # null: N_ddim/N (Alg. 2 line 1)


def grid_time(grid: Tensor, u: Fraction) -> int:
    """The timestep at position u ∈ [0, n] on the grid g_0 > … > g_n (u = j is g_j), linear
    between grid points: the paper's T(1 − u/N_ddim) on this grid."""
    j = min(int(u), len(grid) - 2)
    upper, lower = int(grid[j]), int(grid[j + 1])
    return round(upper - (u - j) * (upper - lower))


def alg2_times(step: int, steps: int, grid: Tensor) -> tuple[int, int, int]:
    """(t, t_δ, index of t_ddim on the grid) of 0-based step `step` of `steps` (Alg. 2 line 4-5)."""
    n = len(grid) - 1
    u = Fraction(n * (step + 1), steps)  # t = T(1 − i/N) with i = step + 1, in grid units
    u_delta = max(u - 1, Fraction(0))  # t_δ = min(t + δ, T), δ one grid interval
    k = -(-u_delta.numerator // u_delta.denominator)  # ⌈(T − t_δ)/δ⌉
    return grid_time(grid, u), grid_time(grid, u_delta), k


@register("guidance", "dsd_2d", DSD2DConfig)
class DSD2D(OdeGuidance):
    def grad(self, x, ctx: GuidanceContext):
        t, t_delta, k = alg2_times(ctx.step, ctx.steps, self.ode.grid)
        batch = len(x)
        index = torch.full((batch,), k, dtype=torch.long)
        eps_ddim = self.ode.eps_at(ctx.trajectory_keys(), ctx.eps_star, ctx.cond, index).to(x)
        times = torch.tensor([t] * batch + [t_delta] * batch)
        a = self.prior.alpha(times)
        x_hat = add_noise(torch.cat([x, x]), torch.cat([eps_ddim, eps_ddim]), a)
        eps_hat = self.prior.eps(x_hat, times.to(x.device), ctx.cond.cat([ctx.cond, ctx.cond]), self.cfg.ode_cfg_scale)
        grad = per_row(sigma(a[:batch]), x) * (eps_hat[:batch] - eps_hat[batch:])
        return grad, {"t": float(t), "t_plus": float(t_delta)}
