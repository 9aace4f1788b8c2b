"""Consistent3D against its official loss written out here in their σ-parametrisation
(sail-sg/Consistent3D, stable_diffusion_guidance.py:309-400, :575-580), with the sign taken from
autograd of their ½‖x − sg(x + G)‖², and end to end in 2D, 3D and on the tiny SD."""

import math

import numpy as np
import pytest
import torch

from dsd.errors import UserError
from dsd.guidance.base import GuidanceContext
from dsd.guidance.consistent3d import Consistent3D, Consistent3DConfig
from dsd.outputs import load_result
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.run import run

PROMPT = "a hamburger"
SEEDS = [3, 8]


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8))


def guided(prior, x, t, cond, s):
    """Their CFG: ε_c + s·(ε_c − ε_u), from raw unguided rows."""
    batch = len(x)
    flags = torch.tensor([False] * batch + [True] * batch)
    raw = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), cond.cat([cond, cond]), flags)
    eps_c, eps_u = raw[:batch], raw[batch:]
    return eps_c + s * (eps_c - eps_u)


def official_grad(prior, x, eps_star, seeds, step, steps, clip):
    """∂/∂x of their loss, from scratch: t_next, t, zs, ODE step in σ, G, clamp, ½‖x − sg(x + G)‖²."""
    T = prior.num_train_timesteps
    t_next = int(700 + (100 - 700) * math.sqrt(step / steps))  # anneal_t (SG:904-916), cur_steps [0,700,100,N]
    t_next = min(max(t_next, 100), 980 - 100)
    gaps = [int(torch.randint(100, 100 + 200, (), generator=torch.Generator().manual_seed(s))) for s in seeds]
    t = torch.tensor([min(max(t_next + g, 100), 980) for g in gaps])
    t_n = torch.full((len(seeds),), t_next)
    assert T == 1000
    s = 100 + (50 - 100) * step / steps  # guidance_scale [0, 100, 50, N], threestudio's C()
    ac = prior.alphas_cumprod.float()
    sig = ((1 - ac[t]) / ac[t]).sqrt().view(-1, 1, 1, 1)
    sig_n = ((1 - ac[t_n]) / ac[t_n]).sqrt().view(-1, 1, 1, 1)
    cond = prior.condition(PROMPT, len(seeds))
    x = x.clone().requires_grad_(True)
    with torch.no_grad():
        zs = x + sig * eps_star
        e_t = guided(prior, zs / (1 + sig**2).sqrt(), t, cond, s)
        zs_next = zs + (sig_n - sig) * e_t
        e_next = guided(prior, zs_next / (1 + sig_n**2).sqrt(), t_n, cond, s)
        big_g = (e_next - e_t).clamp(-clip, clip) if clip is not None else e_next - e_t
    loss = 0.5 * ((x - (x + big_g).detach()) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, t, t_n


def context(prior, seeds, step, steps, eps_star):
    return GuidanceContext(prior=prior, cond=prior.condition(PROMPT, len(seeds)), seeds=seeds, eps_star=eps_star,
                           generators=[torch.Generator().manual_seed(s) for s in seeds], step=step, steps=steps)


@pytest.mark.parametrize("step, clip, clip_cfg", [(0, 2.0, {}), (25, 2.0 + 6 * 0.25, {}),
                                                  (64, 0.01, {"grad_clip": 0.01, "grad_clip_final": 0.01})])
def test_grad_equals_official_loss_gradient(prior, step, clip, clip_cfg):
    steps = 100
    x = torch.rand(len(SEEDS), *prior.sample_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eps_star = torch.randn(len(SEEDS), *prior.sample_shape, generator=torch.Generator().manual_seed(2))
    method = Consistent3D(Consistent3DConfig(**clip_cfg), prior)
    grad, info = method.grad(x, context(prior, SEEDS, step, steps, eps_star))
    expected, t, t_next = official_grad(prior, x, eps_star, SEEDS, step, steps, clip)
    assert info["t"] == pytest.approx(float(t.float().mean())) and info["t_next"] == float(t_next[0])
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
    assert grad.abs().max() > 1e-3  # a real signal, not two zeros
    if clip < 0.1:
        assert grad.abs().max() <= clip + 1e-7 and (grad.abs() >= clip - 1e-7).any()


def test_fixed_noise_makes_grad_depend_on_eps_star_not_on_fresh_draws(prior):
    x = torch.zeros(1, *prior.sample_shape)
    noise = [torch.randn(1, *prior.sample_shape, generator=torch.Generator().manual_seed(k)) for k in (5, 6)]
    method = Consistent3D(Consistent3DConfig(), prior)
    g = [method.grad(x, context(prior, [4], 10, 100, n))[0] for n in (noise[0], noise[0], noise[1])]
    assert torch.equal(g[0], g[1]) and not torch.allclose(g[0], g[2])


@pytest.mark.parametrize(
    "key, value",
    [("weighting", "fancy"), ("t_min", 0.5), ("gap_min", 0.4), ("grad_clip", -1.0), ("cfg_scale", 0.0),
     ("t_next_min", 0.9)],
)
def test_bad_config_is_a_user_error(prior, key, value):
    with pytest.raises(UserError, match=f"guidance.{key}"):
        Consistent3D(Consistent3DConfig(**{key: value, **({"t_max": 0.4} if key == "t_min" else {})}), prior)


FAST_3D = ("camera.video_frames=0", "camera.eval_views=2", "trainer.checkpoint_every=0")


@pytest.mark.parametrize(
    "overrides",
    [
        ("prior.image_size=16", "trainer.steps=4"),
        ("experiment=demo", "guidance=consistent3d", "representation.num_points=150", "prior.image_size=16",
         "trainer.steps=3", *FAST_3D),
    ],
    ids=["2d", "3d"],
)
def test_runs_end_to_end_on_analytic(compose, tmp_path, overrides):
    summary = run(compose("guidance=consistent3d", "seeds=[0,1]", *overrides), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [summary["seeds"][0]["steps"]] * 2
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])
    assert summary["prior_rows_per_step"] >= 4  # two guided calls per render row
    images = [load_result(tmp_path / f"seed_{s}/result.npz") for s in (0, 1)]
    assert all(np.isfinite(i).all() for i in images) and np.abs(images[0] - images[1]).max() > 1e-3


def test_runs_end_to_end_on_tiny_sd(compose, tmp_path, tiny_sd):
    summary = run(compose("prior=sd21", f"prior.pretrained={tiny_sd}", "representation=image",
                          "guidance=consistent3d", "trainer.steps=3", "seeds=2"), tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [3, 3]
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])
    assert np.isfinite(load_result(tmp_path / "seed_0/result.npz")).all()
