"""The Guidance interface: grad(x, ctx) -> ∂L/∂x in the prior's space."""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dsd.cameras import Cameras
from dsd.priors.base import Condition, Prior


@dataclass
class GuidanceContext:
    """Everything a guidance needs about the rows of one optimization step."""

    prior: Prior
    cond: Condition  # B rows
    seeds: list[int]  # seed of each row
    eps_star: Tensor  # (B, C, H, W) each row's fixed noise ε*
    generators: list[torch.Generator]  # each row's seed stream for per-step randomness
    step: int  # 0-based optimization step
    steps: int  # total optimization steps N
    cameras: Optional[Cameras] = None  # the rows' cameras in 3D (None in 2D)
    # each row's representation (3D), for methods that render their own per-seed quantities with the
    # same geometry (CFD's noise attached to the Gaussians); None where the trainer has none
    representations: Optional[list] = None
    # the prompt's condition for other cameras (same rows): the ODE of a row can be conditioned on
    # a stand-in camera (DSD's guidance.ode_camera_deg); None in 2D
    condition_for: Optional[Callable[[Cameras], Condition]] = None

    @property
    def views_per_sample(self) -> int:
        """F: rows that form one sample (an object of a multi-view prior), adjacent in the batch."""
        return self.prior.views_per_sample

    def trajectory_keys(self, cond: Condition | None = None) -> list[Hashable]:
        """A row follows the ODE of (its seed, its condition: `cond`, default the rows' own). For a
        multi-view prior the ODE is the object's: the key is (seed, the conditions of all F rows,
        view slot), so one object's rows share a camera SET and are advanced (and evicted) together
        (dsd.ode)."""
        cond = self.cond if cond is None else cond
        f = self.views_per_sample
        if f == 1:
            return [(seed, cond.cache_key(row)) for row, seed in enumerate(self.seeds)]
        keys = []
        for first in range(0, len(self.seeds), f):
            group = tuple(cond.cache_key(row) for row in range(first, first + f))
            keys.extend((self.seeds[first], group, slot) for slot in range(f))
        return keys

    def randn_like_rows(self, x: Tensor) -> Tensor:
        """Fresh N(0, I) noise per row from each row's own generator. (B, C, H, W)"""
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators]).to(x)

    def per_sample(self, draw) -> Tensor:
        """`draw(generator)` once per sample (per row, or per object of F rows from its first row's
        generator), repeated over the object's rows: one t per object, as MVDream-threestudio. (B,)"""
        f = self.views_per_sample
        values = torch.stack([torch.as_tensor(draw(g)) for g in self.generators[::f]])
        return values.repeat_interleave(f)

    def rand_rows(self) -> Tensor:
        """One U[0, 1) per sample from its own generator (see `per_sample`). (B,)"""
        return self.per_sample(lambda g: torch.rand((), generator=g, dtype=torch.float64))


class Guidance(abc.ABC):
    """A score-distillation method. Subclasses own their timestep schedule and whether they use a
    fixed per-seed noise ε*."""

    def __init__(self, cfg: Any, prior: Prior) -> None:
        self.cfg = cfg
        self.prior = prior

    @abc.abstractmethod
    def grad(self, x: Tensor, ctx: GuidanceContext) -> tuple[Tensor, dict[str, float]]:
        """∂L/∂x for renders x (B, C, H, W) in prior space, and scalars to log."""

    def initial_target(self, ctx: GuidanceContext) -> Tensor | None:
        """Prior-space images (B, C, H, W) the representation should start from, or None."""
        return None

    def optimizer_override(self, steps: int) -> tuple[str, float] | None:
        """(optimizer, lr) this method needs, overriding trainer.*; None keeps the trainer's."""
        return None

    def adam_betas(self) -> tuple[float, float] | None:
        """Adam (β1, β2) this method's authors use, overriding the trainer's (0.9, 0.99); None keeps
        them. Applied to every parameter group of the representation's optimizer."""
        return None

    def state_for(self, seed: int) -> dict:
        """Per-seed state to checkpoint (e.g. cached ODE trajectories)."""
        return {}

    def load_state(self, state: dict) -> None:  # noqa: B027 (optional hook, stateless by default)
        """Restore what `state_for` returned."""
