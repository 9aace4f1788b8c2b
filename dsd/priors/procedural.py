"""Procedural reference images for the analytic prior: deterministic from the prompt text.

Two data sets (`prior.data`):

- `colourways` (default): one scene per prompt (a background gradient, a main object, a shared
  detail) in K colourways of the main object: hues evenly around the colour wheel at a moderate
  saturation. The K references differ only in a coarse, low-dimensional attribute (the object's
  colour: its RGB values lie on a closed curve in a 2-D plane), the way real images of one prompt
  differ in coarse content. Along the diffusion ODE such a mixture decides *gradually* (measured by
  `benchmarks/decision_time.py`, docs/benchmarks.md): a seed's reference is not fixed by its noise
  at t = T, so a guidance method has to follow the ODE to reach it.
- `separated`: K unrelated compositions of primitives with hues spread over the wheel. Far apart
  in every pixel, so the exact denoiser tells them apart from the noise alone at t = T: every
  seed's reference is decided before any guidance acts (kept to reproduce earlier figures).
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


def separated_images(prompt: str, num: int, size: int) -> Tensor:
    """`separated` data: (num, 3, size, size) in [0, 1], a deterministic function of (prompt, num, size)."""
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


COLOURWAY_SATURATION = 0.4  # object colour: moderate saturation keeps the K colourways close enough
COLOURWAY_VALUE = 0.8  # to decide late along the ODE, yet distinct to the eye (docs/benchmarks.md)


def colourway_images(prompt: str, num: int, size: int) -> Tensor:
    """`colourways` data: (num, 3, size, size) in [0, 1]; one scene per prompt, reference k has its
    main object at hue base + k/num (turns). A deterministic function of (prompt, num, size)."""
    gen = torch.Generator().manual_seed(text_seed(f"colourways:{prompt}"))
    u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()  # noqa: E731
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    edge = 2.0 / size  # soft edges: the content is coarse
    scalar = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

    # The scene, shared by the K references: background gradient, the object's geometry, a detail.
    base_hue, background_hue = u(), u()
    top = hsv_to_rgb(scalar(background_hue), scalar(u(0.1, 0.3)), scalar(u(0.85, 1.0)))
    bottom = hsv_to_rgb(scalar((background_hue + u(-0.1, 0.1)) % 1.0), scalar(u(0.3, 0.6)), scalar(u(0.45, 0.7)))
    blend = ((yy + 1) / 2)[None]
    scene = top.reshape(3, 1, 1) * (1 - blend) + bottom.reshape(3, 1, 1) * blend
    kind, angle = int(u(0, 4)), u(0, 2 * math.pi)
    cx, cy, radius = u(-0.2, 0.2), u(-0.2, 0.2), u(0.4, 0.55)
    detail = _shape_mask(int(u(0, 4)), xx, yy, u(-0.7, 0.7), u(-0.7, 0.7), u(0.12, 0.2), u(0, 2 * math.pi), edge)
    detail_colour = hsv_to_rgb(scalar(u()), scalar(u(0.2, 0.5)), scalar(u(0.3, 0.6)))
    scene = scene * (1 - detail) + detail_colour.reshape(3, 1, 1) * detail
    obj = _shape_mask(kind, xx, yy, cx, cy, radius, angle, edge)

    images = []
    for k in range(num):
        colour = hsv_to_rgb(scalar((base_hue + k / num) % 1.0), scalar(COLOURWAY_SATURATION), scalar(COLOURWAY_VALUE))
        images.append(scene * (1 - obj) + colour.reshape(3, 1, 1) * obj)
    return torch.stack(images).float().clamp(0, 1)


DATA_SETS = {"colourways": colourway_images, "separated": separated_images}


def reference_images(prompt: str, num: int, size: int, data: str = "colourways") -> Tensor:
    """The K references of `prompt` from the named data set, (num, 3, size, size) in [0, 1]."""
    return DATA_SETS[data](prompt.strip().lower(), num, size)
