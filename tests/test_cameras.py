"""Random training cameras: threestudio's sampler (uncond.py) statistics, perturbations, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from dsd.cameras import cameras_from_c2w, look_at_c2w, orbit_cameras, sample_cameras
from dsd.config import CameraConfig, Config, validate

NO_PERTURB = dict(camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0)


def draw(n: int, seed: int = 0, **cfg):
    return sample_cameras(torch.Generator().manual_seed(seed), n, CameraConfig(**cfg), 16)


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov–Smirnov statistic sup |F_n − F| of `samples` against the distribution function `cdf`."""
    x = samples.double().sort().values
    n = len(x)
    f = cdf(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    below = f - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def ks_limit(n: int) -> float:
    return 2.3 / math.sqrt(n)  # about the statistic's 0.005% critical value


def test_batch_azimuths_stratify_the_range_one_per_stratum():
    low, high, n = -60.0, 120.0, 8
    edges = torch.linspace(low, high, n + 1, dtype=torch.float64)
    for seed in range(20):
        azimuth = draw(n, seed, azimuth_range=[low, high], **NO_PERTURB).azimuth_deg.double()
        stratum = torch.bucketize(azimuth, edges[1:-1], right=True)  # index of the stratum of each view
        assert sorted(stratum.tolist()) == list(range(n)), (seed, azimuth)
    # the offset inside each stratum is uniform: across batches view i spreads over its whole stratum
    first = torch.stack([draw(n, seed, azimuth_range=[low, high]).azimuth_deg[0] for seed in range(300)])
    assert ks_distance(first, lambda x: (x - low) / ((high - low) / n)) < ks_limit(300)
    # and without stratification a batch may leave strata empty
    plain = [draw(n, seed, azimuth_range=[low, high], batch_uniform_azimuth=False).azimuth_deg for seed in range(20)]
    assert any(len(torch.bucketize(a.double(), edges[1:-1], right=True).unique()) < n for a in plain)


@pytest.mark.parametrize("low_high", [(-10.0, 45.0), (0.0, 90.0)])
def test_sphere_branch_makes_sin_elevation_uniform_and_degree_branch_the_angle(low_high):
    low, high = low_high
    s_low, s_high = math.sin(math.radians(low)), math.sin(math.radians(high))
    sin_uniform = lambda e: (torch.sin(torch.deg2rad(e)) - s_low) / (s_high - s_low)  # noqa: E731
    deg_uniform = lambda e: (e - low) / (high - low)  # noqa: E731
    n = 20000  # the two laws differ by sup |ΔF| = 0.04 on [−10°, 45°]: resolve that
    sphere = draw(n, 1, elevation_range=list(low_high), elevation_sphere_prob=1.0).elevation_deg
    degrees = draw(n, 1, elevation_range=list(low_high), elevation_sphere_prob=0.0).elevation_deg
    assert ks_distance(sphere, sin_uniform) < ks_limit(n) < ks_distance(sphere, deg_uniform)
    assert ks_distance(degrees, deg_uniform) < ks_limit(n) < ks_distance(degrees, sin_uniform)
    assert sphere.min() >= low and sphere.max() <= high


def test_the_elevation_branch_is_chosen_per_batch_with_the_configured_probability():
    n, batches, low, high = 400, 60, 0.0, 90.0
    sin_uniform = lambda e: torch.sin(torch.deg2rad(e))  # noqa: E731
    deg_uniform = lambda e: e / 90  # noqa: E731
    sphere_batches = 0
    for seed in range(batches):
        e = draw(n, seed, elevation_range=[low, high]).elevation_deg  # default probability 0.5
        fits_sphere, fits_degrees = ks_distance(e, sin_uniform) < ks_limit(n), ks_distance(e, deg_uniform) < ks_limit(n)
        assert fits_sphere != fits_degrees, seed  # the whole batch comes from one branch
        sphere_batches += fits_sphere
    assert 15 <= sphere_batches <= 45  # Binomial(60, 0.5): far outside this is not p = 0.5


def test_camera_position_perturbation_is_uniform_within_its_bound():
    p, n = 0.1, 2000
    cams = draw(n, 2, camera_perturb=p, center_perturb=0.0, up_perturb=0.0)
    orbit = orbit_cameras(cams.elevation_deg, cams.azimuth_deg, cams.distance, cams.fovy_deg, 16, 16)
    offset = (cams.c2w[:, :3, 3] - orbit.c2w[:, :3, 3]).double()
    assert offset.abs().max() <= p + 1e-6
    for axis in range(3):  # each coordinate uniform on [−p, p]
        assert ks_distance(offset[:, axis], lambda x: (x + p) / (2 * p)) < ks_limit(n)
    # still looking at the origin: the optical axis (−z of the camera) passes through it
    position, forward = cams.c2w[:, :3, 3].double(), -cams.c2w[:, :3, 2].double()
    assert torch.linalg.cross(forward, -position, dim=-1).norm(dim=-1).max() < 1e-5


def test_center_and_up_perturbations_have_the_configured_spread():
    sigma, n = 0.2, 4000
    cams = draw(n, 3, camera_perturb=0.0, center_perturb=sigma, up_perturb=0.0)
    position, forward = cams.c2w[:, :3, 3].double(), -cams.c2w[:, :3, 2].double()
    torch.testing.assert_close(position.norm(dim=-1), cams.distance.double())  # the position is not moved
    # the look-at centre ~ N(0, σ²I): the origin's distance to the optical axis is the centre's
    # component across the axis, 2 of 3 gaussian coordinates, so its mean square is 2σ²
    miss = torch.linalg.cross(forward, -position, dim=-1).norm(dim=-1)
    assert abs(float(miss.square().mean()) / (2 * sigma**2) - 1) < 0.1

    sigma = 0.02
    cams = draw(n, 4, camera_perturb=0.0, center_perturb=0.0, up_perturb=sigma)
    forward = -cams.c2w[:, :3, 2].double()
    torch.testing.assert_close(forward, -cams.c2w[:, :3, 3].double() / cams.distance.double()[:, None])
    # up = +z + δ, δ ~ N(0, σ²I): to first order the camera's roll (the height of its right axis)
    # is (f_x δ_y − f_y δ_x)/|f_xy|, a N(0, σ²) variable
    roll = cams.c2w[:, 2, 0].double()
    assert abs(float(roll.square().mean().sqrt()) / sigma - 1) < 0.1
    assert not torch.equal(cams.c2w, draw(n, 4, **NO_PERTURB).c2w)


def test_without_perturbations_a_sampled_camera_is_its_orbit_camera():
    cams = draw(16, 5, **NO_PERTURB)
    orbit = orbit_cameras(cams.elevation_deg, cams.azimuth_deg, cams.distance, cams.fovy_deg, 16, 16)
    torch.testing.assert_close(cams.c2w, orbit.c2w)


def test_sampling_is_deterministic_from_the_generator_and_leaves_global_rng_alone():
    global_state = torch.get_rng_state()
    a, b = draw(6, 11), draw(6, 11)
    for name in ("c2w", "fovy_deg", "elevation_deg", "azimuth_deg", "distance"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(123)  # the global RNG has no say
    assert torch.equal(draw(6, 11).c2w, a.c2w)
    assert not torch.allclose(draw(6, 12).c2w, a.c2w)


def test_quantized_orbit_with_perturbations_still_snaps_the_angles():
    cams = draw(12, 6, quantize_deg=15.0)
    for values in (cams.elevation_deg, cams.azimuth_deg):
        torch.testing.assert_close(values / 15, (values / 15).round(), atol=1e-4, rtol=0)
    orbit = orbit_cameras(cams.elevation_deg, cams.azimuth_deg, cams.distance, cams.fovy_deg, 16, 16)
    assert not torch.allclose(cams.c2w, orbit.c2w)  # perturbations are not quantized away


def test_look_at_with_centre_and_up_and_cameras_from_c2w():
    gen = torch.Generator().manual_seed(0)
    position = 2 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    center = 0.3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    up = torch.tensor([0.0, 0.0, 1.0]) + 0.1 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    c2w = look_at_c2w(position, center, up)
    rotation = c2w[:, :3, :3]
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    assert (torch.linalg.det(rotation) > 0).all()
    to_center = (center - position) / (center - position).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(-rotation[:, :, 2], to_center)
    # `up` lies in the plane of the camera's up and view axes, on the up side
    assert ((rotation[:, :, 0] * up).sum(-1).abs() < 1e-9).all() and ((rotation[:, :, 1] * up).sum(-1) > 0).all()

    orbit = orbit_cameras(torch.tensor([-10.0, 30.0, 80.0]), torch.tensor([170.0, -45.0, 0.0]),
                          torch.tensor([1.5, 2.0, 2.5]), torch.tensor([40.0, 50.0, 60.0]), 8, 8)
    back = cameras_from_c2w(orbit.c2w, orbit.fovy_deg, 8, 8)
    for name in ("elevation_deg", "azimuth_deg", "distance"):
        torch.testing.assert_close(getattr(back, name), getattr(orbit, name), atol=1e-4, rtol=0)


@pytest.mark.parametrize("key,value", [("camera_perturb", -0.1), ("center_perturb", -1.0), ("up_perturb", -0.5),
                                       ("elevation_sphere_prob", 1.5), ("elevation_range", [-100.0, 45.0]),
                                       ("distance_range", [0.0, 2.0])])
def test_bad_camera_values_are_user_errors(key, value):
    from dsd.errors import UserError

    cfg = Config(prompt="a cat", camera=CameraConfig(**{key: value}))
    with pytest.raises(UserError, match=f"camera.{key}"):
        validate(cfg)


@pytest.mark.parametrize("fovy", ["[0,50]", "[40,180]", "[-5,60]"])
def test_fovy_outside_0_180_is_a_user_error(compose, fovy):
    from dsd.config import validate
    from dsd.errors import UserError

    with pytest.raises(UserError, match="camera.fovy_range"):
        validate(compose(f"camera.fovy_range={fovy}"))
