"""CFD (guidance=cfd): the world-map noise's consistency and variance, the gradient against its formula
written out here, the official t schedule, end to end on 2D/3D analytic and the tiny SD, bad config."""

import math

import numpy as np
import pytest
import torch

from dsd.cameras import Cameras, orbit_cameras
from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.guidance.cfd import CFD, CFDConfig, cfd_timestep, world_map, world_map_noise
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.run import run
from dsd.seeding import seed_noise, step_generator

PROMPT = "a hamburger"
FAST_3D = ("representation=gaussians", "representation.num_points=100", "camera.video_frames=2",
           "camera.video_resolution=16", "camera.eval_views=2", "trainer.checkpoint_every=0")


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=16))


def one_camera(elevation, azimuth, distance=2.0, fov=50.0, size=16):
    full = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    return orbit_cameras(full(elevation), full(azimuth), full(distance), full(fov), size, size)


def pinhole_directions(cameras: Cameras, size: int) -> torch.Tensor:
    """Unit world directions of the pixel centres (V, size, size, 3), written out independently."""
    f = 0.5 * size / math.tan(math.radians(float(cameras.fovy_deg[0])) / 2)
    centre = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / f
    y, x = torch.meshgrid(-centre, centre, indexing="ij")  # row 0 at the top: camera +y
    d = torch.stack([x, y, -torch.ones_like(x)], -1)
    world = torch.einsum("vab,hwb->vhwa", cameras.c2w[:, :3, :3].double(), d)
    return world / world.norm(dim=-1, keepdim=True)


def noise_of(seed, cameras, size=16, channels=4, resolution=80):
    maps = world_map(seed, channels, resolution)[None].expand(len(cameras), -1, -1)
    return world_map_noise(maps, cameras, (size, size), 4, resolution)


def test_world_map_noise_depends_only_on_ray_directions():
    base = one_camera(20, 30)
    moved = Cameras(base.c2w.clone(), base.fovy_deg, base.elevation_deg, base.azimuth_deg, base.distance, 16, 16)
    moved.c2w[:, :3, 3] += torch.tensor([0.3, -0.2, 0.4])  # translated: every pixel sees the same direction
    rolled = Cameras(base.c2w.clone(), base.fovy_deg, base.elevation_deg, base.azimuth_deg, base.distance, 16, 16)
    rolled.c2w[:, :3, :2] *= -1  # rolled 180° about the view axis: pixel (i, j) sees what (15−i, 15−j) saw
    a, b, c = noise_of(0, base), noise_of(0, moved), noise_of(0, rolled)
    assert torch.equal(a, b)
    equal = (a - c.flip(-1, -2)).abs() < 1e-5
    assert equal.float().mean() > 0.97  # a sub-ray exactly on a cell border may round either way
    assert (a - noise_of(1, base)).abs().mean() > 0.5  # and it is the seed's own


@pytest.mark.parametrize("yaw, elevation", [(7.0, 10.0), (-11.0, 40.0)])
def test_one_world_direction_gets_the_same_noise_in_two_views(yaw, elevation):
    first, second = one_camera(elevation, 0), one_camera(elevation, yaw)  # orbit: both views see most directions
    d1, d2 = pinhole_directions(first, 16)[0].reshape(-1, 3), pinhole_directions(second, 16)[0].reshape(-1, 3)
    pixel_angle = math.radians(50.0) / 16
    angle, nearest = torch.acos((d2 @ d1.T).clamp(-1, 1)).min(dim=1)  # view-2 pixel -> closest view-1 pixel
    close = angle < 0.1 * pixel_angle  # the same direction, to a tenth of a pixel
    assert close.sum() >= 10
    n1, n2 = noise_of(3, first).reshape(4, -1), noise_of(3, second).reshape(4, -1)
    same = n2[:, close].flatten(), n1[:, nearest[close]].flatten()
    correlation = float(torch.corrcoef(torch.stack(same))[0, 1])
    assert correlation > 0.75  # the two footprints overlap by >= 81 %: equal up to the cell cut
    other = n1[:, (nearest[close] + 37) % 256].flatten()  # other directions: unrelated
    assert abs(float(torch.corrcoef(torch.stack([same[0], other]))[0, 1])) < 0.3


def test_world_map_noise_has_unit_variance_per_pixel_and_little_neighbour_correlation():
    cams = orbit_cameras(torch.tensor([0.0, 30.0, 60.0, 85.0]), torch.tensor([0.0, 40.0, 90.0, 170.0]),
                         torch.full((4,), 2.0), torch.full((4,), 50.0), 8, 8)
    samples = torch.stack([noise_of(seed, cams, size=8, channels=1, resolution=40) for seed in range(150)])
    per_pixel_var = samples.var(dim=0)  # over seeds: (4 views, 1, 8, 8)
    assert abs(float(per_pixel_var.mean()) - 1) < 0.05 and abs(float(samples.mean())) < 0.05
    assert float((per_pixel_var - 1).abs().max()) < 0.5  # 150 draws a pixel: sd of var ≈ 0.12
    horizontal = (samples[..., 1:] * samples[..., :-1]).mean()
    assert abs(float(horizontal)) < 0.15


def context(prior, x, seeds, step, steps, cameras=None):
    cond = prior.condition(PROMPT, len(seeds), cameras=cameras)
    eps_star = torch.stack([seed_noise(s, prior.sample_shape) for s in seeds])
    return GuidanceContext(prior, cond, seeds, eps_star, [step_generator(s) for s in seeds], step, steps, cameras)


def cfg_eps(prior, x_t, t, cond, g):
    rows = len(x_t)
    eps_c = prior.predict_eps(x_t, t, cond, torch.zeros(rows, dtype=torch.bool))
    eps_u = prior.predict_eps(x_t, t, cond, torch.ones(rows, dtype=torch.bool))
    return eps_u + g * (eps_c - eps_u)


@pytest.mark.parametrize("step", [0, 13, 39])
def test_2d_gradient_is_the_cfd_formula_with_the_seed_noise(prior, step):
    seeds, steps = [0, 4], 40
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(9)) * 0.5
    guidance = CFD(CFDConfig(), prior)
    grad, info = guidance.grad(x, context(prior, x, seeds, step, steps))
    t = round(1000 * (0.96 * (1 - step / steps) + 0.02))  # 0.98 -> 0.02 linearly (their 2d.yaml)
    a = prior.alphas_cumprod[t].float()
    eps = torch.stack([seed_noise(s, prior.sample_shape) for s in seeds])
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    eps_hat = cfg_eps(prior, x_t, torch.full((2,), t), prior.condition(PROMPT, 2), 8.0)
    expected = ((1 - a) / a).sqrt() * (eps_hat - eps)
    assert info["t"] == t
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def test_3d_gradient_uses_the_world_map_noise_of_each_view(prior):
    cams = orbit_cameras(torch.tensor([10.0, 25.0]), torch.tensor([0.0, 120.0]), torch.full((2,), 2.0),
                         torch.full((2,), 50.0), 16, 16)
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(2)) * 0.5
    guidance = CFD(CFDConfig(weighting="uniform", cfg_scale=5.0), prior)
    ctx = context(prior, x, [7, 7], 5, 10, cams)
    grad, _ = guidance.grad(x, ctx)
    eps = noise_of(7, cams, channels=3, resolution=guidance.map_resolution)
    assert (eps - ctx.eps_star).abs().mean() > 0.5  # not the image-space ε*
    t = round(1000 * (0.96 * 0.5 + 0.02))
    a = prior.alphas_cumprod[t].float()
    eps_hat = cfg_eps(prior, a.sqrt() * x + (1 - a).sqrt() * eps, torch.full((2,), t), ctx.cond, 5.0)
    torch.testing.assert_close(grad, eps_hat - eps, rtol=1e-4, atol=1e-5)


def test_piecewise_schedule_matches_the_official_t_scheduler():
    knots = dict(t_progress_at=[0.0, 0.1, 0.5, 1.0], t_progress=[0.0, 0.3, 0.6, 0.8])  # sd-stage1.yaml:91-93
    steps_at, progress = [0, 2500, 12500, 25000], knots["t_progress"]
    cfg = CFDConfig(**knots)
    for step in (0, 1, 2499, 2500, 3000, 12600, 24999):
        k = next(i for i in range(1, 4) if step < steps_at[i])  # their segment: first knot above the step
        s0, s1 = steps_at[k - 1], steps_at[k]
        p = progress[k - 1] * (s1 - step) / (s1 - s0) + progress[k] * (step - s0) / (s1 - s0)
        official = round(1000 * ((0.98 - 0.02) * (1 - p) + 0.02))
        assert cfd_timestep(cfg, step, 25000, 1000) == official


@pytest.mark.parametrize("values", [
    {"noise": "gaussian"}, {"weighting": "snr"}, {"t_min": 0.5, "t_max": 0.4},
    {"t_progress_at": [0.0, 1.0, 0.5], "t_progress": [0.0, 0.5, 1.0]}, {"t_progress": [0.0]},
    {"supersample": 0}, {"map_resolution": 0},
], ids=["noise", "weighting", "t_range", "knots_order", "knots_length", "supersample", "map_resolution"])
def test_bad_config_is_a_user_error(prior, values):
    with pytest.raises(UserError, match="guidance\\."):
        CFD(CFDConfig(**values), prior)


def test_2d_analytic_end_to_end(compose, tmp_path):
    summary = run(compose("guidance=cfd", "prior.image_size=16", "seeds=2", "trainer.steps=4",
                          "trainer.checkpoint_every=0"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [4, 4]
    assert summary["prior_rows_per_step"] == 2.0  # one guided call: cond + uncond per render row
    images = [load_result(tmp_path / f"seed_{s}/result.npz") for s in (0, 1)]
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_3d_analytic_end_to_end(compose, tmp_path):
    summary = run(compose("experiment=demo", "guidance=cfd", *FAST_3D, "prior.image_size=16", "seeds=[0,1]",
                          "trainer.steps=3", "camera.views_per_step=2"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [3, 3]
    assert summary["prior_rows_per_step"] == 4.0  # 2 views x (cond + uncond)


@pytest.mark.parametrize("representation", [("representation=image", "representation.space=latent"), FAST_3D],
                         ids=["2d_latent", "3d_gaussians"])
def test_tiny_stable_diffusion_end_to_end(compose, tmp_path, tiny_sd, representation):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "guidance=cfd", *representation,
                          "seeds=[0,1]", "trainer.steps=2"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [2, 2]
    for seed in (0, 1):
        assert np.isfinite(load_result(tmp_path / f"seed_{seed}/result.npz")).all()
