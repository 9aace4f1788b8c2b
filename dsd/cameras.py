"""Cameras around the object: the shared contract between renderers, priors and guidance.

Conventions (tested): world is z-up with the object at the origin; a camera at elevation e and
azimuth a (degrees) sits at d·(cos e·cos a, cos e·sin a, sin e) and looks at the origin.
Azimuth 0 is the front view (+x). `c2w` is camera-to-world in the OpenGL/nerfstudio convention:
camera x right, y up, looking along −z. Random training cameras are perturbed away from that orbit
(threestudio's camera/center/up perturbations): `c2w` and `fovy_deg` are the camera every renderer
uses; elevation/azimuth/distance are the orbit it was sampled around.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    c2w: Tensor  # (B, 4, 4) camera-to-world, OpenGL convention: with fovy_deg, the whole camera
    fovy_deg: Tensor  # (B,) vertical field of view
    elevation_deg: Tensor  # (B,) orbit description (before perturbation), for view prompts and logs
    azimuth_deg: Tensor  # (B,) in [−180, 180), 0 = front
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


def look_at_c2w(position: Tensor, center: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world (B, 4, 4) for cameras at `position` (B, 3) looking at `center` (default: the
    origin) with `up` (default: world +z) pointing up in the image, as far as it is not along the view."""
    center = torch.zeros_like(position) if center is None else center
    up_world = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype).expand_as(position) if up is None else up
    forward = center - position
    forward = forward / forward.norm(dim=-1, keepdim=True)  # the camera looks along −z_cam = forward
    right = torch.linalg.cross(forward, up_world, dim=-1)
    # looking along `up` (straight above/below): take world +y made perpendicular to the view
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        y = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype)
        f = forward[degenerate]
        right[degenerate] = y - (f @ y)[:, None] * f
    right = right / right.norm(dim=-1, keepdim=True)
    up_cam = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=position.dtype).repeat(len(position), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up_cam, -forward, position
    return c2w


def wrap_azimuth(azimuth_deg: Tensor) -> Tensor:
    """Azimuth in [−180, 180), so that −180 and 180 are one view (one cache key)."""
    return (azimuth_deg + 180) % 360 - 180


def orbit_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """(B, 3) float64 position of a camera at this elevation, azimuth and distance from the origin."""
    e, a = torch.deg2rad(elevation_deg.double()), torch.deg2rad(azimuth_deg.double())
    return distance.double()[:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], dim=-1)


def orbit_cameras(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor,
                  width: int, height: int) -> Cameras:
    """Cameras on a sphere around the origin, looking at it."""
    azimuth = wrap_azimuth(azimuth_deg.double())
    position = orbit_position(elevation_deg, azimuth, distance)
    return Cameras(look_at_c2w(position).float(), fovy_deg.float(), elevation_deg.float(), azimuth.float(),
                   distance.float(), width, height)


def camera_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through the pixel centres: origins and unit directions, both (V, H, W, 3).

    OpenGL pinhole (nerfstudio's `Cameras.generate_rays` convention): pixel (row i, col j) has
    camera direction ((j + ½ − cx)/f, −(i + ½ − cy)/f, −1); row 0 is the top of the image."""
    K = cameras.intrinsics()  # (V, 3, 3)
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    rows = torch.arange(cameras.height, device=device, dtype=dtype) + 0.5
    cols = torch.arange(cameras.width, device=device, dtype=dtype) + 0.5
    i, j = torch.meshgrid(rows, cols, indexing="ij")  # (H, W)
    f, cx, cy = K[:, 0, 0, None, None], K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    d_cam = torch.stack([(j - cx) / f, -(i - cy) / f, -torch.ones_like((j - cx) / f)], dim=-1)  # (V, H, W, 3)
    d_world = torch.einsum("vab,vhwb->vhwa", cameras.c2w[:, :3, :3], d_cam)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(d_world)
    return origins, d_world / d_world.norm(dim=-1, keepdim=True)


def snapped_orbit_cameras(cameras: Cameras, grid_deg: float) -> Cameras:
    """The unperturbed orbit cameras at each row's elevation and azimuth rounded to a `grid_deg`
    grid (distance and fov kept): a coarse stand-in for nearby views, so quantities keyed by the
    camera (DSD's ODE trajectories) are shared by the views around one grid point."""
    snap = lambda v: (v.double() / grid_deg).round() * grid_deg  # noqa: E731
    elevation = snap(cameras.elevation_deg).clamp(-90, 90)
    return orbit_cameras(elevation, snap(cameras.azimuth_deg), cameras.distance, cameras.fovy_deg,
                         cameras.width, cameras.height)


def cameras_from_c2w(c2w: Tensor, fovy_deg: Tensor, width: int, height: int) -> Cameras:
    """Cameras given by their matrices; elevation/azimuth/distance are those of their positions."""
    position = c2w[:, :3, 3].double()
    distance = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((position[:, 2] / distance.clamp_min(1e-12)).clamp(-1, 1)))
    azimuth = wrap_azimuth(torch.rad2deg(torch.atan2(position[:, 1], position[:, 0])))
    return Cameras(c2w.float(), fovy_deg.float(), elevation.float(), azimuth.float(), distance.float(), width, height)


def turntable(n: int, elevation_deg: float, distance: float, fovy_deg: float, width: int, height: int) -> Cameras:
    """n evenly spaced views around the object, starting at the front (azimuth 0)."""
    azimuth = torch.arange(n, dtype=torch.float64) * 360.0 / n
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    return orbit_cameras(full(elevation_deg), azimuth, full(distance), full(fovy_deg), width, height)


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_elevation(generator: torch.Generator, n: int, low_high, sphere_prob: float) -> Tensor:
    """n elevations (degrees) in [low, high]. Per batch (threestudio uncond.py:147-172), with
    probability `sphere_prob` sin(elevation) is uniform, so camera positions are uniform in area on
    the sphere's band; otherwise the elevation is uniform in degrees (which favours the poles)."""
    low, high = (float(v) for v in low_high)
    if float(torch.rand((), generator=generator, dtype=torch.float64)) >= sphere_prob:
        return _uniform(generator, n, low, high)
    s_low, s_high = torch.sin(torch.deg2rad(torch.tensor([low, high], dtype=torch.float64))).tolist()
    return torch.rad2deg(torch.asin(_uniform(generator, n, s_low, s_high)))


def sample_azimuth(generator: torch.Generator, n: int, low_high, stratified: bool) -> Tensor:
    """n azimuths (degrees) in [low, high]. Stratified (threestudio batch_uniform_azimuth,
    uncond.py:176-184): the range is cut into n equal strata and view i is uniform in stratum i, so
    a batch always covers the whole range."""
    low, high = (float(v) for v in low_high)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if stratified:
        u = (u + torch.arange(n, dtype=torch.float64)) / n
    return low + (high - low) * u


def sample_cameras(generator: torch.Generator, n: int, cfg, size: int) -> Cameras:
    """n random training cameras from `cfg` (dsd.config.CameraConfig), drawn only from the seed's own
    generator, as threestudio's RandomCameraIterableDataset.collate (uncond.py:143-308): an orbit
    camera (elevation, azimuth, distance, fovy) whose position, look-at centre and up vector are
    then perturbed. `elevation_deg`/`azimuth_deg`/`distance` keep the orbit values (threestudio
    reports those too; view prompts use them); `c2w` is the perturbed camera.

    cfg.quantize_deg > 0 snaps elevation and azimuth to that grid before the camera is built; the
    perturbations are not quantized (see CameraConfig)."""
    elevation = sample_elevation(generator, n, cfg.elevation_range, cfg.elevation_sphere_prob)
    azimuth = sample_azimuth(generator, n, cfg.azimuth_range, cfg.batch_uniform_azimuth)
    distance = _uniform(generator, n, *(float(v) for v in cfg.distance_range))
    fovy = _uniform(generator, n, *(float(v) for v in cfg.fovy_range))
    if cfg.relative_distance:
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    if cfg.quantize_deg > 0:
        q = float(cfg.quantize_deg)
        elevation = (elevation / q).round() * q
        azimuth = (azimuth / q).round() * q
    return perturbed_orbit_cameras(generator, elevation, wrap_azimuth(azimuth), distance, fovy, cfg, size)


def perturbed_orbit_cameras(generator: torch.Generator, elevation: Tensor, azimuth: Tensor, distance: Tensor,
                            fovy: Tensor, cfg, size: int) -> Cameras:
    """Orbit cameras whose position, look-at centre and up vector are then perturbed as threestudio's
    uncond.py:220-235: position + U[−p, p]³, centre ~ N(0, σ_c²)³, up = +z + N(0, σ_u²)³ (each only
    when its cfg value is > 0, drawn in that order from `generator`)."""
    n = len(elevation)
    position = orbit_position(elevation, azimuth, distance)
    center = torch.zeros_like(position)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).repeat(n, 1)
    if cfg.camera_perturb > 0:
        position = position + _uniform(generator, (n, 3), -cfg.camera_perturb, cfg.camera_perturb)
    if cfg.center_perturb > 0:
        center = center + cfg.center_perturb * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    if cfg.up_perturb > 0:
        up = up + cfg.up_perturb * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    c2w = look_at_c2w(position, center, up).float()
    return Cameras(c2w, fovy.float(), elevation.float(), azimuth.float(), distance.float(), size, size)


def eval_cameras(cfg, n: int, size: int) -> Cameras:
    """n evaluation views evenly around the object at the configured elevation/distance/fov."""
    return turntable(n, cfg.eval_elevation, cfg.eval_distance, cfg.eval_fovy, size, size)


def sample_multiview_cameras(generator: torch.Generator, views: int, cfg, size: int) -> Cameras:
    """The F = `views` cameras of one object for a multi-view prior, as MVDream-threestudio's
    random_multiview.py:43-105 (@efcd6c3): one elevation, distance and fovy per object; view slot
    k at azimuth low + (u + k)·(high − low)/F with one u ~ U[0, 1), so the views are evenly spaced
    and slot k always lies in the k-th F-th of the azimuth range (a seed's slot-k noise keeps
    meaning the same side of the object). The perturbations and quantization are those of
    `sample_cameras` (quantize_deg snaps the first azimuth and the elevation, so an object's camera
    SET repeats and its ODE can be cached)."""
    elevation = sample_elevation(generator, 1, cfg.elevation_range, cfg.elevation_sphere_prob).expand(views)
    low, high = (float(v) for v in cfg.azimuth_range)
    offset = _uniform(generator, 1, low, low + (high - low) / views)
    distance = _uniform(generator, 1, *(float(v) for v in cfg.distance_range)).expand(views)
    fovy = _uniform(generator, 1, *(float(v) for v in cfg.fovy_range)).expand(views)
    if cfg.relative_distance:
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    if cfg.quantize_deg > 0:
        q = float(cfg.quantize_deg)
        elevation, offset = (elevation / q).round() * q, (offset / q).round() * q
    azimuth = wrap_azimuth(offset + torch.arange(views, dtype=torch.float64) * (high - low) / views)
    return perturbed_orbit_cameras(generator, elevation.contiguous(), azimuth, distance.contiguous(),
                                   fovy.contiguous(), cfg, size)


def view_slot(azimuth_deg: Tensor, views: int, azimuth_range) -> Tensor:
    """The view slot (0..F−1) of each azimuth: which F-th of the azimuth range it lies in, the
    slot `sample_multiview_cameras` gives a camera there. (B,) long"""
    low, high = (float(v) for v in azimuth_range)
    span = high - low
    fraction = ((azimuth_deg.double() - low) % span) / span
    return (fraction * views).floor().long().clamp(0, views - 1)


def multiview_order(cameras: Cameras, views: int, azimuth_range) -> Tensor:
    """Row order that makes n = m·F evaluation cameras (a turntable) whole objects for an F-view
    prior, every camera in its view slot (`view_slot`, the slot training gives that direction):
    object g takes the g-th camera of each slot, in slot order. (n,) long index"""
    from dsd.errors import UserError

    n = len(cameras)
    slots = view_slot(cameras.azimuth_deg, views, azimuth_range)
    per_slot = [torch.nonzero(slots == k).flatten() for k in range(views)]
    if n % views or any(len(rows) != n // views for rows in per_slot):
        raise UserError(
            f"camera.eval_views={n} must be a multiple of the prior's {views} views per sample, so that "
            f"the evaluation turntable makes whole objects (one view per {360 / views:g}° of azimuth each)."
        )
    return torch.stack(per_slot, dim=1).flatten()
