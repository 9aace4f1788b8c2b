"""Per-seed randomness. Every seed owns its generators, so its result does not depend on the
global RNG, on the other seeds of its batch, or on the batch size."""

from __future__ import annotations

import torch

from dsd.priors.procedural import text_seed


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ε* of a seed: the first draw of torch.Generator(seed). dsd-sample uses the same one."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def step_generator(seed: int) -> torch.Generator:
    """The seed's stream for per-step randomness (t, δ, fresh noise, cameras)."""
    return torch.Generator().manual_seed(text_seed(f"steps:{seed}"))
