"""VSD (ProlificDreamer): the gradient against the formula written out here, φ's training (one φ
shared by the particles of a seed batch, or one per seed), its checkpoint/resume, and runs end to
end on the analytic prior (2D, 3D) and the tiny SD."""

import copy
import types

import numpy as np
import pytest
import torch

from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.guidance.vsd import VSD, VSDConfig
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
from dsd.run import run
from dsd.seeding import step_generator

PROMPT = "a teapot"
FAST_3D = ("representation=gaussians", "representation.num_points=100", "camera.video_frames=0",
           "camera.eval_views=2", "trainer.checkpoint_every=0", "camera.quantize_deg=30")


@pytest.fixture(scope="module")
def analytic():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8))


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd)))


def context(prior, seeds, step, steps=10):
    return GuidanceContext(
        prior=prior, cond=prior.condition(PROMPT, len(seeds)), seeds=list(seeds),
        eps_star=torch.zeros(len(seeds), *prior.sample_shape), generators=[step_generator(s) for s in seeds],
        step=step, steps=steps,
    )  # fmt: skip


def reference_grad(guidance, prior, x, seeds, step, steps, particles, g_scale, t_hi_frac):
    """w(t)·(ε_u + g(ε_c − ε_u) − ε^φ) from fresh generators seeded like the rows', written out."""
    T = prior.num_train_timesteps
    gens = [step_generator(s) for s in seeds]
    t = torch.tensor([int(torch.randint(int(T * 0.02), int(T * t_hi_frac) + 1, (), generator=g)) for g in gens])
    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x)
    abar = prior.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    cond = prior.condition(PROMPT, len(seeds))
    eps_c = prior.predict_eps(x_t, t, cond, torch.zeros(len(seeds), dtype=torch.bool))
    eps_u = prior.predict_eps(x_t, t, cond, torch.ones(len(seeds), dtype=torch.bool))
    eps_pre = eps_u + g_scale * (eps_c - eps_u)
    with torch.no_grad():  # φ called directly, on its 2D input: the zero camera
        eps_phi = guidance.score.raw(particles, x_t, t, cond, torch.zeros(len(seeds), 16))
    return (1 - abar) * (eps_pre - eps_phi), t


@pytest.mark.parametrize("which", ["analytic", "sd"])
def test_gradient_equals_the_vsd_formula_with_phi_before_its_update(which, request):
    prior = request.getfixturevalue(which)
    guidance = VSD(VSDConfig(cfg_scale=5.0), prior)
    seeds, steps = [3, 8], 10
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(0))
    for step, t_hi in ((0, 0.98), (2, 0.5)):  # t_max switches to 0.5 at 0.2·N (threestudio)
        before = copy.deepcopy(guidance.particles_for(seeds, x.device))  # the rows' φ (shared: one)
        grad, info = guidance.grad(x, context(prior, seeds, step, steps))
        expected, t = reference_grad(guidance, prior, x, seeds, step, steps, before, 5.0, t_hi)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
        assert info["t"] == pytest.approx(float(t.float().mean()))
        moved = [p for s, b in zip(seeds, before) for p, q in zip(guidance.particles[s].parameters(), b.parameters())
                 if not torch.equal(p, q)]
        assert moved  # φ was updated after the gradient was taken


def reference_phi_gradient(guidance, prior, phi, x, seeds, rows):
    """∇φ of the mean over `rows` of each row's diffusion loss at the (t', noise') the rows' own
    generators draw after the gradient's t and noise, written out (2D: zero camera)."""
    T = prior.num_train_timesteps
    gens = [step_generator(s) for s in seeds]
    draws = []
    for g in gens:  # per generator: t, ε (the gradient), then t', ε' (φ's update)
        torch.randint(int(T * 0.02), int(T * 0.98) + 1, (), generator=g)
        torch.randn(x.shape[1:], generator=g)
        draws.append((int(torch.randint(0, T, (), generator=g)), torch.randn(x.shape[1:], generator=g)))
    t = torch.tensor([draws[i][0] for i in rows])
    noise = torch.stack([draws[i][1] for i in rows]).to(x)
    abar = prior.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1)
    x0 = x[rows]
    target = noise if guidance.score.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raw = guidance.score.raw([phi] * len(rows), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t,
                             prior.condition(PROMPT, len(rows)), torch.zeros(len(rows), 16))
    phi.zero_grad(set_to_none=True)
    ((raw.float() - target.float()) ** 2).flatten(1).mean(1).mean().backward()
    return {name: p.grad.clone() for name, p in phi.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["analytic", "sd"])
def test_shared_phi_takes_one_adamw_step_on_the_rows_of_every_particle(which, request):
    prior = request.getfixturevalue(which)
    guidance = VSD(VSDConfig(particles="shared"), prior)
    seeds = [3, 8]
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(5))
    phi, other = guidance.particles_for(seeds, x.device)
    assert phi is other and guidance.optimizers[3] is guidance.optimizers[8]
    reference = copy.deepcopy(phi)
    guidance.grad(x, context(prior, seeds, 0))
    expected = reference_phi_gradient(guidance, prior, reference, x, seeds, rows=[0, 1])
    one_particle = reference_phi_gradient(guidance, prior, copy.deepcopy(reference), x, seeds, rows=[0])
    got = {name: p.grad for name, p in phi.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(expected[n], one_particle[n], rtol=1e-3, atol=1e-7) for n in expected)
    torch.optim.AdamW(reference.parameters(), lr=guidance.lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.01).step()
    for (name, p), q in zip(phi.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_phi_sharing_follows_the_seed_batch(analytic):
    shared, per_seed = VSD(VSDConfig(), analytic), VSD(VSDConfig(particles="per_seed"), analytic)
    rows = [0, 0, 1, 1]  # two views per seed
    a, b = shared.particles_for(rows, torch.device("cpu")), per_seed.particles_for(rows, torch.device("cpu"))
    assert a[0] is a[1] is a[2] is a[3] and b[0] is b[1] and b[1] is not b[2]
    assert shared.particles_for([1], torch.device("cpu"))[0] is a[0]  # a seed left alone (0 diverged)
    with pytest.raises(UserError, match="trainer.seed_batch"):
        shared.particles_for([1, 2], torch.device("cpu"))
    # a seed alone in its batch has the φ it would have per seed
    alone = VSD(VSDConfig(), analytic).particles_for([1], torch.device("cpu"))[0]
    for p, q in zip(alone.parameters(), b[2].parameters()):
        assert torch.equal(p, q)


def test_checkpointed_shared_phi_is_loaded_once_and_checked(analytic):
    x = torch.randn(2, *analytic.sample_shape, generator=torch.Generator().manual_seed(6))
    first = VSD(VSDConfig(), analytic)
    first.grad(x, context(analytic, [0, 1], 0))
    states = [copy.deepcopy(first.state_for(s)) for s in (0, 1)]
    assert states[0]["group"] == states[1]["group"] == [0, 1]
    resumed = VSD(VSDConfig(), analytic)
    for state in states:
        resumed.load_state(state)
    phi = resumed.particles_for([0, 1], torch.device("cpu"))[0]
    assert resumed.particles[1] is phi
    for p, q in zip(phi.parameters(), first.particles[0].parameters()):
        assert torch.equal(p, q)
    assert resumed.optimizers[0].state_dict()["state"][0]["step"] == 1
    tampered = copy.deepcopy(states)
    next(iter(tampered[1]["phi"].values())).add_(1e-3)  # seed 1 saved at another step
    broken = VSD(VSDConfig(), analytic)
    for state in tampered:
        broken.load_state(state)
    with pytest.raises(UserError, match="different copies"):
        broken.grad(x, context(analytic, [0, 1], 1))
    per_seed = VSD(VSDConfig(particles="per_seed"), analytic)
    per_seed.load_state(states[0])
    with pytest.raises(UserError, match="particles=shared"):
        per_seed.particles_for([0], torch.device("cpu"))


def test_lora_phi_is_the_prior_unet_until_trained_and_the_prior_never_sees_it(sd):
    guidance = VSD(VSDConfig(), sd)
    phi = guidance.particle(0, torch.device("cpu"))
    x_t = torch.randn(2, *sd.sample_shape, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([100, 700]), sd.condition(PROMPT, 2)
    plain = sd.predict_eps(x_t, t, cond, torch.zeros(2, dtype=torch.bool))
    with torch.no_grad():
        for p in phi.camera.parameters():
            p.zero_()  # camera embedding 0: φ = LoRA(UNet) with up = 0 = the UNet
        torch.testing.assert_close(guidance.score.raw([phi, phi], x_t, t, cond, torch.randn(2, 16)), plain)
        for up in phi.up:
            up.normal_()
        assert not torch.allclose(guidance.score.raw([phi, phi], x_t, t, cond, torch.zeros(2, 16)), plain)
    torch.testing.assert_close(sd.predict_eps(x_t, t, cond, torch.zeros(2, dtype=torch.bool)), plain)


@pytest.mark.parametrize("which", ["analytic", "sd"])
def test_phi_loss_decreases_on_a_fixed_render(which, request):
    prior = request.getfixturevalue(which)
    guidance = VSD(VSDConfig(phi_lr=1e-2), prior)
    seeds = [0, 1]
    x = torch.rand(2, *prior.sample_shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    particles = [guidance.particle(s, x.device) for s in seeds]
    fixed = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (16,), generator=fixed)
    noise = torch.randn(16, *prior.sample_shape, generator=fixed)
    cond, camera = prior.condition(PROMPT, 16), torch.zeros(16, 16)

    def held_out_loss():  # each particle's own render, 8 fixed (t, noise) draws
        with torch.no_grad():
            return float(guidance.phi_loss(particles * 8, x.repeat(8, 1, 1, 1), t, noise, cond, camera))

    before = held_out_loss()
    ctx = context(prior, seeds, 0)
    for _ in range(40):
        guidance.train_phi(particles, x, ctx, torch.zeros(2, 16))
    assert held_out_loss() < 0.8 * before


def test_resumed_run_restores_phi_and_equals_the_uninterrupted_run(compose, tmp_path, interrupt_at_step):
    overrides = ("guidance=vsd", "prior.image_size=8", f"prompt={PROMPT}", "seeds=[0,1]", "trainer.steps=10",
                 "trainer.checkpoint_every=3")
    run(compose(*overrides), tmp_path / "straight")
    interrupt_at_step(7)
    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "resumed")
    interrupt_at_step(None)
    ckpt = torch.load(tmp_path / "resumed/seed_1/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 7 and ckpt["guidance"]["seed"] == 1 and "phi" in ckpt["guidance"]
    check_shared(tmp_path / "resumed")  # the 2-seed batch shares φ (the default)
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    for seed in (0, 1):
        assert np.array_equal(load_result(tmp_path / f"straight/seed_{seed}/result.npz"),
                              load_result(tmp_path / f"resumed/seed_{seed}/result.npz"))


def check_shared(run_dir, seeds=(0, 1)):
    """Every seed's checkpoint carries the same φ and φ-optimizer state, shared by `seeds`."""
    states = [torch.load(run_dir / f"seed_{s}/checkpoint.pt", weights_only=False)["guidance"] for s in seeds]
    for state in states:
        assert state["group"] == list(seeds)
        for key in state["phi"]:
            assert torch.equal(state["phi"][key], states[0]["phi"][key])
        for index, moments in state["phi_optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, states[0]["phi_optimizer"]["state"][index][key])


def test_shared_phi_differs_from_per_seed_and_a_batch_of_one_is_per_seed(compose, tmp_path, caplog):
    base = ("guidance=vsd", "prior.image_size=8", "seeds=[0,1]", "trainer.steps=6")
    run(compose(*base, "guidance.particles=shared"), tmp_path / "shared")
    run(compose(*base, "guidance.particles=per_seed"), tmp_path / "per_seed")
    with caplog.at_level("INFO", logger="dsd"):
        run(compose(*base, "guidance.particles=shared", "trainer.seed_batch=1"), tmp_path / "alone")
    assert "alone in its seed batch" in caplog.text and "trainer.seed_batch" in caplog.text
    for seed in (0, 1):
        shared, own, alone = (load_result(tmp_path / f"{name}/seed_{seed}/result.npz")
                              for name in ("shared", "per_seed", "alone"))
        np.testing.assert_allclose(alone, own, atol=1e-5)
        assert np.abs(shared - own).max() > 1e-3


def check_run(summary, tmp_path, seeds=(0, 1)):
    assert [e["steps"] for e in summary["seeds"]] == [summary["seeds"][0]["steps"]] * len(seeds)
    images = [load_result(tmp_path / f"seed_{s}/result.npz") for s in seeds]
    assert all(np.isfinite(i).all() for i in images) and np.abs(images[0] - images[1]).max() > 1e-3
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])


def test_runs_end_to_end_on_2d_and_3d_analytic(compose, tmp_path):
    summary = run(compose("guidance=vsd", "prior.image_size=8", "seeds=2", "trainer.steps=4"), tmp_path / "2d")
    check_run(summary, tmp_path / "2d")
    assert summary["prior_rows_per_step"] == pytest.approx(2.0)  # CFG rows only; φ is outside the prior
    summary = run(compose("experiment=demo", "guidance=vsd", *FAST_3D, "prior.image_size=16", "seeds=[0,1]", "trainer.steps=3",
                          "camera.views_per_step=2"), tmp_path / "3d")
    check_run(summary, tmp_path / "3d")
    check_shared(tmp_path / "3d")


def test_runs_end_to_end_on_tiny_sd_2d_and_3d(compose, tmp_path, tiny_sd):
    sd = ("prior=sd21", f"prior.pretrained={tiny_sd}", "guidance=vsd", "seeds=2", "trainer.steps=3")
    summary = run(compose(*sd, "representation=image"), tmp_path / "2d")
    check_run(summary, tmp_path / "2d")
    check_shared(tmp_path / "2d")  # one LoRA for both seeds
    assert summary["prior_rows_per_step"] == pytest.approx(4.0)  # CFG 2 + φ's forward and training row
    summary = run(compose(*sd, *FAST_3D, "prior.perp_neg=false"), tmp_path / "3d")
    check_run(summary, tmp_path / "3d")


@pytest.mark.parametrize(
    "overrides",
    [{"t_min": 0.5, "t_max": 0.3}, {"t_max_final": 1.2}, {"camera_dropout": 1.5}, {"phi_updates": -1},
     {"lora_rank": 0}, {"phi_lr": 0.0}, {"phi_betas": [0.9]}, {"t_max_switch": 2.0}, {"particles": "each"}],
)
def test_bad_config_values_are_user_errors(analytic, overrides):
    with pytest.raises(UserError, match="guidance"):
        VSD(VSDConfig(**overrides), analytic)


def test_unsupported_prior_is_a_user_error_naming_the_accepted_ones():
    with pytest.raises(UserError, match="analytic, sd21"):
        VSD(VSDConfig(), types.SimpleNamespace(name="zero123"))


@pytest.mark.parametrize("dropout, changes", [(1.0, False), (0.0, True)])
def test_camera_dropout_zeroes_the_camera_phi_is_trained_on(analytic, dropout, changes):
    guidance = VSD(VSDConfig(camera_dropout=dropout, phi_weight_decay=0.0), analytic)
    phi = guidance.particle(0, torch.device("cpu"))
    weight = phi.camera[0].weight.detach().clone()  # multiplies the camera: no gradient from a zeroed one
    x = torch.rand(1, *analytic.sample_shape, generator=torch.Generator().manual_seed(4))
    ctx = context(analytic, [0], 0)
    for _ in range(2):  # the output layer starts at 0: the camera gets a gradient from the 2nd update on
        guidance.train_phi([phi], x, ctx, torch.randn(1, 16))
    assert (not torch.equal(phi.camera[0].weight, weight)) == changes
