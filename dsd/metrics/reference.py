"""Exact fidelity/diversity against the analytic prior's references."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (peak 1)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def nearest_reference(image: Tensor, references: Tensor) -> tuple[int, float]:
    """Index of the reference closest in MSE to `image` and the PSNR to it.

    image: (H, W, 3) or (V, H, W, 3); references: (K, H, W, 3) or (K, V, H, W, 3), in [0, 1].
    With several views (3D), the distance is over all views together."""
    flat = references.reshape(len(references), -1).double()
    mse = ((flat - image.reshape(1, -1).double()) ** 2).mean(1)
    k = int(torch.argmin(mse))
    return k, psnr(image, references[k])


def summarize_references(nearest: list[int], psnrs: list[float]) -> dict:
    return {
        "distinct_references": len(set(nearest)),
        "mean_psnr_to_reference": sum(psnrs) / len(psnrs),
    }
