"""CFD (guidance=cfd): the world-map noise's consistency and variance, the gradient against its formula
written out here, the official t schedule, end to end on 2D/3D analytic and the tiny SD, bad config;
noise=gaussians: rendered per-gaussian noise (unit variance, per seed, consistent across views, its
gradient against a compositor written here, densification bookkeeping, resume)."""

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
from dsd.priors.procedural import text_seed
from dsd.representations.gaussians import GaussiansConfig, GaussiansRepresentation
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


def context(prior, x, seeds, step, steps, cameras=None, representations=None):
    cond = prior.condition(PROMPT, len(seeds), cameras=cameras)
    eps_star = torch.stack([seed_noise(s, prior.sample_shape) for s in seeds])
    return GuidanceContext(prior, cond, seeds, eps_star, [step_generator(s) for s in seeds], step, steps, cameras,
                           representations)


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
    {"noise": "gaussian_splats"}, {"weighting": "snr"}, {"t_min": 0.5, "t_max": 0.4},
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


@pytest.mark.parametrize("representation", [("representation=image", "representation.space=latent"), FAST_3D,
                                            (*FAST_3D, "guidance.noise=gaussians")],
                         ids=["2d_latent", "3d_gaussians", "3d_attached_noise_at_latent_size"])
def test_tiny_stable_diffusion_end_to_end(compose, tmp_path, tiny_sd, representation):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "guidance=cfd", *representation,
                          "seeds=[0,1]", "trainer.steps=2"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [2, 2]
    for seed in (0, 1):
        assert np.isfinite(load_result(tmp_path / f"seed_{seed}/result.npz")).all()


# ---- noise=gaussians: noise attached to each gaussian, rendered ----------------------------------------


def gaussians(prior, n, seed, means, scale=0.03, opacity=0.8, flat=False):
    """A representation with the given means and random colours."""
    rep = GaussiansRepresentation(GaussiansConfig(num_points=n), prior)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rep.means.data = means
        scales = torch.tensor([0.002 if flat else scale, scale, scale])  # flat: a disc facing +x
        rep.log_scales.data = scales.log().repeat(n, 1)
        rep.quats.data = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1) if not flat \
            else rep.quats.data
        rep.opacity_logits.data = torch.full((n,), opacity).logit()
        rep.color_logits.data = torch.randn(n, 3, generator=g)
    return rep


def ball(n, seed, radius=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * radius * torch.rand(n, 1, generator=g)


def attached(prior, rep, cams, seed, x=None):
    x = torch.zeros(len(cams), *prior.sample_shape) if x is None else x
    ctx = context(prior, x, [seed] * len(cams), 0, 10, cams, [rep] * len(cams))
    return CFD(CFDConfig(noise="gaussians"), prior).noise(x, ctx)


def test_rendered_noise_has_unit_variance_per_pixel_over_seeds():
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=8))
    cams = orbit_cameras(torch.tensor([0.0, 40.0]), torch.tensor([0.0, 100.0]), torch.full((2,), 2.0),
                         torch.full((2,), 50.0), 8, 8)
    rep = gaussians(prior, 120, 0, ball(120, 0), scale=0.06, opacity=0.5)
    alpha = rep.render(cams, with_alpha=True)[:, 3].detach()
    assert ((alpha > 0.2) & (alpha < 0.8)).any() and (alpha > 0.95).any() and (alpha < 0.05).any()  # all cases
    samples = []
    for seed in range(150):
        rep.noise = rep.noise_stream = None  # this seed's own noise vectors
        samples.append(attached(prior, rep, cams, seed))
    samples = torch.stack(samples)  # (seeds, views, C, 8, 8)
    per_pixel_var = samples.var(dim=0)
    assert abs(float(per_pixel_var.mean()) - 1) < 0.05 and abs(float(samples.mean())) < 0.05
    assert float((per_pixel_var - 1).abs().max()) < 0.5  # 150 draws a pixel: sd of the variance ≈ 0.12
    partial = (alpha > 0.2) & (alpha < 0.8)  # where foreground and background noise mix
    assert abs(float(per_pixel_var.transpose(0, 1)[:, partial].mean()) - 1) < 0.1


def test_rendered_noise_is_the_seeds_own_and_follows_the_surface_across_nearby_views():
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=16))
    n = 1500  # a wall of small flat gaussians in the plane x = 0, facing the camera at azimuth 0
    wall = torch.cat([torch.zeros(n, 1), (torch.rand(n, 2, generator=torch.Generator().manual_seed(5)) - 0.5) * 1.6], 1)
    base = one_camera(0, 0)
    f = 0.5 * 16 / math.tan(math.radians(25.0))
    moved = Cameras(base.c2w.clone(), base.fovy_deg, base.elevation_deg, base.azimuth_deg, base.distance, 16, 16)
    moved.c2w[:, :3, 3] += (2 * 2.0 / f) * base.c2w[:, :3, 0]  # 2 px to the right at the wall's depth 2
    cams = Cameras.cat([base, moved])
    noise = attached(prior, gaussians(prior, n, 1, wall, scale=0.02, opacity=0.9, flat=True), cams, 3)
    again = attached(prior, gaussians(prior, n, 1, wall, scale=0.02, opacity=0.9, flat=True), cams, 3)
    assert torch.equal(noise, again)  # same seed, same cameras
    other = attached(prior, gaussians(prior, n, 1, wall, scale=0.02, opacity=0.9, flat=True), cams, 4)
    assert (noise - other).abs().mean() > 0.5
    rgba = gaussians(prior, n, 1, wall, scale=0.02, opacity=0.9, flat=True).render(cams, with_alpha=True).detach()
    # the moved camera sees at column j what the first saw at column j + 2: colours and noise alike
    torch.testing.assert_close(rgba[1, :, :, :12], rgba[0, :, :, 2:14], atol=1e-3, rtol=0)
    covered = (rgba[0, 3, :, 2:14] > 0.95) & (rgba[1, 3, :, :12] > 0.95)
    assert covered.sum() > 50
    first, second = noise[0, :, :, 2:14][:, covered].flatten(), noise[1, :, :, :12][:, covered].flatten()
    assert float(torch.corrcoef(torch.stack([first, second]))[0, 1]) > 0.95
    unshifted = noise[0, :, :, :12][:, covered].flatten()  # the same pixel, another point of the wall
    assert abs(float(torch.corrcoef(torch.stack([unshifted, second]))[0, 1])) < 0.3


def quat_matrix(q):
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def naive_blend(rep, camera, features, size):
    """Σ w f, Σ w², T per pixel by the 3DGS formulas, pixel by pixel, all gaussians: EWA projection
    (Σ' = J W Σ Wᵀ Jᵀ + 0.3 I), α = min(0.999, o·exp(−½ dᵀΣ'⁻¹d)) dropped below 1/255, near to far."""
    means, scales = rep.means.detach().double(), rep.log_scales.detach().exp().double()
    rotation = quat_matrix(rep.quats.detach().double())
    cov = rotation @ torch.diag_embed(scales**2) @ rotation.transpose(1, 2)
    c2w = camera.c2w[0].double()
    to_cam = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)) @ c2w[:3, :3].T  # OpenCV axes
    p = (means - c2w[:3, 3]) @ to_cam.T
    f = 0.5 * size / math.tan(math.radians(float(camera.fovy_deg[0])) / 2)
    x, y, z = p.unbind(-1)
    centre = torch.stack([f * x / z + size / 2, f * y / z + size / 2], -1)
    jac = torch.zeros(len(p), 2, 3, dtype=torch.float64)
    jac[:, 0, 0], jac[:, 0, 2], jac[:, 1, 1], jac[:, 1, 2] = f / z, -f * x / z**2, f / z, -f * y / z**2
    cov2 = jac @ to_cam @ cov @ to_cam.T @ jac.transpose(1, 2) + 0.3 * torch.eye(2, dtype=torch.float64)
    inverse, order = torch.linalg.inv(cov2), z.argsort()
    opacity = rep.opacity_logits.detach().double().sigmoid()
    out = torch.zeros(features.shape[1] + 2, size, size, dtype=torch.float64)
    for row in range(size):
        for col in range(size):
            d = torch.tensor([col + 0.5, row + 0.5], dtype=torch.float64) - centre[order]
            alpha = (opacity[order] * torch.exp(-0.5 * torch.einsum("ni,nij,nj->n", d, inverse[order], d))).clamp(max=0.999)
            alpha = torch.where(alpha < 1 / 255, torch.zeros_like(alpha), alpha)
            transmittance = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - alpha, 0)[:-1]])
            w = alpha * transmittance
            out[:, row, col] = torch.cat([w @ features[order].double(), (w * w).sum()[None], (1 - w.sum())[None]])
    return out


def test_attached_noise_gradient_is_the_cfd_formula_with_the_blended_gaussian_noise():
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=8))
    cams = orbit_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 60.0]), torch.full((2,), 2.0),
                         torch.full((2,), 50.0), 8, 8)
    rep = gaussians(prior, 40, 2, ball(40, 2, radius=0.4), scale=0.08, opacity=0.6)
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(3)) * 0.5
    seed, step, steps = 5, 3, 10
    ctx = context(prior, x, [seed, seed], step, steps, cams, [rep, rep])
    grad, info = CFD(CFDConfig(noise="gaussians"), prior).grad(x, ctx)
    # the seed's per-gaussian noise: the first draw of its own stream, documented in dsd.guidance.cfd
    point = torch.randn(40, 3, generator=torch.Generator().manual_seed(text_seed(f"cfd-gaussian-noise:{seed}")))
    background = seed_noise(seed, prior.sample_shape).double()
    eps = []
    for view in range(2):
        out = naive_blend(rep, cams.rows([view]), point, 8)
        blended, square, t_final = out[:3], out[3], out[4]
        eps.append((blended + t_final * background) / (square + t_final**2).sqrt())
    eps = torch.stack(eps).float()
    t = round(1000 * (0.96 * (1 - step / steps) + 0.02))
    a = prior.alphas_cumprod[t].float()
    eps_hat = cfg_eps(prior, a.sqrt() * x + (1 - a).sqrt() * eps, torch.full((2,), t), ctx.cond, 8.0)
    assert info["t"] == t
    torch.testing.assert_close(grad, ((1 - a) / a).sqrt() * (eps_hat - eps), rtol=1e-4, atol=1e-4)


def test_point_noise_follows_its_gaussian_through_densification_and_is_deterministic():
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=8))

    def densified():
        rep = gaussians(prior, 60, 0, ball(60, 0), scale=0.02)
        with torch.no_grad():
            rep.log_scales.data[::3] = math.log(0.05)  # large: split; the others are cloned
            rep.opacity_logits.data[1::7] = -20.0  # transparent: pruned
        before = rep.point_noise(123, 4).clone()
        rep.grad_sum.fill_(1.0)
        rep.grad_count.fill_(1.0)
        rep.cfg.grad_threshold, rep.cfg.max_points, rep.cfg.split_scale = 0.0, 200, 0.03
        old_means = rep.means.detach().clone()
        rep.densify_and_prune(rep.make_optimizer("adam", 0.01), torch.Generator().manual_seed(0))
        return rep, before, old_means

    rep, before, old_means = densified()
    assert rep.noise.shape == (rep.num_points, 4) and rep.num_points > 60
    # a gaussian's first occurrence keeps its vector; a clone (same mean) gets a fresh one
    seen = set()
    for i in range(rep.num_points):
        match = (old_means == rep.means.detach()[i]).all(1).nonzero()
        if len(match) and int(match[0]) not in seen:
            seen.add(int(match[0]))
            assert torch.equal(rep.noise[i], before[int(match[0])])
        else:  # a clone or a split child: not any existing gaussian's vector
            assert (rep.noise[i] - before).abs().amax(1).min() > 1e-3
    kept = sum(1 for i in range(60) if i % 3 and (i - 1) % 7)  # neither split nor pruned: kept and cloned
    split = sum(1 for i in range(0, 60, 3) if (i - 1) % 7)  # large and opaque: two children each
    assert len(seen) == kept and rep.num_points == 2 * kept + 2 * split
    again, _, _ = densified()
    assert torch.equal(rep.noise, again.noise)  # fresh vectors from the seed's stream: reproducible
    # a checkpoint carries the vectors and the stream: the restored copy draws what the original draws
    restored = GaussiansRepresentation(GaussiansConfig(num_points=5), prior)
    restored.load_state_dict(rep.state_dict())
    assert torch.equal(restored.point_noise(999, 4), rep.noise)
    assert torch.equal(restored._draw_noise(3), rep._draw_noise(3))
    assert (rep._draw_noise(3) - rep._draw_noise(3)).abs().min() > 0  # the stream advances


def test_attached_noise_needs_gaussians(compose, tmp_path):
    with pytest.raises(UserError, match="guidance.noise=gaussians"):
        run(compose("guidance=cfd", "guidance.noise=gaussians", "prior.image_size=16", "seeds=1",
                    "trainer.steps=2", "trainer.checkpoint_every=0"), tmp_path)


def test_3d_attached_noise_end_to_end_resumes_bit_exact_through_densification(compose, tmp_path, interrupt_at_step):
    overrides = ("experiment=demo", "guidance=cfd", "guidance.noise=gaussians", *FAST_3D, "camera.video_frames=0",
                 "prior.image_size=16", "seeds=[0,1]", "trainer.steps=4", "trainer.checkpoint_every=2",
                 "representation.densify_from=1", "representation.densify_every=2",
                 "representation.grad_threshold=0", "representation.max_points=300")
    run(compose(*overrides), tmp_path / "straight")
    interrupt_at_step(3)  # after the densification of step 1; the one of step 3 draws from the restored stream
    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "resumed")
    interrupt_at_step(None)
    ckpt = torch.load(tmp_path / "resumed/seed_0/checkpoint.pt", weights_only=False)["representation"]
    assert len(ckpt["means"]) > 100 and ckpt["noise"].shape == (len(ckpt["means"]), 3)  # densified, noise follows
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    results = {}
    for seed in (0, 1):
        straight = load_result(tmp_path / f"straight/seed_{seed}/result.npz")
        np.testing.assert_array_equal(load_result(tmp_path / f"resumed/seed_{seed}/result.npz"), straight)
        results[seed] = straight
    assert np.abs(results[0] - results[1]).max() > 1e-3
