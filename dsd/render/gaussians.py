"""3D Gaussian splatting as functions on tensors (Kerbl et al. 2023, "3D Gaussian Splatting").

Two backends with one contract:
- "gsplat": `gsplat.rasterization` (tiled CUDA kernels; CUDA tensors only).
- "torch": EWA projection with gsplat's pure-torch reference functions, then DENSE front-to-back
  alpha compositing (every gaussian against every pixel). Exact and differentiable; meant for CPU,
  tests and small demos (32–64 px, a few thousand gaussians); 16 px tiles bound the work.

Cameras come in our convention (dsd.cameras: OpenGL c2w, x right, y up, looking along −z);
`viewmats_opencv` is the one place that converts them to gsplat's world-to-camera OpenCV matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.cameras import Cameras

# Constants of 3DGS / gsplat (rasterization defaults and the CUDA kernels):
EPS2D = 0.3  # px² low-pass added to every 2D covariance (3DGS's antialiasing dilation)
NEAR_PLANE = 0.01  # gaussians with camera depth below this are culled
ALPHA_MIN = 1.0 / 255.0  # per-pixel alphas below this are skipped
ALPHA_MAX = 0.999  # alpha clamp, so transmittance never reaches exactly 0
RADIUS_SIGMAS = 3.33  # screen-space radius used for culling, in standard deviations (gsplat)
TILE = 16  # px; tiles of the torch backend (gsplat's default tile_size)

_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # flip camera y and z axes


@dataclass
class RasterInfo:
    """What densification needs from a render."""

    means2d: Tensor  # (V, N, 2) projected centres in pixels (x right, y down); keeps its grad
    visible: Tensor  # (V, N) bool: in front of the near plane and overlapping the image


def viewmats_opencv(cameras: Cameras) -> Tensor:
    """World-to-camera (V, 4, 4) in the OpenCV convention (x right, y down, looking along +z)
    from our OpenGL camera-to-world matrices. The only place where the conventions meet."""
    c2w_cv = cameras.c2w.float() @ _GL_TO_CV.to(cameras.c2w.device)
    rotation, position = c2w_cv[:, :3, :3], c2w_cv[:, :3, 3:]
    w2c = torch.eye(4, device=c2w_cv.device).repeat(len(cameras), 1, 1)
    w2c[:, :3, :3] = rotation.transpose(1, 2)  # rigid inverse: exact, no matrix solve
    w2c[:, :3, 3:] = -rotation.transpose(1, 2) @ position
    return w2c


def render_gaussians(
    means: Tensor,  # (N, 3)
    quats: Tensor,  # (N, 4) wxyz, normalized inside
    scales: Tensor,  # (N, 3) positive
    opacities: Tensor,  # (N,) in [0, 1]
    colors: Tensor,  # (N, 3) in [0, 1]
    cameras: Cameras,
    background: Tensor,  # (3,)
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Render the views of `cameras`: rgb (V, 3, H, W) and alpha (V, 1, H, W), differentiable
    w.r.t. all gaussian inputs. backend: auto (gsplat on CUDA, else torch) | gsplat | torch."""
    rgb, alpha, _ = rasterize_gaussians(means, quats, scales, opacities, colors, cameras, background, backend)
    return rgb, alpha


def rasterize_gaussians(means, quats, scales, opacities, colors, cameras: Cameras, background: Tensor,
                        backend: str = "auto") -> tuple[Tensor, Tensor, RasterInfo]:
    """`render_gaussians` plus the screen-space info that densification reads."""
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend not in ("gsplat", "torch"):
        raise ValueError(f"backend={backend!r} is not accepted; use auto, gsplat or torch.")
    viewmats = viewmats_opencv(cameras).to(means.device)
    Ks = cameras.intrinsics().float().to(means.device)
    background = background.to(means)
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, cameras, background)
    means2d, conics, depths, visible, radii = project_gaussians(means, quats, scales, viewmats, Ks,
                                                         cameras.width, cameras.height)
    if means2d.requires_grad:
        means2d.retain_grad()  # densification reads its gradient after backward
    rgb, alpha = composite_dense(means2d, conics, depths, visible, radii, opacities, colors, background,
                                 cameras.width, cameras.height)
    return rgb, alpha, RasterInfo(means2d, visible)


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, cameras, background):
    if not means.is_cuda:
        raise RuntimeError("backend='gsplat' needs CUDA tensors; use backend='torch' (or auto) on CPU.")
    from gsplat import rasterization

    V = len(viewmats)
    rgb, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, cameras.width, cameras.height,
        near_plane=NEAR_PLANE, eps2d=EPS2D, packed=False, backgrounds=background.expand(V, 3),
    )  # (V, H, W, 3), (V, H, W, 1); packed=False keeps means2d (V, N, 2) like the torch backend
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    visible = (meta["radii"] > 0).all(dim=-1)
    return rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2), RasterInfo(means2d, visible)


def project_gaussians(means, quats, scales, viewmats, Ks, width: int, height: int):
    """EWA splatting (Zwicker et al. 2001) as in 3DGS: Σ' = J W Σ Wᵀ Jᵀ + 0.3·I (px²).

    Uses gsplat's pure-torch reference functions, so the CPU path matches the CUDA kernels.
    Returns means2d (V, N, 2) px, conics (V, N, 3) = upper triangle of Σ'⁻¹, depths (V, N),
    visible (V, N) and radii (V, N, 2) px (3.33σ boxes). Culled gaussians get finite stand-in values,
    so no inf/NaN reaches autograd.
    """
    from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _world_to_cam

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)  # (N, 3, 3)
    means_c, covars_c = _world_to_cam(means, covars, viewmats)  # (V, N, 3), (V, N, 3, 3)
    depths = means_c[..., 2]
    in_front = depths > NEAR_PLANE
    # Behind the camera x/z blows up; project a stand-in point instead and mask it out below.
    stand_in = torch.tensor([0.0, 0.0, 1.0], device=means.device, dtype=means.dtype)
    means_c = torch.where(in_front[..., None], means_c, stand_in)
    means2d, cov2d = _persp_proj(means_c, covars_c, Ks, width, height)
    cov2d = cov2d + EPS2D * torch.eye(2, device=means.device, dtype=means.dtype)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = (a * c - b * b).clamp(min=1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    with torch.no_grad():
        rx, ry = RADIUS_SIGMAS * a.sqrt(), RADIUS_SIGMAS * c.sqrt()
        x, y = means2d[..., 0], means2d[..., 1]
        on_image = (x + rx > 0) & (x - rx < width) & (y + ry > 0) & (y - ry < height)
        visible = in_front & on_image
        radii = torch.stack([rx, ry], dim=-1)
    return means2d, conics, depths, visible, radii


def composite_dense(means2d, conics, depths, visible, radii, opacities, colors, background, width: int,
                    height: int) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing (3DGS Eq. 3) per 16×16 tile, densely within a tile.

    C = Σ_i T_i α_i c_i + T_final·background, α_i = min(0.999, o_i·exp(−½ dᵀΣ'⁻¹d)), T_i = Π_{j<i}(1 − α_j),
    with pixel centres at integer + 0.5 as in gsplat. A tile composites only the gaussians whose
    3.33σ box overlaps it; outside that box o·exp(−½·3.33²) < 1/255, so nothing is lost.
    Inputs as returned by `project_gaussians`. Returns rgb (V, 3, H, W), alpha (V, 1, H, W).
    """
    def tile(ids, x0, y0, x1, y1, v):
        return composite_tile(means2d[v, ids], conics[v, ids], opacities[ids], colors[ids], background, x0, y0, x1, y1)

    image = composite_tiles(means2d, depths, visible, radii, width, height, tile)  # (V, 4, H, W)
    return image[:, :3], image[:, 3:]


def composite_tiles(means2d, depths, visible, radii, width: int, height: int, tile) -> Tensor:
    """The tile loop of the torch backend: `tile(ids, x0, y0, x1, y1, view)` -> (y1−y0, x1−x0, K) for
    the visible gaussians `ids` (near to far) whose 3.33σ box overlaps the tile. Returns (V, K, H, W)."""
    images = []
    for v in range(len(means2d)):
        ids = visible[v].nonzero().squeeze(1)
        ids = ids[depths[v, ids].detach().argsort()]  # near to far
        lo = (means2d[v, ids] - radii[v, ids]).detach()  # (M, 2) boxes
        hi = (means2d[v, ids] + radii[v, ids]).detach()
        rows = []
        for y0 in range(0, height, TILE):
            row = []
            for x0 in range(0, width, TILE):
                y1, x1 = min(y0 + TILE, height), min(x0 + TILE, width)
                hit = (lo[:, 0] < x1) & (hi[:, 0] > x0) & (lo[:, 1] < y1) & (hi[:, 1] > y0)
                row.append(tile(ids[hit], x0, y0, x1, y1, v))  # ids[hit]: still near to far
            rows.append(torch.cat(row, dim=1))
        images.append(torch.cat(rows, dim=0))  # (H, W, K)
    return torch.stack(images).permute(0, 3, 1, 2)


def blend_weights(mean, conic, opacity, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """w_i = α_i·T_i of every pixel of a tile (P = (y1−y0)(x1−x0) row-major) and gaussian given near to
    far (M). (P, M)"""
    device, dtype = opacity.device, opacity.dtype
    ys, xs = torch.meshgrid(torch.arange(y1 - y0, device=device, dtype=dtype),
                            torch.arange(x1 - x0, device=device, dtype=dtype), indexing="ij")
    px, py = xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5  # pixel centres, tile-local (small: exact enough)
    mx, my = mean[:, 0] - x0, mean[:, 1] - y0
    a, b, c = conic.unbind(-1)
    # log α = log o − ½ dᵀΣ'⁻¹d, d = p − m, expanded into monomials of p: one (P, 6) @ (6, M) matmul
    # instead of a dozen elementwise passes over (P, M).
    monomials = torch.stack([px * px, px * py, py * py, px, py, torch.ones_like(px)], dim=-1)
    coefficients = torch.stack([
        -0.5 * a, -b, -0.5 * c, a * mx + b * my, b * mx + c * my,
        opacity.clamp(min=1e-12).log() - 0.5 * (a * mx * mx + 2 * b * mx * my + c * my * my),
    ])
    log_alpha = monomials @ coefficients  # (P, M)
    # min(α, 0.999) as a clamp in log space; the floor at o·e^−12 (dropped below anyway, α < 1/255)
    # keeps exp away from subnormal floats, which are ~100× slower on CPUs.
    alpha = torch.exp(log_alpha.clamp(min=-12.0, max=math.log(ALPHA_MAX)))
    alpha = torch.where(alpha < ALPHA_MIN, torch.zeros_like(alpha), alpha)
    log_keep = torch.log1p(-alpha)
    # exclusive cumulative product as a shifted cumsum of logs: stable, and cheap to differentiate
    transmittance = torch.exp(torch.cumsum(log_keep, dim=1) - log_keep)
    return alpha * transmittance


def composite_tile(mean, conic, opacity, color, background, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """rgb and alpha (y1−y0, x1−x0, 4) of one tile; the gaussians are given near to far."""
    weight = blend_weights(mean, conic, opacity.to(background), x0, y0, x1, y1)  # (P, M)
    acc = weight.sum(dim=1, keepdim=True)  # = 1 − T_final
    rgb = weight @ color + (1.0 - acc) * background
    return torch.cat([rgb, acc], dim=-1).reshape(y1 - y0, x1 - x0, 4)


def blend_features(means, quats, scales, opacities, features, cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
    """Per-gaussian features (N, K) blended like the colour, with the same projection and weights
    w_i = α_i·T_i: Σ_i w_i f_i (V, K, H, W), Σ_i w_i² (V, 1, H, W) and alpha Σ_i w_i = 1 − T_final
    (V, 1, H, W); no background. Always the torch compositor (on any device): gsplat's kernels blend
    features linearly but cannot return Σ w², which renormalising blended noise needs."""
    viewmats = viewmats_opencv(cameras).to(means.device)
    Ks = cameras.intrinsics().float().to(means.device)
    means2d, conics, depths, visible, radii = project_gaussians(means, quats, scales, viewmats, Ks,
                                                         cameras.width, cameras.height)

    def tile(ids, x0, y0, x1, y1, v):
        weight = blend_weights(means2d[v, ids], conics[v, ids], opacities[ids], x0, y0, x1, y1)
        out = torch.cat([weight @ features[ids], (weight * weight).sum(1, keepdim=True),
                         weight.sum(1, keepdim=True)], dim=-1)
        return out.reshape(y1 - y0, x1 - x0, -1)

    out = composite_tiles(means2d, depths, visible, radii, cameras.width, cameras.height, tile)
    k = features.shape[1]
    return out[:, :k], out[:, k : k + 1], out[:, k + 1 :]
