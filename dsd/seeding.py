"""Per-seed randomness. Every seed owns its generators, so its result does not depend on the
global RNG, on the other seeds of its batch, or on the batch size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsd.priors.procedural import text_seed


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ε* of a seed: the first draw of torch.Generator(seed). dsd-sample uses the same one."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def step_generator(seed: int) -> torch.Generator:
    """The seed's stream for per-step randomness (t, δ, fresh noise, cameras)."""
    return torch.Generator().manual_seed(text_seed(f"steps:{seed}"))


def prior_eps_star(seed: int, prior) -> torch.Tensor:
    """ε* of a seed for `prior`: one noise (C, H, W), or F noises (F, C, H, W), one per view slot,
    for a multi-view prior (`Prior.views_per_sample`). Used by the trainer and by dsd-sample."""
    views = prior.views_per_sample
    return seed_noise(seed, prior.sample_shape if views == 1 else (views, *prior.sample_shape))


def eps_star_rows(eps_star: torch.Tensor, rows: int, views_per_sample: int) -> torch.Tensor:
    """A seed's ε* for its `rows` rows: the same noise for every view of a per-view prior, view
    slot i mod F of a multi-view prior (rows in whole objects). (rows, C, H, W)"""
    if views_per_sample == 1:
        return eps_star.expand(rows, *eps_star.shape)
    return eps_star[torch.arange(rows) % views_per_sample]


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside, torch's global RNG starts from a state of `seed` alone, and is restored after: code
    that draws from it (a library's parameter init, e.g. the NeRF's hash grid) gives a seed the
    same numbers whatever ran before in the process (another run, a resume, other seeds)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(text_seed(f"init:{seed}"))
        yield
