"""Exact fidelity/diversity against the analytic prior's references.

A seed *reaches* its nearest reference only when its PSNR to it is at least the reach threshold:
    threshold = max(25 dB, closest pair of references' PSNR + 6.02 dB).
+6.02 dB halves the distance, so a seed above the threshold is closer to that reference than to
any other (triangle inequality): "which reference did it reach" cannot be ambiguous, and an
unconverged, blurry result counts as reaching none. Median PSNR is reported beside the mean
(a mean of dB values is dominated by near-exact seeds).
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

MIN_REACH_DB = 25.0
HALF_DISTANCE_DB = 20 * math.log10(2)  # 6.02 dB: PSNR gained by halving the distance


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


def reach_threshold_db(references: Tensor) -> float:
    """The PSNR a result needs to count as reaching a reference (module docstring). (K, ...) in [0, 1]."""
    flat = references.reshape(len(references), -1).double()
    if len(flat) < 2:
        return MIN_REACH_DB
    mse = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    closest = float(mse.masked_fill(torch.eye(len(flat), dtype=torch.bool), math.inf).min())
    return max(MIN_REACH_DB, 10 * math.log10(1.0 / closest) + HALF_DISTANCE_DB)


def summarize_references(nearest: list[int], psnrs: list[float], threshold_db: float) -> dict:
    """distinct_references counts the references reached above `threshold_db` (others: none)."""
    reached = {k for k, db in zip(nearest, psnrs) if db >= threshold_db}
    return {
        "distinct_references": len(reached),
        "reached_seeds": sum(db >= threshold_db for db in psnrs),
        "reach_threshold_db": threshold_db,
        "mean_psnr_to_reference": sum(psnrs) / len(psnrs),
        "median_psnr_to_reference": statistics.median(psnrs),
    }
