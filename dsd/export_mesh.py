"""Marching cubes of a density field -> mesh.obj and mesh.glb with vertex colours.

Our world is z-up with the front at +x (dsd/cameras.py). glTF 2.0 is y-up with the front facing +z
(glTF 2.0 spec, section 3.4 "Coordinate System and Units"), so the files are written in that frame:
(x, y, z)_ours -> (X, Y, Z)_file = (y, z, x). That is a cyclic permutation of the axes, a proper
rotation (determinant +1): handedness and the outward winding of faces are kept. OBJ has no
convention; it gets the same y-up frame, which most tools assume (Blender's OBJ importer, MeshLab,
three.js), so the two files agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mcubes
import numpy as np
import torch
import trimesh
from torch import Tensor


@torch.no_grad()
def extract_mesh(density_fn: Callable[[Tensor], Tensor], color_fn: Callable[[Tensor], Tensor] | None,
                 resolution: int, threshold: float, bound: float, chunk: int = 65536) -> trimesh.Trimesh:
    """Isosurface {density = threshold} of `density_fn` on a resolution³ lattice over [−bound, bound]³.

    density_fn: (N, 3) world points -> (N,) densities; color_fn: (N, 3) -> (N, 3) in [0, 1].
    Returns a trimesh (possibly empty) with outward faces and, with color_fn, vertex colours."""
    axis = torch.linspace(-bound, bound, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    density = torch.cat([density_fn(p).reshape(-1).float().cpu() for p in points.split(chunk)])
    volume = density.reshape(resolution, resolution, resolution).numpy().astype(np.float64)
    # pad with empty space so a surface touching the box is still closed
    volume = np.pad(volume, 1, constant_values=min(float(volume.min()), 0.0))
    vertices, faces = mcubes.marching_cubes(volume, threshold)
    if len(faces) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    vertices = (vertices - 1) * (2 * bound / (resolution - 1)) - bound  # lattice index [x, y, z] -> world
    mesh = trimesh.Trimesh(vertices, faces.astype(np.int64), process=False)
    if mesh.volume < 0:  # the inside of a density field is where it is high: make normals point out
        mesh.invert()
    if color_fn is not None:
        v = torch.from_numpy(mesh.vertices).float()
        rgb = torch.cat([color_fn(p).float().cpu() for p in v.split(chunk)]).clamp(0, 1).numpy()
        alpha = np.ones((len(rgb), 1))
        mesh.visual.vertex_colors = (np.concatenate([rgb, alpha], 1) * 255).round().astype(np.uint8)
    return mesh


# Rows: file axes X, Y, Z in our world coordinates (file X = our y, Y = our z, Z = our x).
Z_UP_TO_Y_UP = np.array([[0.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 0.0],
                         [1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]])


def write_mesh(mesh: trimesh.Trimesh, out_dir: Path, stem: str = "mesh") -> list[Path]:
    """Write `<stem>.obj` (vertex colours as `v x y z r g b`) and `<stem>.glb`, both y-up (module
    docstring), with vertex normals; `mesh` (world frame) is not modified. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_up = mesh.copy()
    y_up.apply_transform(Z_UP_TO_Y_UP)
    paths = [out_dir / f"{stem}.obj", out_dir / f"{stem}.glb"]
    for path in paths:
        y_up.export(path, include_normals=True)
    return paths
