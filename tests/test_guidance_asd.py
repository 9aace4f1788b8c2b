"""guidance=asd (ScaleDreamer's Asynchronous Score Distillation) against its formula written out here."""

import numpy as np
import pytest
import torch

from dsd.cameras import orbit_cameras
from dsd.errors import UserError
from dsd.guidance.asd import ASD, ASDConfig
from dsd.guidance.base import GuidanceContext
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
from dsd.run import run
from dsd.seeding import step_generator

PROMPT = "a hamburger"
SEEDS = [3, 8]
FAST_3D = ("camera.video_frames=2", "camera.video_resolution=16", "camera.eval_views=2",
           "trainer.checkpoint_every=0", "representation.num_points=100", "prior.image_size=16")


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8))


def context(prior, cond, step, steps):
    return GuidanceContext(prior=prior, cond=cond, seeds=SEEDS, eps_star=torch.zeros(len(SEEDS), *prior.sample_shape),
                           generators=[step_generator(s) for s in SEEDS], step=step, steps=steps)


def reference(prior, x, cond, step, steps, plain_plus=True, perp_neg=False):
    """ASD written out per row: noise, then t, then U from the row's own stream; ScaleDreamer's
    ramps min 0.5 → 0.02, max 0.98 → 0.5 over the run; t⁺ with r = 0.1; w = 1 − ᾱ_t. With
    `perp_neg` the guided ε at t is the prior's own Perp-Neg mixture (tested in test_stable_diffusion)."""
    T, out = 1000, []
    frac = step / steps
    t_lo, t_hi = int(T * (0.5 + (0.02 - 0.5) * frac)), int(T * (0.98 + (0.5 - 0.98) * frac))
    for row, seed in enumerate(SEEDS):
        g = step_generator(seed)
        noise = torch.randn(x.shape[1:], generator=g)
        t = int(torch.randint(t_lo, t_hi + 1, (), generator=g))
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        t_plus = min(max(t + int(u * min(max(0.1 * (t - t_lo), 0.0), T - 1 - t)), 1), T - 1)
        a, a_plus = prior.alphas_cumprod[t], prior.alphas_cumprod[t_plus]
        x_t = (a.sqrt() * x[row] + (1 - a).sqrt() * noise).float()[None]
        x_plus = (a_plus.sqrt() * x[row] + (1 - a_plus).sqrt() * noise).float()[None]
        c = cond.rows([row])
        if perp_neg:
            guided = prior.eps(x_t, torch.tensor([t]), c, 7.5)[0]
        else:
            eps_c, eps_u = (prior.predict_eps(x_t, torch.tensor([t]), c, torch.tensor([un]))[0] for un in (False, True))
            guided = eps_u + 7.5 * (eps_c - eps_u)
        if plain_plus:  # the conditional alone, never Perp-Neg
            second = prior.predict_eps(x_plus, torch.tensor([t_plus]), c, torch.tensor([False]))[0]
        else:
            second = prior.eps(x_plus, torch.tensor([t_plus]), c, 1.0)[0]
        out.append((1 - a).float() * (guided - second))
    return torch.stack(out)


@pytest.mark.parametrize("step", [0, 7, 20])
def test_gradient_matches_the_written_out_formula_in_one_prior_call(prior, step, monkeypatch):
    x = torch.rand(len(SEEDS), *prior.sample_shape) * 2 - 1
    cond = prior.condition(PROMPT, len(SEEDS))
    calls = []
    original = prior.predict_eps
    monkeypatch.setattr(prior, "predict_eps", lambda *a: calls.append(len(a[0])) or original(*a))
    grad, info = ASD(ASDConfig(), prior).grad(x, context(prior, cond, step, 20))
    assert calls == [3 * len(SEEDS)]  # cond + uncond at t, cond at t⁺: one batched call
    monkeypatch.undo()
    torch.testing.assert_close(grad, reference(prior, x, cond, step, 20), atol=1e-5, rtol=1e-4)
    assert info["t_plus"] >= info["t"]


def test_t_plus_is_the_plain_conditional_under_perp_neg(tiny_sd):
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd)))
    n = len(SEEDS)
    cams = orbit_cameras(torch.zeros(n), torch.tensor([100.0, 150.0]), torch.full((n,), 3.0),
                         torch.full((n,), 40.0), 16, 16)
    cond = prior.condition("a teapot", n, cams)
    assert cond.negative_prompts() is not None and len(cond.negative_prompts()[1]) > 0  # Perp-Neg is on
    x = torch.randn(n, *prior.sample_shape)
    grad, _ = ASD(ASDConfig(), prior).grad(x, context(prior, cond, 3, 10))
    # at t: the prior's Perp-Neg mixture with g = 7.5 (ScaleDreamer :423); at t⁺: ε_c alone (:409)
    # (float32 UNet rows batched differently: test_stable_diffusion's CFG tolerance)
    torch.testing.assert_close(grad, reference(prior, x, cond, 3, 10, perp_neg=True), atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError):  # Perp-Neg at t⁺ would differ: the check above can tell
        torch.testing.assert_close(grad, reference(prior, x, cond, 3, 10, plain_plus=False, perp_neg=True),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides, key", [
    ({"t_min": 0.9, "t_max": 0.5}, "guidance.t_min=0.9"),
    ({"t_min_final": 0.6}, "guidance.t_min_final=0.6"),
    ({"plus_ratio": -0.1}, "guidance.plus_ratio=-0.1"),
    ({"anneal_until": 0.0}, "guidance.anneal_until=0.0"),
])
def test_bad_values_are_user_errors(prior, overrides, key):
    with pytest.raises(UserError, match=key):
        ASD(ASDConfig(**overrides), prior)


def summary_ok(summary, tmp_path, seeds, shape):
    assert [e["steps"] for e in summary["seeds"]] == [summary["seeds"][0]["steps"]] * len(seeds)
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])
    for seed in seeds:
        image = load_result(tmp_path / f"seed_{seed}/result.npz")
        assert image.shape == shape and np.isfinite(image).all()


def test_runs_end_to_end_in_2d(compose, tmp_path):
    summary = run(compose("guidance=asd", "seeds=2", "trainer.steps=6", "prior.image_size=16"), tmp_path)
    assert summary["guidance"] == "asd" and summary["prior_rows_per_step"] == 3  # 3 rows per render row
    summary_ok(summary, tmp_path, (0, 1), (16, 16, 3))


def test_runs_end_to_end_in_3d(compose, tmp_path):
    summary = run(compose("experiment=demo", "guidance=asd", "seeds=[0,1]", "trainer.steps=2", *FAST_3D), tmp_path)
    assert summary["guidance"] == "asd"
    summary_ok(summary, tmp_path, (0, 1), (16, 16, 3))


def test_runs_end_to_end_on_tiny_sd(compose, tmp_path, tiny_sd):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "representation=image", "guidance=asd",
                          "trainer.steps=3", "seeds=2"), tmp_path)
    assert summary["prior"] == "sd21" and summary["prior_rows_per_step"] == 3
    summary_ok(summary, tmp_path, (0, 1), (16, 16, 3))


def test_asd_sets_scaledreamer_adam_betas_on_the_representation(compose, tmp_path):
    from dsd import registry
    from dsd.run import build_prior
    from dsd.trainer import Trainer

    cfg = compose("guidance=asd", "seeds=1", "trainer.steps=1", "prior.image_size=8")
    prior = build_prior(cfg, torch.device("cpu"))
    guidance = registry.build("guidance", cfg.guidance, prior=prior)
    trainer = Trainer(prior, guidance, cfg.prompt, cfg.trainer, tmp_path,
                      lambda: registry.build("representation", cfg.representation, prior=prior, device="cpu"),
                      torch.device("cpu"))
    assert all(tuple(g["betas"]) == (0.0, 0.99) for g in trainer.new_state(0).optimizer.param_groups)
