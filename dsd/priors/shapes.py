"""Procedural reference 3D shapes for the analytic prior in 3D: deterministic from the prompt text.

Objects are built from coloured 3D Gaussian blobs (a body blob at the centre plus a few attached
parts). As in 2D (dsd.priors.procedural) there are two data sets: `colourways` (default), one
object per prompt in K colourways of its body, and `separated`, K unrelated objects that are far
apart from every view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.priors.procedural import COLOURWAY_SATURATION, COLOURWAY_VALUE, hsv_to_rgb, text_seed


@dataclass
class GaussianShape:
    means: Tensor  # (M, 3)
    quats: Tensor  # (M, 4) wxyz
    scales: Tensor  # (M, 3)
    opacities: Tensor  # (M,)
    colors: Tensor  # (M, 3) in [0, 1]


def _ellipsoid_fill(center: Tensor, radii: Tensor, rotation: Tensor, count: int, gen) -> tuple[Tensor, Tensor]:
    """`count` small gaussians filling an ellipsoid, so a part renders with a crisp silhouette (a
    single gaussian would fade out softly). Returns means (count, 3) and scales (count, 3)."""
    direction = torch.nn.functional.normalize(torch.randn(count, 3, generator=gen, dtype=torch.float64), dim=-1)
    radius = torch.rand(count, 1, generator=gen, dtype=torch.float64) ** (1 / 3)  # uniform in the ball
    points = (direction * radius * 0.8 * radii) @ rotation.T + center
    scale = (0.35 * radii.min() * torch.ones(count, 3, dtype=torch.float64))
    return points, scale


def _random_part(gen, u, body: bool, count: int) -> tuple[Tensor, Tensor]:
    """One part of a shape: the body at the centre or a smaller part attached to it, filled with
    `count` gaussians. Returns means (count, 3) and scales (count, 3)."""
    if body:
        center, radii = torch.zeros(3, dtype=torch.float64), u(0.25, 0.4, (3,))
    else:
        direction = torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
        center, radii = direction * u(0.3, 0.45), u(0.1, 0.2, (3,))
    q = torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=torch.float64), dim=0)
    w, x, y, z = q.tolist()  # rotation matrix of the unit quaternion (w, x, y, z)
    rotation = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                             [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                             [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]],
                            dtype=torch.float64)
    return _ellipsoid_fill(center, radii, rotation, count, gen)


def _shape(means: list[Tensor], scales: list[Tensor], colors: list[Tensor]) -> GaussianShape:
    n = sum(len(m) for m in means)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).clone()
    return GaussianShape(torch.cat(means).float(), identity, torch.cat(scales).float(), torch.full((n,), 0.9),
                         torch.cat(colors).float())


def separated_shapes(prompt: str, num: int, gaussians_per_part: int = 24) -> list[GaussianShape]:
    """`separated` data: K unrelated shapes with hues spread over the wheel, far apart from every
    view; a deterministic function of (prompt, num); every shape fits in a ball of ~0.8."""
    gen = torch.Generator().manual_seed(text_seed(f"shape3d:{prompt}"))
    u = lambda lo=0.0, hi=1.0, n=(): lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    base_hue = float(u())
    shapes = []
    for k in range(num):
        hue = (base_hue + k / num + float(u(-0.05, 0.05))) % 1.0
        parts = 2 + int(u(0, 3))  # a body and 1..3 attached parts
        means, scales, colors = [], [], []
        for part in range(parts):
            points, scale = _random_part(gen, u, part == 0, gaussians_per_part)
            color = hsv_to_rgb(torch.tensor((hue + float(u(-0.12, 0.12))) % 1.0), u(0.6, 1.0), u(0.35, 0.95))
            means.append(points)
            scales.append(scale)
            colors.append(color.expand(gaussians_per_part, 3))
        shapes.append(_shape(means, scales, colors))
    return shapes


def colourway_shapes(prompt: str, num: int, gaussians_per_part: int = 24) -> list[GaussianShape]:
    """`colourways` data: one shape per prompt (a body and 1..3 parts) in K colourways of its body
    (hues evenly around the wheel, as the 2D colourways), the parts' colours shared: the K
    references differ in one coarse attribute, from every view."""
    gen = torch.Generator().manual_seed(text_seed(f"colourways3d:{prompt}"))
    u = lambda lo=0.0, hi=1.0, n=(): lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    base_hue = float(u())
    parts = [_random_part(gen, u, part == 0, gaussians_per_part) for part in range(2 + int(u(0, 3)))]
    part_colors = [hsv_to_rgb(u(), u(0.3, 0.6), u(0.35, 0.7)).expand(gaussians_per_part, 3) for _ in parts[1:]]
    shapes = []
    for k in range(num):
        body = hsv_to_rgb(torch.tensor((base_hue + k / num) % 1.0, dtype=torch.float64),
                          torch.tensor(COLOURWAY_SATURATION, dtype=torch.float64),
                          torch.tensor(COLOURWAY_VALUE, dtype=torch.float64))
        colors = [body.expand(gaussians_per_part, 3), *part_colors]
        shapes.append(_shape([m for m, _ in parts], [sc for _, sc in parts], colors))
    return shapes


def back_shapes(prompt: str, num: int, gaussians_per_part: int = 24) -> list[GaussianShape]:
    """`backs` data (for image-to-3D, analytic mode=image): one shape per prompt whose K variants
    differ only in the colour of a part on its BACK (−x, hidden behind the body from the front
    view, azimuth 0): an input view from the front cannot tell them apart, every view from behind
    can. Body and front-side parts keep one colour; the back part takes K hues around the wheel."""
    gen = torch.Generator().manual_seed(text_seed(f"backs3d:{prompt}"))
    u = lambda lo=0.0, hi=1.0, n=(): lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    identity = torch.eye(3, dtype=torch.float64)
    body_radii = torch.stack([u(0.3, 0.38), u(0.32, 0.4), u(0.32, 0.4)])
    body = _ellipsoid_fill(torch.zeros(3, dtype=torch.float64), body_radii, identity, 2 * gaussians_per_part, gen)
    # a part on the front-facing half (visible from azimuth 0), and the hidden back part
    side = torch.tensor([0.2, float(u(-0.25, 0.25)), float(u(0.1, 0.3))], dtype=torch.float64)
    front = _ellipsoid_fill(side, u(0.1, 0.14, (3,)), identity, gaussians_per_part, gen)
    back_centre = torch.tensor([-0.3, 0.0, float(u(-0.05, 0.05))], dtype=torch.float64)
    back = _ellipsoid_fill(back_centre, u(0.12, 0.16, (3,)), identity, gaussians_per_part, gen)
    base_hue = float(u())
    body_color = hsv_to_rgb(u(), u(0.2, 0.4), u(0.5, 0.7)).expand(len(body[0]), 3)
    front_color = hsv_to_rgb(u(), u(0.3, 0.6), u(0.35, 0.7)).expand(gaussians_per_part, 3)
    shapes = []
    for k in range(num):
        back_color = hsv_to_rgb(torch.tensor((base_hue + k / num) % 1.0, dtype=torch.float64),
                                torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.85, dtype=torch.float64))
        shapes.append(_shape([body[0], front[0], back[0]], [body[1], front[1], back[1]],
                             [body_color, front_color, back_color.expand(gaussians_per_part, 3)]))
    return shapes


SHAPE_SETS = {"colourways": colourway_shapes, "separated": separated_shapes, "backs": back_shapes}


def reference_shapes(prompt: str, num: int, data: str = "colourways") -> list[GaussianShape]:
    """The K reference shapes of `prompt` from the named data set (`prior.data`)."""
    return SHAPE_SETS[data](prompt.strip().lower(), num)


def view_params(cameras) -> Tensor:
    """(B, 13) float64: the camera's c2w rows 0..2 (flattened 3×4) and fovy, i.e. all that a render
    depends on besides the image size. Used as the analytic condition and as render-cache key, so
    a perturbed camera is rendered as it really is, not as the orbit it was sampled around."""
    return torch.cat([cameras.c2w[:, :3, :].flatten(1), cameras.fovy_deg[:, None]], dim=-1).double()


def view_camera(view: Tensor, size: int):
    """The (size × size) camera of one `view_params` row (13,)."""
    from dsd.cameras import cameras_from_c2w

    c2w = torch.eye(4, dtype=torch.float32)
    c2w[:3] = view[:12].reshape(3, 4).float()  # float32 -> float64 -> float32 is exact
    return cameras_from_c2w(c2w[None], view[12:13].float(), size, size)


def render_shapes(shapes: list[GaussianShape], view: Tensor, size: int, background: Tensor,
                  with_alpha: bool = False) -> Tensor:
    """Renders (S, 3, size, size) in [0, 1] of every shape from one view (13,) of `view_params`: one
    projection of all shapes' gaussians, then each shape composited over the whole image. With
    alpha: (S, 4, size, size), the opacity last."""
    from dsd.render.gaussians import composite_tile, project_gaussians, viewmats_opencv

    camera = view_camera(view, size)
    cat = lambda name: torch.cat([getattr(s, name) for s in shapes])  # noqa: E731
    means2d, conics, depths, visible, _ = project_gaussians(
        cat("means"), cat("quats"), cat("scales"), viewmats_opencv(camera), camera.intrinsics().float(), size, size
    )
    out, start = [], 0
    for shape in shapes:
        local = torch.arange(len(shape.means))
        ids = local + start
        start += len(shape.means)
        keep = visible[0, ids]
        local, ids = local[keep], ids[keep]
        order = depths[0, ids].argsort()  # near to far
        local, ids = local[order], ids[order]
        image = composite_tile(means2d[0, ids], conics[0, ids], shape.opacities[local], shape.colors[local],
                                background, 0, 0, size, size)  # (H, W, 4): the whole image as one tile
        out.append(image[..., : 4 if with_alpha else 3].permute(2, 0, 1))
    return torch.stack(out).clamp(0, 1)
