"""Marching cubes of a density field -> mesh.obj and mesh.glb with vertex colours."""

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


def write_mesh(mesh: trimesh.Trimesh, out_dir: Path, stem: str = "mesh") -> list[Path]:
    """Write `<stem>.obj` (vertex colours as `v x y z r g b`) and `<stem>.glb`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.obj", out_dir / f"{stem}.glb"]
    for path in paths:
        mesh.export(path)
    return paths
