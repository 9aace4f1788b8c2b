"""Multi-view and image-conditioned analytic priors, and the trainer/ODE/guidance side of F-view
objects (one t per object, ε* per view slot, cameras as sets, reference-view loss)."""

import math

import pytest
import torch

from dsd.cameras import Cameras, multiview_order, sample_multiview_cameras, turntable
from dsd.config import CameraConfig
from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.metrics.reference import nearest_reference
from dsd.ode import OdeTrajectories
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig

FAST_3D = ("camera.video_frames=0", "trainer.checkpoint_every=0", "representation=gaussians",
           "representation.num_points=150", "prior.image_size=16")


def make_prior(mode="multiview", **kw):
    cfg = AnalyticPriorConfig(image_size=16, num_references=4, pool=["a cat", "a cup"], mode=mode, **kw)
    return AnalyticPrior(cfg)


def make_prior_like_demo(mode):
    return AnalyticPrior(AnalyticPriorConfig(mode=mode))  # the defaults: K = 8, 32 px, 8-prompt pool


def one_object(azimuth0=10.0, views=4, size=16):
    az = azimuth0 + torch.arange(views, dtype=torch.float64) * 360 / views
    full = lambda v: torch.full((views,), float(v), dtype=torch.float64)  # noqa: E731
    from dsd.cameras import orbit_cameras

    return orbit_cameras(full(15), az, full(2.0), full(50), size, size)


def joint_eps_reference(prior, prompt, cams, x_t, a):
    """Exact ε̂ of one object written out directly: the joint posterior over the prompt's K shapes
    is Π_f N(x_f; √a·R_k^f, (1−a)I); every view's E[x0] uses it."""
    refs = prior.reference_renders(prompt, cams).double() * 2 - 1  # (K, F, 3, S, S) in [−1, 1]
    x = x_t.double()
    log_like = torch.stack([
        sum(-((x[f] - math.sqrt(a) * refs[k, f]) ** 2).sum() / (2 * (1 - a)) for f in range(len(cams)))
        for k in range(len(refs))
    ])  # fmt: skip
    w = torch.softmax(log_like, 0)
    mean = (w[:, None, None, None, None] * refs).sum(0)  # (F, 3, S, S)
    return (x - math.sqrt(a) * mean) / math.sqrt(1 - a), w


def test_multiview_posterior_is_the_joint_posterior_of_the_object_views():
    prior = make_prior()
    cams = one_object()
    g = torch.Generator().manual_seed(0)
    t = 600
    a = float(prior.alphas_cumprod[t])
    x0 = prior.reference_renders("a cat", cams)[2] * 2 - 1  # shape 2 from all views
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g)
    cond = prior.condition("a cat", 4, cams)
    got = prior.predict_eps(x_t, torch.full((4,), t), cond, torch.zeros(4, dtype=torch.bool))
    want, w = joint_eps_reference(prior, "a cat", cams, x_t, a)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # one posterior for the object: every view's row has the same weights
    post = prior.posterior(x_t, torch.full((4,), t), cond, torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(post, post[:1].expand_as(post))
    k = prior.prompts.index("a cat") * 4
    assert torch.allclose(post[0, k : k + 4].double(), w, atol=1e-6)


def test_one_view_per_sample_is_the_per_view_prior():
    cams = one_object(views=3)
    per_view, single = make_prior("text"), make_prior("multiview", num_views=1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t, unc = torch.tensor([700, 500, 300]), torch.tensor([False, True, False])
    a = per_view.predict_eps(x, t, per_view.condition("a cup", 3, cams), unc)
    b = single.predict_eps(x, t, single.condition("a cup", 3, cams), unc)
    assert torch.equal(a, b)


def test_rows_that_are_not_whole_objects_are_refused():
    prior = make_prior()
    cams = one_object(views=3)
    with pytest.raises(ValueError, match="whole objects"):
        prior.predict_eps(torch.zeros(3, 3, 16, 16), torch.full((3,), 500), prior.condition("a cat", 3, cams),
                          torch.zeros(3, dtype=torch.bool))


def test_multiview_ddim_lands_on_one_shape_in_every_view_where_per_view_does_not(compose, tmp_path):
    """The issue's measurement: with per-view posteriors one ε* means different shapes in different
    views; with the joint posterior DDIM from the seed's F noises lands on one shape everywhere."""
    from dsd.sample import sample

    def per_view_shapes(mode):
        cfg = compose("experiment=demo", f"prior.mode={mode}", "seeds=6", "camera.eval_views=4")
        summary = sample(cfg, tmp_path / mode)
        return summary

    mv = per_view_shapes("multiview")
    from dsd.outputs import load_result, load_views

    views = load_views(tmp_path / "multiview" / "seed_0" / "views.npz")  # every evaluation view, as dsd-run
    assert views.shape == (4, 32, 32, 3)
    assert (views[0] == load_result(tmp_path / "multiview" / "seed_0" / "result.npz")).all()
    assert all(e["reached"] for e in mv["seeds"])  # each sample IS one shape, from every view (joint PSNR)
    assert mv["distinct_references"] >= 3
    # the per-view prior from the same seeds' noise (one ε* for all views, as its trainer): the
    # nearest shape of each view separately
    from dsd.ode import ddim_sample
    from dsd.seeding import seed_noise

    prior = make_prior_like_demo("text")
    cams = turntable(4, 15.0, 2.0, 50.0, 32, 32)
    refs = prior.reference_renders("a hamburger", cams).permute(0, 1, 3, 4, 2)
    disagree = 0
    for seed in range(6):
        eps = seed_noise(seed, prior.sample_shape)[None].expand(4, -1, -1, -1)
        x0 = ddim_sample(prior, eps, prior.condition("a hamburger", 4, cams), 10, 7.5)
        images = prior.decode(x0).permute(0, 2, 3, 1)
        disagree += len({nearest_reference(images[v], refs[:, v])[0] for v in range(4)}) > 1
    assert disagree >= 2


def test_multiview_cameras_are_one_object_of_evenly_spaced_views():
    cfg = CameraConfig(quantize_deg=15, camera_perturb=0, center_perturb=0, up_perturb=0)
    g = torch.Generator().manual_seed(3)
    sets = [sample_multiview_cameras(g, 4, cfg, 16) for _ in range(40)]
    for cams in sets:
        assert len(set(cams.elevation_deg.tolist())) == 1 and len(set(cams.distance.tolist())) == 1
        gaps = torch.diff(cams.azimuth_deg.double()) % 360
        assert torch.allclose(gaps, torch.full((3,), 90.0, dtype=torch.float64))
        assert all(float(a) % 15 == 0 for a in cams.azimuth_deg)  # quantized offset
        # slot k in the k-th quarter of [−180, 180) (MVDream-threestudio), up to quantization
        for k, a in enumerate(cams.azimuth_deg.tolist()):
            off_centre = (a - (-135 + 90 * k) + 180) % 360 - 180  # from the quarter's centre, on the circle
            assert abs(off_centre) <= 45 + 7.5
    keys = {tuple(c.azimuth_deg.tolist()) + tuple(c.elevation_deg.tolist()) for c in sets}
    assert len(keys) < len(sets)  # quantized camera sets repeat, so an object's ODE can be cached


def test_relative_distance_scales_with_the_field_of_view():
    cfg = CameraConfig(distance_range=[0.8, 1.0], fovy_range=[15.0, 60.0], relative_distance=True,
                       camera_perturb=0, center_perturb=0, up_perturb=0)
    for _ in range(5):
        cams = sample_multiview_cameras(torch.Generator().manual_seed(_), 4, cfg, 16)
        relative = cams.distance.double() * torch.tan(torch.deg2rad(cams.fovy_deg.double()) / 2)
        assert ((relative >= 0.8 - 1e-5) & (relative <= 1.0 + 1e-5)).all()
        assert torch.allclose(cams.c2w[:, :3, 3].double().norm(dim=-1), cams.distance.double(), atol=1e-4)


def test_multiview_order_makes_whole_evenly_spaced_objects_in_training_slots():
    cams = turntable(8, 15, 2, 50, 8, 8)
    order = multiview_order(cams, 4, [-180.0, 180.0])
    az = cams.azimuth_deg[order].reshape(2, 4).double()
    assert torch.allclose(torch.diff(az, dim=1) % 360, torch.full((2, 3), 90.0, dtype=torch.float64))
    assert sorted(order.tolist()) == list(range(8))
    # slot k is where training puts view slot k: the k-th quarter of [−180, 180)
    for k in range(4):
        assert ((az[:, k] >= -180 + 90 * k) & (az[:, k] < -90 + 90 * k)).all()
    g = torch.Generator().manual_seed(0)
    trained = sample_multiview_cameras(g, 4, CameraConfig(camera_perturb=0, center_perturb=0, up_perturb=0), 8)
    assert torch.equal(multiview_order(trained, 4, [-180.0, 180.0]), torch.arange(4))
    with pytest.raises(UserError, match="camera.eval_views=6"):
        multiview_order(turntable(6, 15, 2, 50, 8, 8), 4, [-180.0, 180.0])


def context_of(prior, seeds_rows, generators, cams):
    return GuidanceContext(prior=prior, cond=prior.condition("a cat", len(seeds_rows), cams), seeds=seeds_rows,
                           eps_star=torch.zeros(len(seeds_rows), 3, 16, 16), generators=generators, step=0, steps=10)


def test_one_draw_per_object_and_trajectory_keys_per_camera_set():
    prior = make_prior()
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    cams = Cameras.cat([one_object(10.0), one_object(40.0)])
    ctx = context_of(prior, [0] * 4 + [1] * 4, [ga] * 4 + [gb] * 4, cams)
    u = ctx.rand_rows()
    assert torch.equal(u[:4], u[:1].expand(4)) and torch.equal(u[4:], u[4:5].expand(4)) and u[0] != u[4]
    # the first draw of each object's generator, nothing else consumed
    assert float(u[0]) == float(torch.rand((), generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    keys = ctx.trajectory_keys()
    assert len(set(keys)) == 8 and keys[0][:2] == keys[3][:2] and keys[0][:2] != keys[4][:2]
    # the same seed with one camera of the set changed is another ODE for every slot
    other = Cameras.cat([one_object(10.0).rows([0, 1, 2]), one_object(25.0).rows([3])])
    keys2 = context_of(prior, [0] * 4, [ga] * 4, other).trajectory_keys()
    assert not set(keys2) & set(keys[:4])


def test_ode_cache_evicts_whole_objects():
    prior = make_prior()
    ode = OdeTrajectories(prior, steps=4, cfg_scale=1.0, max_per_seed=5)
    g = torch.Generator().manual_seed(0)
    for azimuth in (0.0, 30.0, 60.0):  # three objects, 12 rows > 5: old objects go whole
        cams = one_object(azimuth)
        ctx = context_of(prior, [0] * 4, [g] * 4, cams)
        eps = torch.randn(4, 3, 16, 16, generator=g)
        ode.eps_at(ctx.trajectory_keys(), eps, ctx.cond, torch.full((4,), 2))
        groups = {}
        for key in ode.trajectories:
            groups.setdefault(key[:2], []).append(key[2])
        assert all(sorted(slots) == [0, 1, 2, 3] for slots in groups.values())


def test_image_mode_input_view_weighs_shapes_that_it_can_tell_apart():
    backs = make_prior("image", data="backs")
    colour = make_prior("image", data="colourways")
    for prior, consistent in ((backs, 4), (colour, 1)):
        prior.condition("a cat", 1, one_object(views=1))
        log_w = prior._log_input_weights(torch.zeros(1, dtype=torch.long))[0]
        k = prior.prompts.index("a cat") * 4
        w = torch.softmax(log_w[k : k + 4], 0)
        assert int((w > 0.2).sum()) == consistent
        assert float(w[prior.cfg.image_reference]) >= 0.2
    # the reference view is the reference shape seen from the input camera, its mask the opacity
    view = backs.reference_view()
    render = backs.reference_renders("a cat", backs.input_camera())[0, 0]
    assert torch.allclose(view.rgb, render, atol=1e-6)
    assert view.mask.shape == (1, 16, 16) and view.mask.max() > 0.9 and view.mask[0, 0, 0] < 0.05


def test_backs_shapes_look_the_same_from_the_front_and_differ_from_behind():
    prior = make_prior("image", data="backs")
    cams = turntable(2, 0.0, 2.0, 50.0, 16, 16)  # front (azimuth 0) and back (180)
    renders = prior.reference_renders("a cup", cams)  # (K, 2, 3, S, S)
    front, back = renders[:, 0], renders[:, 1]
    assert (front - front[:1]).abs().max() < 1e-3
    assert (back - back[:1]).abs().flatten(1).max(1).values[1:].min() > 0.1


def test_camera_priors_refuse_2d_and_partial_objects(compose, tmp_path):
    from dsd.run import run

    with pytest.raises(UserError, match="representation=image is 2D"):
        run(compose("prior.mode=multiview", "seeds=1", "trainer.steps=1"), tmp_path / "a")
    with pytest.raises(UserError, match="camera.eval_views=3"):
        run(compose(*FAST_3D, "prior.mode=multiview", "camera.eval_views=3", "seeds=1", "trainer.steps=1"),
            tmp_path / "b")
    with pytest.raises(UserError, match="prior.mode='bogus'"):
        run(compose(*FAST_3D, "prior.mode=bogus", "seeds=1", "trainer.steps=1"), tmp_path / "c")


def test_multiview_run_uses_f_noises_per_seed_and_one_t_per_object(compose, tmp_path, monkeypatch):
    from dsd.guidance import dsd as dsd_module
    from dsd.run import run
    from dsd.seeding import seed_noise

    seen = []
    original = dsd_module.DSD.grad

    def spy(self, x, ctx):
        seen.append((ctx.eps_star.clone(), self.timesteps(ctx)))
        return original(self, x, ctx)

    monkeypatch.setattr(dsd_module.DSD, "grad", spy)
    cfg = compose(*FAST_3D, "experiment=demo", "prior.mode=multiview", "seeds=[3,5]", "trainer.steps=2",
                  "guidance.t_schedule=random", "representation.num_points=150", "prior.image_size=16")
    summary = run(cfg, tmp_path)
    eps_star, (t, t_plus, _) = seen[0]
    assert eps_star.shape == (8, 3, 16, 16)
    assert torch.equal(eps_star[:4], seed_noise(3, (4, 3, 16, 16))) and torch.equal(eps_star[4:], seed_noise(5, (4, 3, 16, 16)))
    for obj in (slice(0, 4), slice(4, 8)):
        assert len(set(t[obj].tolist())) == 1 and len(set(t_plus[obj].tolist())) == 1
    assert summary["prior_rows_per_step"] >= 4


def test_reference_view_loss_reproduces_the_input_view(compose, tmp_path):
    """Image mode end to end: with the reference-view loss the input view is reproduced."""
    from dsd.metrics.reference import psnr
    from dsd.run import run

    cfg = compose(*FAST_3D, "experiment=demo", "prior.mode=image", "prior.data=backs", "seeds=1",
                  "trainer.steps=60", "trainer.lambda_rgb=1000", "trainer.lambda_mask=100",
                  "representation.num_points=300", "prior.image_size=16")
    run(cfg, tmp_path)
    from dsd import registry
    from dsd.run import build_prior
    from dsd.trainer import Trainer  # noqa: F401  (the checkpoint holds the representation)

    prior = build_prior(cfg, torch.device("cpu"))
    rep = registry.build("representation", cfg.representation, prior=prior, device=torch.device("cpu"))
    rep.load_state_dict(torch.load(tmp_path / "seed_0" / "checkpoint.pt", weights_only=False)["representation"])
    prior.condition(cfg.prompt, 1, prior.input_camera())
    view = prior.reference_view()
    with torch.no_grad():
        out = rep.render(view.camera)[0]
    assert psnr(out.permute(1, 2, 0), view.rgb.permute(1, 2, 0)) > 25


def test_mvdream_preset_composes_with_its_cameras(compose):
    cfg = compose("experiment=mvdream")
    assert (cfg.prior.name, cfg.representation.name, cfg.guidance.name) == ("mvdream", "nerf", "dsd")
    assert cfg.camera.relative_distance and list(cfg.camera.fovy_range) == [15.0, 60.0]
    assert cfg.camera.eval_views % cfg.prior.num_views == 0
