"""guidance=sdi (Score Distillation via Reparametrized DDIM) against its algorithm written out here,
one row at a time, from the DSD authors' SDI code (configs/sdi.yaml, stable_diffusion_sdi_guidance.py)."""

import math

import numpy as np
import pytest
import torch

from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.guidance.sdi import SDI, SDIConfig
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.run import run
from dsd.seeding import step_generator

PROMPT = "a hamburger"
SEEDS = [3, 8, 11]
FAST_3D = ("camera.video_frames=2", "camera.video_resolution=16", "camera.eval_views=2",
           "trainer.checkpoint_every=0", "representation.num_points=100", "prior.image_size=16")


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8))


def context(prior, cond, step, steps):
    return GuidanceContext(prior=prior, cond=cond, seeds=SEEDS, eps_star=torch.zeros(len(SEEDS), *prior.sample_shape),
                           generators=[step_generator(s) for s in SEEDS], step=step, steps=steps)


def guided(prior, x, t, cond, g):
    """ε_u + g·(ε_c − ε_u) from the raw predictions of one row."""
    e_c, e_u = (prior.predict_eps(x[None], torch.tensor([t]), cond, torch.tensor([u]))[0] for u in (False, True))
    return e_u + g * (e_c - e_u)


def reference(prior, x, cond, step, steps, schedule="linear", t_range=(0.25, 0.98), eta=0.3, n=10):
    """Per row: t (annealed, or uniform from the row's stream), then U for δ, then one z per
    inversion step. The inversion starts at the render with ᾱ_0 (label 0), visits 1, 101, …
    below t (leading spacing, offset 1) and ends at τ = min(t + ⌊U·T/n⌋, T−1); each step predicts
    ε̂ with g = −7.5 and adds η·σ·z; the target is x0 at time t from the point at τ."""
    T, ac, out = 1000, prior.alphas_cumprod, []
    lo, hi = t_range
    for row, seed in enumerate(SEEDS):
        g, c = step_generator(seed), cond.rows([row])
        if schedule == "linear":
            t = int(T * ((hi - lo) * (1 - step / steps) + lo))
        else:
            t = int(torch.randint(int(T * lo), int(T * hi) + 1, (), generator=g))
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        tau = min(t + math.floor(u * T / n), T - 1)
        labels = [0] + [1 + 100 * k for k in range(n) if 1 + 100 * k < t] + [tau]
        z = x[row]
        for s, s_next in zip(labels[:-1], labels[1:]):
            e = guided(prior, z, s, c, -7.5)
            a, a_next = ac[s], ac[s_next]
            x0 = (z - (1 - a).sqrt() * e) / a.sqrt()
            sigma = ((1 - a) / (1 - a_next) * (1 - a_next / a)).sqrt()
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e + eta * sigma * torch.randn(x.shape[1:], generator=g)
        e = guided(prior, z, t, c, 7.5)
        target = (z - (1 - ac[t]).sqrt() * e) / ac[t].sqrt()
        out.append(x[row] - target)
    return torch.stack(out)


@pytest.mark.parametrize("step", [0, 9, 19])
def test_gradient_matches_the_written_out_inversion(prior, step):
    # float64: at t = 0.98·T, x0 = (x − √(1−ᾱ)ε)/√ᾱ magnifies float32 rounding ~15×
    x = torch.rand(len(SEEDS), *prior.sample_shape, dtype=torch.float64) * 2 - 1
    cond = prior.condition(PROMPT, len(SEEDS))
    grad, info = SDI(SDIConfig(), prior).grad(x, context(prior, cond, step, 20))
    torch.testing.assert_close(grad, reference(prior, x, cond, step, 20), atol=1e-6, rtol=1e-6)
    assert info["t_inverted"] >= info["t"]


def test_rows_with_different_t_invert_along_paths_of_different_lengths(prior):
    """t_schedule=random: each row has its own t, so its own number of inversion steps."""
    x = torch.rand(len(SEEDS), *prior.sample_shape, dtype=torch.float64) * 2 - 1
    cond = prior.condition(PROMPT, len(SEEDS))
    cfg = SDIConfig(t_schedule="random", t_min=0.1, t_max=0.9)
    grad, _ = SDI(cfg, prior).grad(x, context(prior, cond, 0, 10))
    torch.testing.assert_close(grad, reference(prior, x, cond, 0, 10, "random", (0.1, 0.9)), atol=1e-6, rtol=1e-6)
    ts = [int(torch.randint(100, 901, (), generator=step_generator(s))) for s in SEEDS]
    assert len({(t - 2) // 100 for t in ts}) > 1  # the seeds' paths really differ in length


def test_cost_is_the_inversion_steps_plus_one_guided_call(prior):
    cond = prior.condition(PROMPT, len(SEEDS))
    before = prior.rows_evaluated
    SDI(SDIConfig(), prior).grad(torch.zeros(len(SEEDS), *prior.sample_shape), context(prior, cond, 0, 10))
    # t = 980: start + 10 grid points below it + τ = 12 labels, 11 inversion calls + 1, 2 rows each
    assert prior.rows_evaluated - before == len(SEEDS) * 12 * 2


@pytest.mark.parametrize("overrides, key", [
    ({"t_min": 0.9, "t_max": 0.5}, "guidance.t_min=0.9"),
    ({"t_schedule": "sqrt"}, "guidance.t_schedule='sqrt'"),
    ({"inversion_steps": 0}, "guidance.inversion_steps=0"),
    ({"inversion_eta": -1.0}, "guidance.inversion_eta=-1.0"),
    ({"inversion_steps_offset": 100}, "guidance.inversion_steps_offset=100"),
])
def test_bad_values_are_user_errors(prior, overrides, key):
    with pytest.raises(UserError, match=key):
        SDI(SDIConfig(**overrides), prior)


def summary_ok(summary, tmp_path, seeds):
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])
    for seed in seeds:
        image = load_result(tmp_path / f"seed_{seed}/result.npz")
        assert image.shape == (16, 16, 3) and np.isfinite(image).all()


def test_runs_end_to_end_in_2d(compose, tmp_path):
    summary = run(compose("guidance=sdi", "seeds=2", "trainer.steps=4", "prior.image_size=16"), tmp_path)
    assert summary["guidance"] == "sdi" and summary["prior_rows_per_step"] > 2 * 2
    summary_ok(summary, tmp_path, (0, 1))


def test_runs_end_to_end_in_3d(compose, tmp_path):
    summary = run(compose("experiment=demo", "guidance=sdi", "guidance.inversion_steps=3", "seeds=[0,1]",
                          "trainer.steps=2", *FAST_3D), tmp_path)
    assert summary["guidance"] == "sdi"
    summary_ok(summary, tmp_path, (0, 1))


def test_runs_end_to_end_on_tiny_sd(compose, tmp_path, tiny_sd):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "representation=image", "guidance=sdi",
                          "guidance.inversion_steps=3", "trainer.steps=3", "seeds=2"), tmp_path)
    assert summary["prior"] == "sd21" and summary["prior_rows_per_step"] > 2 * 2
    summary_ok(summary, tmp_path, (0, 1))
