"""When along the ODE is a seed's reference decided? (analytic prior, 2D)

For each grid point g_j of the DDIM ODE from a seed's ε*, take the one-step prediction x0(g_j)
(Eq. 3) and its nearest reference; the *decided fraction* at g_j is the fraction of seeds whose
nearest reference there already equals the one the finished DDIM sample reaches. A prior whose
fraction is ~1 at g_0 decides every seed's result from its noise at t = T, before any guidance
acts; a realistic one decides gradually inside DSD's t range (0.98T -> 0.32T).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsd.ode import OdeTrajectories
from dsd.seeding import seed_noise


def decision_curve(
    prior, prompt: str, seeds: list[int], steps: int = 10, cfg_scale: float = 7.5, camera=None
) -> tuple[Tensor, Tensor]:
    """(grid timesteps (n+1,), decided fraction at each grid point (n+1,)) for `seeds`; in 3D
    (`camera`: one view, dsd.cameras.Cameras) the ODE and references are those of that view."""
    eps_star = torch.stack([seed_noise(seed, prior.sample_shape) for seed in seeds])
    if camera is None:
        cond = prior.condition(prompt, batch=len(seeds))
        images = prior.references(prompt)
    else:
        cond = prior.condition(prompt, batch=len(seeds), cameras=camera.rows([0] * len(seeds)))
        images = prior.reference_renders(prompt, camera.rows([0]))[:, 0]
    ode = OdeTrajectories(prior, steps, cfg_scale)
    refs = prior.encode(images.double()).reshape(prior.cfg.num_references, -1)
    keys = list(range(len(seeds)))
    nearest = []
    for j in range(steps + 1):
        x0 = ode.x0_at(keys, eps_star, cond, torch.full((len(seeds),), j, dtype=torch.long))
        nearest.append(torch.cdist(x0.reshape(len(seeds), -1).double(), refs).argmin(1))
    final = nearest[-1]
    return ode.grid.clone(), torch.stack([(n == final).double().mean() for n in nearest])
