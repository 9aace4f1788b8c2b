"""Gaussians as .ply in the layout of the original 3DGS code (graphdeco-inria/gaussian-splatting),
which common splat viewers (SuperSplat, antimatter15/splat, gsplat's viewer) and the 3DGS
`GaussianModel.load_ply` itself open.

Per vertex, in this order (3DGS scene/gaussian_model.py, `construct_list_of_attributes`):
x y z, nx ny nz (zeros), f_dc_0..2 (degree-0 SH: color = 0.5 + C0·f_dc), f_rest_0..44 (SH degrees
1-3), opacity (logit), scale_0..2 (log), rot_0..3 (quaternion wxyz).

Our colors are view-independent, so every f_rest is zero. They are still written because the 3DGS
loader asserts exactly 3·((degree + 1)² − 1) = 45 of them for its default degree 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SH_C0 = 0.28209479177387814  # degree-0 real spherical harmonic, 1 / (2·sqrt(pi)) (3DGS sh_utils.py)
SH_DEGREE = 3  # 3DGS default (arguments/__init__.py ModelParams.sh_degree)
# Higher-order coefficients per colour channel. 3DGS stores them channel-major: f_rest_0..14 are
# red's, 15..29 green's, 30..44 blue's (save_ply flattens features_rest transposed to (N, 3, 15)).
SH_REST_PER_CHANNEL = (SH_DEGREE + 1) ** 2 - 1

_FIELDS = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
           + [f"f_rest_{i}" for i in range(3 * SH_REST_PER_CHANNEL)]
           + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def write_gaussians_ply(path: Path, means: Tensor, log_scales: Tensor, quats: Tensor, opacity_logits: Tensor,
                        colors: Tensor) -> Path:
    """Write N gaussians: means (N, 3), log_scales (N, 3), quats (N, 4) wxyz, opacity_logits (N,),
    colors (N, 3) in [0, 1]."""
    from plyfile import PlyData, PlyElement

    f_dc = (colors - 0.5) / SH_C0
    f_rest = torch.zeros(len(means), 3 * SH_REST_PER_CHANNEL, dtype=means.dtype, device=means.device)
    columns = torch.cat([means, torch.zeros_like(means), f_dc, f_rest, opacity_logits[:, None], log_scales, quats],
                        dim=1)
    columns = columns.detach().float().cpu().numpy()
    vertices = np.empty(len(columns), dtype=[(name, "f4") for name in _FIELDS])
    for i, name in enumerate(_FIELDS):
        vertices[name] = columns[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertices, "vertex")], text=False).write(str(path))
    return path


def read_gaussians_ply(path: Path) -> dict[str, Tensor]:
    """Read a 3DGS-layout ply: means, log_scales, quats, opacity_logits, colors (f_rest_* ignored)."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    column = lambda *names: torch.from_numpy(np.stack([np.asarray(vertex[n], dtype=np.float32) for n in names], 1))  # noqa: E731
    return {
        "means": column("x", "y", "z"),
        "log_scales": column("scale_0", "scale_1", "scale_2"),
        "quats": column("rot_0", "rot_1", "rot_2", "rot_3"),
        "opacity_logits": column("opacity")[:, 0],
        "colors": column("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    }
