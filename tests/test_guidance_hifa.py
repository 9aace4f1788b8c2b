"""HiFA against its official loss written out here (JunzheJosephZhu/HiFA nerf/sd.py:219-318): the
gradient w.r.t. the render of w·[½‖z − sg(ẑ)‖² + λ_rgb·½‖rgb − sg(D(ẑ))‖²], ẑ one-step or from
diffusers' DDIMScheduler (η = 1), and end to end in 2D, 3D and on the tiny SD."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.guidance.hifa import HiFA, HiFAConfig
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.run import run

PROMPT = "a hamburger"
SEEDS = [3, 8]


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8))


def guided(prior, x, t, cond, g):
    """ε_u + g·(ε_c − ε_u) from raw rows (HiFA's form, sd.py:274 without negatives)."""
    batch = len(x)
    flags = torch.tensor([False] * batch + [True] * batch)
    raw = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), cond.cat([cond, cond]), flags)
    return raw[batch:] + g * (raw[:batch] - raw[batch:])


def official_render_grad(prior, rgb, seeds, step, steps, n, lam):
    """∂L/∂rgb of HiFA's loss for a pixel prior (z = 2·rgb − 1, D(z) = clamp((z + 1)/2))."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda like: torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])  # noqa: E731
    t = int((980 - 300) * (1 - math.sqrt(step / steps)) + 300)  # sd.py:160-161, :219-222
    ac = prior.alphas_cumprod
    rgb = rgb.clone().requires_grad_(True)
    z = 2 * rgb - 1
    cond = prior.condition(PROMPT, len(seeds))
    with torch.no_grad():
        noisy = ac[t].sqrt().float() * z + (1 - ac[t]).sqrt().float() * draw(z)
        tt = torch.full((len(seeds),), t)
        if n == 1:
            eps = guided(prior, noisy, tt, cond, 100.0)
            target = (noisy - (1 - ac[t]).sqrt().float() * eps) / ac[t].sqrt().float()
        else:
            betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
            sched = DDIMScheduler(num_train_timesteps=len(ac), trained_betas=betas.numpy(), set_alpha_to_one=False,
                                  clip_sample=False)
            sched.set_timesteps(n)
            target = noisy
            for s in range(t, -1, -(len(ac) // n)):  # sd.py:370-398
                eps = guided(prior, target, torch.full((len(seeds),), s), cond, 100.0)
                target = sched.step(eps, s, target, eta=1.0, variance_noise=draw(target)).prev_sample
        decoded = ((target + 1) / 2).clamp(0, 1)
    loss = 0.05 * (0.5 * ((z - target) ** 2).sum() + lam * 0.5 * ((rgb - decoded) ** 2).sum())
    (grad,) = torch.autograd.grad(loss, rgb)
    return grad, t


@pytest.mark.parametrize("n, lam, step", [(1, 0.1, 0), (1, 0.5, 36), (4, 0.1, 9), (2, 0.0, 81)])
def test_grad_equals_official_loss_gradient(prior, n, lam, step):
    steps = 100
    rgb = torch.rand(len(SEEDS), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = 2 * rgb - 1
    ctx = GuidanceContext(prior=prior, cond=prior.condition(PROMPT, len(SEEDS)), seeds=SEEDS,
                          eps_star=torch.zeros_like(x), step=step, steps=steps,
                          generators=[torch.Generator().manual_seed(s) for s in SEEDS])
    grad, info = HiFA(HiFAConfig(denoising_steps=n, lambda_rgb=lam), prior).grad(x, ctx)
    expected, t = official_render_grad(prior, rgb, SEEDS, step, steps, n, lam)
    assert info["t"] == t
    # the trainer's Σ x·grad with x = 2·rgb − 1 hands the render 2·grad
    assert torch.allclose(2 * grad, expected, atol=2e-5, rtol=1e-3)
    assert grad.abs().max() > 1e-3


def test_image_term_pulls_back_through_the_sd_decoder(tiny_sd):
    from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior

    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd)))
    gen = torch.Generator().manual_seed(0)
    x, target = (torch.randn(2, *prior.sample_shape, generator=gen) for _ in range(2))
    got = HiFA(HiFAConfig(), prior).image_term(x, target)
    vae, sf = prior.vae, prior.scaling_factor
    decode = lambda z: ((vae.decode(z / sf).sample.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    source = x.clone().requires_grad_(True)
    with torch.no_grad():
        aim = decode(target)
    (expected,) = torch.autograd.grad(0.5 * ((decode(source) - aim) ** 2).sum(), source)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4) and expected.abs().max() > 0


@pytest.mark.parametrize(
    "key, value",
    [("t_schedule", "random"), ("t_min", 0.99), ("denoising_steps", 0), ("eta", 1.5), ("lambda_rgb", -1.0),
     ("cfg_scale", 0.0)],
)
def test_bad_config_is_a_user_error(prior, key, value):
    with pytest.raises(UserError, match=f"guidance.{key}"):
        HiFA(HiFAConfig(**{key: value}), prior)


FAST_3D = ("camera.video_frames=0", "camera.eval_views=2", "trainer.checkpoint_every=0")


@pytest.mark.parametrize(
    "overrides",
    [
        ("prior.image_size=16", "trainer.steps=4"),
        ("experiment=demo", "guidance=hifa", "representation.num_points=150", "prior.image_size=16",
         "trainer.steps=3", *FAST_3D),
    ],
    ids=["2d", "3d"],
)
def test_runs_end_to_end_on_analytic(compose, tmp_path, overrides):
    summary = run(compose("guidance=hifa", "seeds=[0,1]", *overrides), tmp_path)
    assert all(e["skipped_steps"] == 0 and e["steps"] > 0 for e in summary["seeds"])
    assert summary["prior_rows_per_step"] >= 4  # t ≥ 0.3·T: at least two guided DDIM steps per row
    images = [load_result(tmp_path / f"seed_{s}/result.npz") for s in (0, 1)]
    assert all(np.isfinite(i).all() for i in images) and np.abs(images[0] - images[1]).max() > 1e-3


def test_runs_end_to_end_on_tiny_sd(compose, tmp_path, tiny_sd):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "representation=image", "guidance=hifa",
                          "trainer.steps=3", "seeds=2", "guidance.denoising_steps=2"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [3, 3]
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])
    assert np.isfinite(load_result(tmp_path / "seed_0/result.npz")).all()
