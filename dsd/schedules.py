"""Timestep schedules and the loss weight w(t)."""

from __future__ import annotations

import torch
from torch import Tensor


def loss_weight(a: Tensor) -> Tensor:
    """w(t) = 1 − ᾱ(t), DreamFusion's weighting (threestudio "sds" weighting)."""
    return 1 - a


def annealed_timestep(step: int, steps: int, num_train_timesteps: int, max_frac: float, min_frac: float, kind: str) -> int:
    """Deterministic t going from T·max_frac (step 0) to T·min_frac (step `steps`).

    kind="sqrt" follows the official DSD code: progress p = (step/steps)^0.5, so the run spends
    less time at large t; kind="linear" is Alg. 1's t = T(1 − i/N) between the same bounds.
    The fractions are mixed before scaling by T, in the official order (BillyXYB/Diverse-Score-
    Distillation, stable_diffusion_dsd_guidance.py:622-628 then set_min_max_steps:142), so the
    integer t equals the official one at every step (mixing integer bounds is off by 1 at some).
    """
    progress = step / steps
    if kind == "sqrt":
        progress = progress**0.5
    elif kind != "linear":
        raise ValueError(f"unknown annealing {kind!r}")
    return int(num_train_timesteps * ((max_frac - min_frac) * (1 - progress) + min_frac))


def uniform_timestep(generator: torch.Generator, t_min: int, t_max: int) -> int:
    """t ~ U{t_min, …, t_max} (SDS), drawn from the seed's own generator."""
    return int(torch.randint(t_min, t_max + 1, (), generator=generator))


def timestep_bounds(num_train_timesteps: int, min_frac: float, max_frac: float) -> tuple[int, int]:
    """Fractions of T to integer steps the way threestudio does: int(T·frac)."""
    return int(num_train_timesteps * min_frac), int(num_train_timesteps * max_frac)


def shifted_timestep(t: Tensor, t_min: int, ratio: float, u: Tensor, num_train_timesteps: int,
                     lowest: int = 1) -> Tensor:
    """The later point of ASD and DSD: t⁺ = t + ⌊u·min(ratio·max(t − t_min, 0), T−1−t)⌋, clamped to
    [lowest, T−1] (ScaleDreamer stable_diffusion_asd_guidance.py:294-316, the get_t_plus that wins;
    the official DSD code takes it from there). u ~ U[0, 1) per row. (B,) long"""
    last = num_train_timesteps - 1
    room = torch.minimum((ratio * (t - t_min).double()).clamp(min=0), (last - t).double())
    return (t + (u.double() * room).long()).clamp(lowest, last)
