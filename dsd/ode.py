"""DDIM probability-flow ODE: the step, the grid, and a trajectory cache.

DSD's ODE depends only on (ε*, condition) and its time only decreases during a run, so each
trajectory is simulated once, incrementally, and kept: a whole run costs about N_ddim prior
evaluations per (seed, condition) instead of up to N_ddim per optimization step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsd.priors.base import Condition, Prior, add_noise, x0_from_eps


def ddim_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """The N_ddim grid g_0 = T−1 > g_1 > … > g_n = 0 (n + 1 points), as the official DSD code."""
    return torch.linspace(num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64).long()


def ddim_step(x_t: Tensor, eps: Tensor, a_t: Tensor, a_next: Tensor) -> Tensor:
    """One deterministic DDIM step (Eq. 1): x_next = √ā'·x0(x_t, ε) + √(1−ā')·ε."""
    return add_noise(x0_from_eps(x_t, eps, a_t), eps, a_next)


@dataclass
class Trajectory:
    """States x(g_0..g_k) and predictions ε(g_0..g_{k−1}) of one ODE, x(g_0) = ε*."""

    xs: list[Tensor]
    eps: list[Tensor] = field(default_factory=list)


def seed_of(key: Hashable) -> Hashable:
    """The seed a trajectory key belongs to: its first element ((seed, condition, ...))."""
    return key[0] if isinstance(key, tuple) else key


class OdeTrajectories:
    """DDIM trajectories from fixed noises, keyed by (seed, condition key), advanced lazily.

    With `enabled=False` nothing is kept: each query re-simulates from ε* (the official code's
    per-step behaviour, kept as the side-by-side baseline). At most `max_per_seed` trajectories
    are kept per seed (a key's first element), the seed's least recently used dropped first: with
    continuous cameras every view is a new condition, so an unbounded cache would grow every step
    (quantized or snapped cameras make keys repeat). The bound is per seed so that what a seed
    keeps, and so its results, never depend on which seeds share its batch; it also bounds the
    seed's checkpoint.
    """

    def __init__(
        self, prior: Prior, steps: int, cfg_scale: float, enabled: bool = True, max_per_seed: int = 128
    ) -> None:
        self.prior = prior
        self.grid = ddim_timesteps(prior.num_train_timesteps, steps)
        self.cfg_scale = cfg_scale
        self.enabled = enabled
        self.max_per_seed = max_per_seed
        self.trajectories: dict[Hashable, Trajectory] = {}  # in order of last use

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    def grid_index_at_or_above(self, t: Tensor) -> Tensor:
        """Largest grid index j with g_j >= t, per row: the last ODE point not below t."""
        return (self.grid[None, :].to(t.device) >= t[:, None]).sum(1) - 1

    def _advance(
        self, keys: Sequence[Hashable], eps_star: Tensor, cond: Condition, index: Tensor
    ) -> list[Trajectory]:
        """Make sure each row's trajectory has ε up to grid index index[row]; batch the work."""
        store = self.trajectories if self.enabled else {}
        rows_of: dict[Hashable, int] = {}
        for row, key in enumerate(keys):
            # a copy: a view would keep (and checkpoint) the whole step's ε* batch alive
            store[key] = store.pop(key) if key in store else Trajectory(xs=[eps_star[row].clone()])  # most recent last
            rows_of.setdefault(key, row)
        for seed in {seed_of(key) for key in rows_of}:
            needed = sum(seed_of(key) == seed for key in rows_of)
            own = [key for key in store if seed_of(key) == seed]  # least recently used first
            while len(own) > max(self.max_per_seed, needed):
                for sibling in self._object_keys(own[0]):  # a multi-view object goes whole
                    store.pop(sibling, None)
                own = [key for key in own if key in store]
        need: dict[Hashable, int] = {}
        for row, key in enumerate(keys):
            need[key] = max(need.get(key, -1), int(index[row]))
        while True:
            todo = [key for key, j in need.items() if len(store[key].eps) <= j]
            if not todo:
                break
            if len(todo) % self.prior.views_per_sample:  # rows of one object advance together
                raise RuntimeError(f"{len(todo)} ODE rows are not whole objects of {self.prior.views_per_sample} views")
            k = torch.tensor([len(store[key].eps) for key in todo])
            x = torch.stack([store[key].xs[-1] for key in todo])
            eps = self.prior.eps(
                x, self.grid[k].to(x.device), cond.rows([rows_of[key] for key in todo]), self.cfg_scale
            )
            for i, key in enumerate(todo):
                traj = store[key]
                traj.eps.append(eps[i])
                j = len(traj.eps) - 1
                if j < self.steps:
                    a = self.prior.alpha(self.grid[j : j + 2])
                    traj.xs.append(ddim_step(x[i : i + 1], eps[i : i + 1], a[:1], a[1:])[0])
        return [store[key] for key in keys]

    def _object_keys(self, key: Hashable) -> list[Hashable]:
        """The keys of all view slots of `key`'s object: (…, slot) for a multi-view prior."""
        views = self.prior.views_per_sample
        return [key] if views == 1 else [(*key[:-1], slot) for slot in range(views)]

    def eps_at(self, keys: Sequence[Hashable], eps_star: Tensor, cond: Condition, index: Tensor) -> Tensor:
        """ε̂(x(g_j), g_j) with j = index[row] for each row. (B, C, H, W)"""
        trajs = self._advance(keys, eps_star, cond, index)
        return torch.stack([traj.eps[int(j)] for traj, j in zip(trajs, index)])

    def state_at(self, keys: Sequence[Hashable], eps_star: Tensor, cond: Condition, index: Tensor) -> tuple[Tensor, Tensor]:
        """(x(g_j), ε(g_j)) with j = index[row] for each row. Both (B, C, H, W)."""
        trajs = self._advance(keys, eps_star, cond, index)
        x = torch.stack([traj.xs[int(j)] for traj, j in zip(trajs, index)])
        return x, torch.stack([traj.eps[int(j)] for traj, j in zip(trajs, index)])

    def eps_exactly_at(self, keys: Sequence[Hashable], eps_star: Tensor, cond: Condition, t: Tensor) -> Tensor:
        """ε̂ at an arbitrary t on the ODE, as the official DSD code (stable_diffusion_dsd_guidance.py:
        335-351: DDIM through the grid points above t, a partial step to t, one more prediction at t
        with the ODE's CFG): a partial DDIM step from the last grid point at or above t down to t
        (the identity when t is that grid point), then one more prior call at t. (B, C, H, W)"""
        j = self.grid_index_at_or_above(t)
        x_j, eps_j = self.state_at(keys, eps_star, cond, j)
        x_t = ddim_step(x_j, eps_j, self.prior.alpha(self.grid[j.cpu()]), self.prior.alpha(t.cpu()))
        return self.prior.eps(x_t, t.to(x_t.device), cond, self.cfg_scale)

    def x0_at(self, keys: Sequence[Hashable], eps_star: Tensor, cond: Condition, index: Tensor) -> Tensor:
        """The one-step data prediction x0(g_j) (Eq. 3) for each row. (B, C, H, W)"""
        x, e = self.state_at(keys, eps_star, cond, index)
        return x0_from_eps(x, e, self.prior.alpha(self.grid[index.cpu()]).to(x.device))

    def state_for(self, seed: int) -> dict:
        """The trajectories of one seed (keys are (seed, …)), for its checkpoint: each as its start
        ε* and its predictions (B = 1 + k tensors); the states x(g_1..g_k) are rebuilt on load by the
        same elementwise DDIM steps, bit for bit, so checkpoints carry half the tensors."""
        return {key: {"start": traj.xs[0], "eps": torch.stack(traj.eps) if traj.eps else None}
                for key, traj in self.trajectories.items() if seed_of(key) == seed}

    def load_state(self, state: dict) -> None:
        for key, saved in state.items():
            if isinstance(saved, Trajectory):  # a checkpoint written before this layout
                self.trajectories[key] = saved
                continue
            eps = [] if saved["eps"] is None else list(saved["eps"].unbind())
            xs = [saved["start"]]
            for j, e in enumerate(eps[: self.steps]):  # as _advance: x(g_{j+1}) from x(g_j), ε(g_j)
                a = self.prior.alpha(self.grid[j : j + 2])
                xs.append(ddim_step(xs[-1][None], e[None], a[:1], a[1:])[0])
            self.trajectories[key] = Trajectory(xs=xs, eps=eps)


def ddim_sample(prior: Prior, eps_star: Tensor, cond: Condition, steps: int, cfg_scale: float) -> Tensor:
    """Plain DDIM sample: n steps on the grid from x(g_0) = ε*, output x0(g_n), the clean
    prediction at the last grid point (n + 1 prior evaluations per row). (B, C, H, W)"""
    ode = OdeTrajectories(prior, steps, cfg_scale)
    views = prior.views_per_sample  # rows of one object (multi-view prior) are one ODE
    keys = [(row // views, row % views) for row in range(len(eps_star))]
    return ode.x0_at(keys, eps_star, cond, torch.full((len(eps_star),), steps, dtype=torch.long))
