"""Cameras around the object: the shared contract between renderers, priors and guidance.

Conventions (tested): world is z-up with the object at the origin; a camera at elevation e and
azimuth a (degrees) sits at d·(cos e·cos a, cos e·sin a, sin e) and looks at the origin.
Azimuth 0 is the front view (+x). `c2w` is camera-to-world in the OpenGL/nerfstudio convention:
camera x right, y up, looking along −z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    c2w: Tensor  # (B, 4, 4) camera-to-world, OpenGL convention
    fovy_deg: Tensor  # (B,) vertical field of view
    elevation_deg: Tensor  # (B,)
    azimuth_deg: Tensor  # (B,) in (−180, 180], 0 = front
    distance: Tensor  # (B,)
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.c2w)

    def focal_px(self) -> Tensor:
        """Focal length in pixels from the vertical fov. (B,)"""
        return 0.5 * self.height / torch.tan(torch.deg2rad(self.fovy_deg) / 2)

    def intrinsics(self) -> Tensor:
        """Pinhole K (B, 3, 3), principal point at the image centre."""
        f = self.focal_px()
        K = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.c2w.device)
        K[:, 0, 0], K[:, 1, 1] = f, f
        K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = self.width / 2, self.height / 2, 1
        return K

    def rows(self, index) -> Cameras:
        index = torch.as_tensor(index, dtype=torch.long)
        return Cameras(self.c2w[index], self.fovy_deg[index], self.elevation_deg[index],
                       self.azimuth_deg[index], self.distance[index], self.width, self.height)

    @staticmethod
    def cat(cameras: list[Cameras]) -> Cameras:
        first = cameras[0]
        return Cameras(*(torch.cat([getattr(c, f) for c in cameras]) for f in
                         ("c2w", "fovy_deg", "elevation_deg", "azimuth_deg", "distance")), first.width, first.height)

    def view_labels(self, front_deg: float = 45.0, back_deg: float = 45.0, overhead_deg: float = 60.0) -> list[str]:
        """front/side/back/overhead for view-dependent prompts (threestudio's thresholds)."""
        labels = []
        for elev, azim in zip(self.elevation_deg.tolist(), self.azimuth_deg.tolist()):
            if elev > overhead_deg:
                labels.append("overhead")
            elif abs(azim) < front_deg:
                labels.append("front")
            elif abs(azim) > 180 - back_deg:
                labels.append("back")
            else:
                labels.append("side")
        return labels


def look_at_c2w(position: Tensor) -> Tensor:
    """Camera-to-world (B, 4, 4) for cameras at `position` (B, 3) looking at the origin, z-up."""
    forward = -position / position.norm(dim=-1, keepdim=True)  # camera looks along −z_cam = forward
    up_world = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype).expand_as(position)
    right = torch.linalg.cross(forward, up_world, dim=-1)
    # straight above/below: any right vector works
    degenerate = right.norm(dim=-1) < 1e-6
    right[degenerate] = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=position.dtype).repeat(len(position), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, position
    return c2w


def orbit_cameras(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor,
                  width: int, height: int) -> Cameras:
    """Cameras on a sphere around the origin, looking at it."""
    e, a = torch.deg2rad(elevation_deg.double()), torch.deg2rad(azimuth_deg.double())
    position = distance.double()[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)
    azimuth = (azimuth_deg + 180) % 360 - 180  # wrap to [−180, 180)
    return Cameras(look_at_c2w(position).float(), fovy_deg.float(), elevation_deg.float(), azimuth.float(),
                   distance.float(), width, height)


def turntable(n: int, elevation_deg: float, distance: float, fovy_deg: float, width: int, height: int) -> Cameras:
    """n evenly spaced views around the object, starting at the front (azimuth 0)."""
    azimuth = torch.arange(n, dtype=torch.float64) * 360.0 / n
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    return orbit_cameras(full(elevation_deg), azimuth, full(distance), full(fovy_deg), width, height)



def _uniform(generator: torch.Generator, n: int, low_high) -> Tensor:
    low, high = (float(v) for v in low_high)
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_cameras(generator: torch.Generator, n: int, cfg, size: int) -> Cameras:
    """n random training cameras from `cfg` (dsd.config.CameraConfig), drawn from the seed's own
    generator; with cfg.quantize_deg > 0 elevation and azimuth snap to that grid."""
    elevation = _uniform(generator, n, cfg.elevation_range)
    azimuth = _uniform(generator, n, cfg.azimuth_range)
    distance = _uniform(generator, n, cfg.distance_range)
    fovy = _uniform(generator, n, cfg.fovy_range)
    if cfg.quantize_deg > 0:
        q = float(cfg.quantize_deg)
        elevation = (elevation / q).round() * q
        azimuth = (azimuth / q).round() * q
    return orbit_cameras(elevation, azimuth, distance, fovy, size, size)


def eval_cameras(cfg, n: int, size: int) -> Cameras:
    """n evaluation views evenly around the object at the configured elevation/distance/fov."""
    return turntable(n, cfg.eval_elevation, cfg.eval_distance, cfg.eval_fovy, size, size)
