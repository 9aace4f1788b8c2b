"""Procedural reference images for the analytic prior: deterministic from the prompt text.

Each prompt gets K small images of coloured primitives (disc, square, triangle, ring) on a light
background. Hues are spread over the K references so every reference is far from the others and
"which reference did a seed reach" is unambiguous.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor


def text_seed(text: str) -> int:
    """A stable 63-bit seed from text (Python's hash() is salted per process)."""
    digest = hashlib.sha256(text.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Hue in turns, s and v in [0, 1]; returns (..., 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v[..., None] - v[..., None] * s[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _shape_mask(kind: int, xx: Tensor, yy: Tensor, cx: float, cy: float, r: float, angle: float, edge: float):
    """Soft (anti-aliased) coverage in [0, 1] of one primitive on the pixel grid."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 0:  # disc
        dist = r - torch.sqrt(u**2 + v**2)
    elif kind == 1:  # square
        dist = r * 0.8 - torch.maximum(u.abs(), v.abs())
    elif kind == 2:  # triangle: inside three half-planes
        dists = [
            r * 0.5 - (u * math.cos(a) + v * math.sin(a))
            for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        ]
        dist = torch.minimum(torch.minimum(dists[0], dists[1]), dists[2])
    else:  # ring
        dist = r * 0.25 - (torch.sqrt(u**2 + v**2) - r * 0.7).abs()
    return torch.sigmoid(dist / edge)


def reference_images(prompt: str, num: int, size: int) -> Tensor:
    """(num, 3, size, size) images in [0, 1], a deterministic function of (prompt, num, size)."""
    gen = torch.Generator().manual_seed(text_seed(prompt))
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    edge = 1.0 / size
    base_hue = torch.rand((), generator=gen, dtype=torch.float64).item()
    images = []
    for k in range(num):
        u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()  # noqa: E731
        hue = (base_hue + k / num + u(-0.08, 0.08)) % 1.0
        bg = hsv_to_rgb(torch.tensor((hue + 0.5) % 1.0), torch.tensor(u(0.1, 0.3)), torch.tensor(u(0.8, 1.0)))
        img = bg.reshape(3, 1, 1).expand(3, size, size).clone()
        for j in range(1 + int(u(0, 3))):
            kind = int(u(0, 4))
            cx, cy = u(-0.45, 0.45), u(-0.45, 0.45)
            r, angle = u(0.3, 0.6) / (1 + 0.3 * j), u(0, 2 * math.pi)
            color = hsv_to_rgb(
                torch.tensor((hue + u(-0.1, 0.1)) % 1.0),
                torch.tensor(u(0.6, 1.0)),
                torch.tensor(u(0.35, 0.95)),
            )
            mask = _shape_mask(kind, xx, yy, cx, cy, r, angle, edge)
            img = img * (1 - mask) + color.reshape(3, 1, 1) * mask
        images.append(img)
    return torch.stack(images).float().clamp(0, 1)
