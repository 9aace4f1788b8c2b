"""Diversity of a set of feature vectors that needs no ImageNet network.

Vendi score (Friedman & Dieng 2023): the effective number of distinct items. With a kernel matrix
K (K_ii = 1) over n items, the eigenvalues of K/n sum to 1; the score is exp of their Shannon
entropy. n identical items give one eigenvalue 1 (score 1); n mutually orthogonal items give n
eigenvalues 1/n (score n). We use the cosine-similarity kernel, so features of any scale work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit_rows(features: Tensor) -> Tensor:
    """(n, D) -> rows scaled to unit length, float64 (eigenvalues of near-duplicate sets are tiny)."""
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty (n, D) matrix, got shape {tuple(features.shape)}")
    rows = features.detach().to(torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def vendi_score(features: Tensor) -> float:
    """Vendi score of the rows of `features` (n, D) under the cosine-similarity kernel; in [1, n]."""
    unit = _unit_rows(features)
    # The nonzero eigenvalues of K/n = U U^T / n equal those of the smaller Gram U^T U / n.
    gram = unit.T @ unit if unit.shape[1] < unit.shape[0] else unit @ unit.T
    eig = torch.linalg.eigvalsh(gram / len(unit)).clamp_min(0)
    eig = eig[eig > 1e-12]
    entropy = -float((eig * eig.log()).sum())
    return math.exp(entropy)


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean over pairs i < j of the cosine distance 1 - cos(f_i, f_j); 0 for fewer than two items."""
    unit = _unit_rows(features)
    n = len(unit)
    if n < 2:
        return 0.0
    sim = unit @ unit.T
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1 - sim[i, j]).mean())
