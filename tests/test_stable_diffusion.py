"""prior=sd21 on a tiny random Stable Diffusion saved to disk and loaded by the real loading code."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sd import build_tiny_sd  # noqa: E402  (tests/ is on sys.path, see conftest.py)

from dsd.cameras import orbit_cameras
from dsd.outputs import load_result
from dsd.priors.base import eps_from_x0
from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
from dsd.run import run
from dsd.sample import sample


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), "v_prediction", seed=1)


@pytest.fixture
def prior(tiny_sd) -> StableDiffusionPrior:
    return StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd)))


def cameras(azimuth, elevation=None):
    n = len(azimuth)
    elevation = torch.zeros(n) if elevation is None else torch.tensor(elevation, dtype=torch.float32)
    return orbit_cameras(elevation, torch.tensor(azimuth, dtype=torch.float32), torch.full((n,), 3.0),
                         torch.full((n,), 40.0), 16, 16)


def encode_text(prior, prompts):
    """Independent of the prior's cache: tokenizer + text encoder as diffusers' SD pipeline."""
    ids = prior.tokenizer(prompts, padding="max_length", max_length=prior.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return prior.text_encoder(ids)[0]


def unet(prior, x, t, hidden):
    with torch.no_grad():
        return prior.unet(x, t, encoder_hidden_states=hidden).sample


def noisy(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([900, 500, 120, 20][:batch])


def test_shapes_and_schedule(prior):
    assert prior.sample_shape == (4, 8, 8) and prior.image_shape == (3, 16, 16)
    assert prior.alphas_cumprod.dtype == torch.float64 and len(prior.alphas_cumprod) == 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_cfg_is_one_unet_call_and_matches_separate_calls(prior):
    x, t = noisy(3)
    calls = []
    prior.unet.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    cond = prior.condition("a photo of a corgi", batch=3)
    before = prior.rows_evaluated
    eps = prior.eps(x, t, cond, torch.tensor([7.5, 1.0, 100.0]))
    assert calls == [5] and prior.rows_evaluated - before == 5  # 3 conditional + 2 unconditional
    emb = encode_text(prior, ["a photo of a corgi", ""])
    e_c = unet(prior, x, t, emb[0:1].expand(3, -1, -1))
    e_u = unet(prior, x, t, emb[1:2].expand(3, -1, -1))
    expected = e_c.clone()
    for row, g in ((0, 7.5), (2, 100.0)):
        expected[row] = e_u[row] + g * (e_c[row] - e_u[row])
    torch.testing.assert_close(eps, expected, atol=1e-4, rtol=1e-4)
    assert (eps[0] - e_c[0]).abs().max() > 1e-3  # guidance really changed something


def test_negative_prompt_is_the_unconditional_branch(tiny_sd):
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd), negative_prompt="blurry ugly"))
    x, t = noisy(2)
    eps = prior.eps(x, t, prior.condition("a teapot", batch=2), 5.0)
    emb = encode_text(prior, ["a teapot", "blurry ugly"])
    e_c, e_u = (unet(prior, x, t, emb[i : i + 1].expand(2, -1, -1)) for i in (0, 1))
    torch.testing.assert_close(eps, e_u + 5.0 * (e_c - e_u), atol=1e-4, rtol=1e-4)


def f(a, b, c, r):  # threestudio's shifted exponential decay, written out
    return a * math.exp(-b * r) + c


@pytest.mark.parametrize(
    "azimuth, elevation, pos, mix, neg, weight",
    [
        (0.0, 0.0, ("front", "side"), 1.0, ("front", "side"), (f(4, .5, -2.426, 1), f(4, .5, -2.426, 0))),
        (-45.0, 10.0, ("front", "side"), 0.5, ("front", "side"), (f(4, .5, -2.426, .5), f(4, .5, -2.426, .5))),
        (90.0, 0.0, ("side", "back"), 1.0, ("side", "front"), (f(1, .5, -.606, 1), f(1, .5, .967, 1))),
        (135.0, 0.0, ("side", "back"), 0.5, ("side", "front"), (f(1, .5, -.606, .5), f(1, .5, .967, .5))),
        (180.0, 0.0, ("side", "back"), 0.0, ("side", "front"), (f(1, .5, -.606, 0), f(1, .5, .967, 0))),
        (30.0, 75.0, ("overhead", "overhead"), 1.0, None, (0.0, 0.0)),
    ],
)
def test_perp_neg_view_weights(prior, azimuth, elevation, pos, mix, neg, weight):
    cond = prior.condition("a corgi", batch=1, cameras=cameras([azimuth], [elevation]))
    row = {prior._index[f"a corgi, {v} view"]: v for v in ("front", "side", "back", "overhead")}
    assert tuple(row[int(i)] for i in cond.prompt_index[0]) == pos
    assert float(cond.prompt_mix[0]) == pytest.approx(mix)
    if neg is not None:
        assert tuple(row[int(i)] for i in cond.perp_index[0]) == neg
    assert cond.perp_weight[0].tolist() == pytest.approx(weight, abs=1e-9)


@pytest.mark.parametrize(
    "scales, rows",
    [
        ([7.5, 7.5, 7.5], 10),  # 3 conditional + 3 unconditional + 2 negatives per non-overhead row
        # g = 1 rows with negatives still need ε_u and their negatives (official DSD at x̂(t+δ));
        # the overhead row (no negatives) at g = 1 is plain ε_c and adds nothing: 3 + 2 + 4
        ([1.0, 7.5, 1.0], 9),
        ([1.0, 1.0, 1.0], 9),
    ],
)
def test_perp_neg_eps_matches_independent_projection(prior, scales, rows):
    """Perp-Neg Eq. 6 computed row by row with separate UNet calls and explicit projections, at
    any scale g, 1 included: ε_u + g·(e_pos − Σ w_i·e_i^⊥)."""
    x, t = noisy(3, seed=1)
    cams = cameras([-60.0, 150.0, 10.0], [5.0, 20.0, 80.0])
    cond = prior.condition("a corgi", batch=3, cameras=cams)
    calls = []
    prior.unet.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    before = prior.rows_evaluated
    eps = prior.eps(x, t, cond, torch.tensor(scales))
    assert calls == [rows] and prior.rows_evaluated - before == rows  # one call
    E = dict(zip(("front", "side", "back", "overhead", ""),
                 encode_text(prior, [f"a corgi, {v} view" for v in ("front", "side", "back", "overhead")] + [""])))
    r0, r1 = 1 - 60 / 90, 2 - 150 / 90
    setups = [  # (positive embedding, [(negative embedding, weight)])
        (r0 * E["front"] + (1 - r0) * E["side"],
         [(E["front"], f(4, .5, -2.426, r0)), (E["side"], f(4, .5, -2.426, 1 - r0))]),
        (r1 * E["side"] + (1 - r1) * E["back"],
         [(E["side"], f(1, .5, -.606, r1)), (E["front"], f(1, .5, .967, r1))]),
        (E["overhead"], []),
    ]
    for row, (positive, negatives) in enumerate(setups):
        xr, tr, g = x[row : row + 1], t[row : row + 1], scales[row]
        e_u = unet(prior, xr, tr, E[""][None]).flatten()
        e_c = unet(prior, xr, tr, positive[None]).flatten()
        e_pos = e_c - e_u
        total = e_pos.clone()
        for emb, w in negatives:
            e_i = unet(prior, xr, tr, emb[None]).flatten() - e_u
            total -= w * (e_i - torch.dot(e_i, e_pos) / torch.dot(e_pos, e_pos) * e_pos)
        torch.testing.assert_close(eps[row].flatten(), e_u + g * total, atol=2e-4, rtol=1e-4)
        if negatives:  # the negatives really changed the result, also at g = 1
            assert (eps[row].flatten() - (e_u + g * e_pos)).abs().max() > 1e-2


def test_view_dependent_without_perp_neg_uses_view_prompts(tiny_sd):
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd), perp_neg=False))
    cond = prior.condition("a corgi", batch=3, cameras=cameras([0.0, 100.0, 170.0]))
    views = [prior._index[f"a corgi, {v} view"] for v in ("front", "side", "back")]
    assert cond.prompt_index[:, 0].tolist() == views and cond.perp_index.shape == (3, 0)
    assert prior.eps(*noisy(3), cond, 7.5).shape == (3, 4, 8, 8) and prior.rows_evaluated == 6


def test_text_encoder_runs_once_per_distinct_prompt(prior):
    calls = []
    prior.text_encoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    for _ in range(5):
        prior.condition("a teapot", batch=4)
    assert calls == [2]  # "a teapot" and the negative prompt "", batched
    for azimuth in (0.0, 40.0, 120.0, -170.0):
        prior.condition("a teapot", batch=2, cameras=cameras([azimuth, azimuth + 10]))
    assert calls == [2, 4]  # the four view prompts, once
    prior.condition("a corgi", batch=1)
    assert calls == [2, 4, 1]
    # cache keys are small tuples, not embeddings
    cond = prior.condition("a teapot", batch=2, cameras=cameras([0.0, 40.0]))
    assert len(str(cond.cache_key(0))) < 200 and cond.cache_key(0) != cond.cache_key(1)


def test_v_prediction_is_converted_to_eps(tiny_sd_v):
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(tiny_sd_v)))
    assert prior.prediction_type == "v_prediction"
    x, t = noisy(4)
    eps = prior.predict_eps(x, t, prior.condition("a corgi", batch=4), torch.zeros(4, dtype=torch.bool))
    v = unet(prior, x, t, encode_text(prior, ["a corgi"]).expand(4, -1, -1)).double()
    a = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = a.sqrt() * x.double() - (1 - a).sqrt() * v  # v = √a·ε − √(1−a)·x0 solved for x0
    torch.testing.assert_close(eps.double(), eps_from_x0(x.double(), x0, prior.alphas_cumprod[t]),
                               atol=1e-5, rtol=1e-5)


def test_encode_is_differentiable_and_decode_inverts_shapes(prior):
    pixels = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = prior.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    latents.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    big = torch.rand(1, 3, 32, 32, requires_grad=True)  # resized to the prior's 16×16
    prior.encode(big).sum().backward()
    assert big.grad.abs().sum() > 0
    images = prior.decode(latents.detach())
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_dsd_sampling_equals_ddim_with_tiny_sd(compose, tmp_path, tiny_sd):
    common = ("prior=sd21", f"prior.pretrained={tiny_sd}", "prompt=a teapot", "seeds=[0,5]")
    sample(compose(*common, "sampler.steps=6"), tmp_path / "ddim")
    run(compose(*common, "guidance=dsd_sampling", "guidance.ode_steps=6", "trainer.steps=6"), tmp_path / "star")
    results = {}
    for seed in (0, 5):
        ddim = load_result(tmp_path / f"ddim/seed_{seed}/result.npz")
        star = load_result(tmp_path / f"star/seed_{seed}/result.npz")
        assert ddim.shape == (16, 16, 3)
        assert np.abs(ddim - star).max() <= 1e-4
        results[seed] = ddim
    assert np.abs(results[0] - results[5]).max() > 1e-3


@pytest.mark.parametrize(
    "guidance, space",
    [("dsd", "latent"), ("sds", "latent"), ("dsd_sampling", "latent"), ("dsd", "pixel")],
)
def test_text_to_2d_runs_end_to_end(compose, tmp_path, tiny_sd, guidance, space):
    extra = ("guidance.ode_steps=3",) if guidance.startswith("dsd") else ()
    summary = run(
        compose("prior=sd21", f"prior.pretrained={tiny_sd}", "representation=image", f"guidance={guidance}",
                f"representation.space={space}", "trainer.steps=3", "seeds=2", *extra),
        tmp_path,
    )
    assert summary["prior"] == "sd21" and [e["steps"] for e in summary["seeds"]] == [3, 3]
    assert summary["prior_rows_per_step"] > 0
    images = [load_result(tmp_path / f"seed_{s}/result.npz") for s in (0, 1)]
    for image in images:
        assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    assert all(e["skipped_steps"] == 0 for e in summary["seeds"])


def test_missing_weights_exit_2_with_a_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dsd-run"), "prior=sd21", "prior.pretrained=/nonexistent/sd21",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "prior.pretrained=/nonexistent/sd21" in proc.stderr
    assert "download" in proc.stderr and "not available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("pretrained", ["nonexistent-org/no-such-model", "relative/dir/missing"])
def test_missing_weights_user_error(pretrained):
    from dsd.errors import UserError

    with pytest.raises(UserError, match=f"prior.pretrained={pretrained} .*not available.*download"):
        StableDiffusionPrior(StableDiffusionConfig(pretrained=pretrained))
