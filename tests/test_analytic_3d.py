"""The analytic prior in 3D: shapes rendered from the row's camera, exact mixture denoiser."""

import math

import numpy as np
import pytest
import torch

from dsd.cameras import orbit_cameras, sample_cameras, turntable
from dsd.config import CameraConfig
from dsd.outputs import make_grid
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.base import add_noise
from dsd.priors.shapes import reference_shapes
from dsd.representations.gaussians import GaussiansConfig, GaussiansRepresentation


def make_prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=16, num_references=4, pool=["a cat", "a cup"]))


def views(azimuths, size=16):
    n = len(azimuths)
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    return orbit_cameras(full(15), torch.tensor(azimuths, dtype=torch.float64), full(2.0), full(50), size, size)


def make_prior_of(data):
    return AnalyticPrior(AnalyticPriorConfig(image_size=16, num_references=4, pool=["a cat", "a cup"], data=data))


@pytest.mark.parametrize("data", ["colourways", "separated"])
def test_reference_shapes_are_deterministic_distinct_and_view_dependent(data):
    a, b = make_prior_of(data), make_prior_of(data)
    cams = views([0.0, 90.0, 180.0])
    ra, rb = a.reference_renders("a cat", cams), b.reference_renders("a cat", cams)
    assert ra.shape == (4, 3, 3, 16, 16) and torch.equal(ra, rb)
    assert ra.min() >= 0 and ra.max() <= 1
    # an object is in view: the centre differs from the white background, the corners do not
    assert (ra[:, :, :, 7:9, 7:9] < 0.95).any(dim=2).all()
    torch.testing.assert_close(ra[:, :, :, 0, 0], torch.ones_like(ra[:, :, :, 0, 0]), atol=0.02, rtol=0)
    flat = ra.reshape(4, -1)
    assert (torch.cdist(flat, flat) + torch.eye(4) * 1e9).min() > (1.0 if data == "separated" else 0.3)
    assert not torch.allclose(ra[:, 0], ra[:, 2], atol=1e-2)  # the front is not the back


def test_3d_denoiser_is_the_exact_posterior_over_the_rows_renders():
    prior = make_prior()
    cams = views([30.0, -120.0])
    cond = prior.condition("a cup", batch=2, cameras=cams)
    refs = prior.encode(prior.reference_renders("a cup", cams).double())  # (K, 2, 3, S, S)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([200, 700])
    x0 = refs[torch.tensor([1, 3]), torch.arange(2)] + 0.2 * torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), prior.alpha(t)).float()
    eps = prior.predict_eps(x_t, t, cond, torch.tensor([False, False]))
    for row in range(2):
        a = float(prior.alpha(t[row : row + 1]))
        table = refs[:, row].reshape(4, -1)
        comps = torch.distributions.Normal(math.sqrt(a) * table, math.sqrt(1 - a))
        weights = torch.softmax(comps.log_prob(x_t[row].reshape(1, -1).double()).sum(-1), 0)
        mean = (weights[:, None] * table).sum(0)
        expected = (x_t[row].reshape(-1).double() - math.sqrt(a) * mean) / math.sqrt(1 - a)
        torch.testing.assert_close(eps[row].reshape(-1).double(), expected, atol=2e-5, rtol=1e-4)


def test_camera_sampling_is_per_seed_deterministic_and_quantized():
    # experiment=demo's cameras: no perturbations, so the quantized orbit is the whole camera
    cfg = CameraConfig(quantize_deg=15.0, distance_range=[2.0, 2.0], camera_perturb=0.0, center_perturb=0.0,
                       up_perturb=0.0)
    a = sample_cameras(torch.Generator().manual_seed(3), 5, cfg, 16)
    b = sample_cameras(torch.Generator().manual_seed(3), 5, cfg, 16)
    assert torch.equal(a.c2w, b.c2w)
    for values in (a.elevation_deg, a.azimuth_deg):
        np.testing.assert_allclose(values.numpy() / 15, np.round(values.numpy() / 15), atol=1e-4)
    assert (a.elevation_deg >= -15).all() and (a.elevation_deg <= 45).all()
    torch.testing.assert_close(a.c2w[:, :3, 3].norm(dim=-1), torch.full((5,), 2.0))
    # the condition (and ODE cache key) of such a camera is its orbit camera's
    prior = make_prior()
    orbit = orbit_cameras(a.elevation_deg, a.azimuth_deg, a.distance, a.fovy_deg, 16, 16)
    assert torch.equal(prior.condition("a cat", 5, a).view, prior.condition("a cat", 5, orbit).view)


def gaussians_of(shape, prior) -> GaussiansRepresentation:
    """Our gaussians representation holding exactly one reference shape's gaussians."""
    rep = GaussiansRepresentation(GaussiansConfig(num_points=len(shape.means), backend="torch",
                                                  background=list(prior.cfg.background)), prior)
    with torch.no_grad():
        rep.means.copy_(shape.means)
        rep.quats.copy_(shape.quats)
        rep.log_scales.copy_(shape.scales.log())
        rep.opacity_logits.copy_(shape.opacities.logit())
        rep.color_logits.copy_(shape.colors.clamp(1e-6, 1 - 1e-6).logit())
    return rep


def test_references_are_rendered_from_the_real_perturbed_camera():
    """The analytic condition is the camera the representation renders from: a reference shape
    put into our gaussians representation renders, from perturbed training cameras, what the
    prior's references show; the orbit the camera was sampled around shows something else."""
    prior = make_prior()
    cfg = CameraConfig(camera_perturb=0.3, center_perturb=0.2, up_perturb=0.1, elevation_range=[0.0, 30.0])
    cams = sample_cameras(torch.Generator().manual_seed(7), 3, cfg, 16)
    k = 1
    rep = gaussians_of(reference_shapes("a cat", 4)[k], prior)
    with torch.no_grad():
        ours = rep.render(cams)
        orbit = rep.render(orbit_cameras(cams.elevation_deg, cams.azimuth_deg, cams.distance, cams.fovy_deg, 16, 16))
    refs = prior.reference_renders("a cat", cams)[k]  # (V, 3, S, S)
    torch.testing.assert_close(refs, ours, atol=1e-4, rtol=0)
    assert (refs - orbit).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_grid_has_one_row_per_seed_for_views_and_one_row_for_images():
    four_views = [np.zeros((4, 8, 8, 3)), np.ones((4, 8, 8, 3))]
    rows_grid = make_grid(four_views, ["seed 0", "seed 1"], tile=20)
    single = make_grid([np.zeros((8, 8, 3))] * 3, ["a", "b", "c"], tile=20)
    assert rows_grid.size[0] > rows_grid.size[1] > single.size[1]  # 4 columns, 2 rows vs one row
    assert single.size[0] > single.size[1]


def test_turntable_starts_at_the_front():
    cams = turntable(4, 0.0, 2.0, 50.0, 16, 16)
    torch.testing.assert_close(cams.azimuth_deg, torch.tensor([0.0, 90.0, -180.0, -90.0]))


def test_reference_render_cache_is_bounded(monkeypatch):
    import dsd.priors.analytic as analytic

    monkeypatch.setattr(analytic, "RENDER_CACHE_VIEWS", 2)
    prior = make_prior()
    for azimuth in (0.0, 30.0, 60.0, 0.0):
        prior.reference_renders("a cup", views([azimuth]))
    assert len(prior._render_cache) == 2
    assert [key[0][:3] for key in prior._render_cache][-1] == tuple(views([0.0]).c2w[0, 0, :3].double().tolist())


def test_default_3d_data_decides_gradually_from_each_view():
    """As in 2D: the default shapes (colourways of one object) are not decided by the noise at
    t = T from any evaluation view; the `separated` shapes mostly are."""
    from dsd.cameras import eval_cameras
    from dsd.metrics.decision import decision_curve

    seeds = list(range(32))
    cams = eval_cameras(CameraConfig(), 2, 32)
    for data, at_g0 in (("colourways", lambda f: f <= 0.5), ("separated", lambda f: f >= 0.6)):
        prior = AnalyticPrior(AnalyticPriorConfig(data=data))
        for view in range(2):
            _, decided = decision_curve(prior, "a hamburger", seeds, camera=cams.rows([view]))
            assert at_g0(float(decided[0])), (data, view, decided.tolist())
            assert decided[-1] == 1.0
