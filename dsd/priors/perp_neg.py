"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", arXiv:2304.04968)
for view-dependent prompts: functions on tensors.

Guidance with negative prompts that only removes what is perpendicular to the positive direction
(paper Eq. 6 / Alg. 1):
    e_pos = ε_c − ε_u,   e_i = ε_neg_i − ε_u,
    ε̂ = ε_u + g·(e_pos − Σ_i w_i · e_i^⊥),   e_i^⊥ = e_i − (⟨e_i, e_pos⟩ / ‖e_pos‖²)·e_pos.
For text-to-3D the positive prompt is interpolated between view prompts by azimuth and the other
views are the negatives, with weights that decay in the interpolation ratio r. The view split
(|azimuth| < 90: front↔side, else side↔back; overhead above the elevation threshold, no negatives),
r, and the default decay parameters f(r) = a·exp(−b·r) + c are threestudio's
(`threestudio/models/prompt_processors/base.py`, `get_text_embeddings_perp_neg` and
`shifted_expotional_decay`); threestudio stores −f and adds, we store f and subtract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.cameras import VIEW_LABELS

FRONT, SIDE, BACK, OVERHEAD = (VIEW_LABELS.index(v) for v in ("front", "side", "back", "overhead"))

# threestudio's defaults: (a, b, c) of f(r) = a·exp(−b·r) + c, chosen so f_fs(1) = f_sb(1) ≈ 0.
F_FS = (4.0, 0.5, -2.426)  # front negative, front↔side segment, of r
F_SF = (4.0, 0.5, -2.426)  # side negative, front↔side segment, of 1 − r
F_SB = (1.0, 0.5, -0.606)  # side negative, side↔back segment, of r
F_FSB = (1.0, 0.5, 0.967)  # front negative, side↔back segment, of r


def shifted_exponential_decay(abc: tuple[float, float, float] | list[float], r: Tensor) -> Tensor:
    """f(r) = a·exp(−b·r) + c."""
    a, b, c = abc
    return a * torch.exp(-b * r) + c


@dataclass
class PerpNegViews:
    """Per row: the positive prompt mixes views pos[:, 0] (weight mix) and pos[:, 1] (1 − mix);
    negatives are views neg (B, 2) with weights weight (B, 2). View ids index VIEW_LABELS."""

    pos: Tensor  # (B, 2) long
    mix: Tensor  # (B,) float64
    neg: Tensor  # (B, 2) long
    weight: Tensor  # (B, 2) float64


def perp_neg_views(
    azimuth_deg: Tensor,
    overhead: Tensor,
    f_fs=F_FS,
    f_sf=F_SF,
    f_sb=F_SB,
    f_fsb=F_FSB,
) -> PerpNegViews:
    """Azimuth-interpolated positive views and negative-view weights. azimuth (B,) in degrees,
    0 = front; overhead (B,) bool (elevation above the overhead threshold)."""
    azimuth = ((azimuth_deg.double() + 180) % 360) - 180  # to [−180, 180)
    frontish = azimuth.abs() < 90
    # r: 1 = complete front (front↔side) or complete side (side↔back); 0 = the other end.
    r = torch.where(frontish, 1 - azimuth.abs() / 90, 2 - azimuth.abs() / 90)
    full = lambda v: torch.full_like(azimuth, v, dtype=torch.long)  # noqa: E731
    pos = torch.stack([torch.where(frontish, full(FRONT), full(SIDE)),
                       torch.where(frontish, full(SIDE), full(BACK))], dim=1)
    neg = torch.stack([torch.where(frontish, full(FRONT), full(SIDE)), full(SIDE)], dim=1)
    neg[~frontish, 1] = FRONT
    weight = torch.stack([
        torch.where(frontish, shifted_exponential_decay(f_fs, r), shifted_exponential_decay(f_sb, r)),
        torch.where(frontish, shifted_exponential_decay(f_sf, 1 - r), shifted_exponential_decay(f_fsb, r)),
    ], dim=1)  # fmt: skip
    # Overhead: the overhead prompt alone, no negatives (threestudio's dummy rows of weight 0).
    pos[overhead] = OVERHEAD
    r = torch.where(overhead, torch.ones_like(r), r)
    weight[overhead] = 0.0
    return PerpNegViews(pos=pos, mix=r, neg=neg, weight=weight)


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """The part of each row of x perpendicular to the same row of y. (N, ...) each."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp(min=1e-6)
    return x - coef * y


def perp_neg_guidance(
    eps_uncond: Tensor, eps_cond: Tensor, eps_neg: Tensor, owner: Tensor, weight: Tensor, scale: Tensor
) -> Tensor:
    """ε̂ = ε_u + g·(e_pos − Σ_i w_i·e_i^⊥) (Perp-Neg Eq. 6). eps_uncond/eps_cond (B, C, H, W),
    g (B,); the N negative rows eps_neg (N, C, H, W) belong to rows owner (N,) with weights w (N,),
    so a row may have any number of negatives (none: plain CFG)."""
    e_pos = eps_cond - eps_uncond
    e_neg = eps_neg - eps_uncond[owner]
    w = weight.to(e_pos.dtype).reshape(-1, *([1] * (e_pos.dim() - 1)))
    removed = torch.zeros_like(e_pos).index_add_(0, owner, w * perpendicular_component(e_neg, e_pos[owner]))
    g = scale.to(e_pos.dtype).reshape(-1, *([1] * (e_pos.dim() - 1)))
    return eps_uncond + g * (e_pos - removed)
