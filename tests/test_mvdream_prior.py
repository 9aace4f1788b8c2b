"""prior=mvdream on a tiny random MVDream: loading (three ways), conditioning, CFG, errors, runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_mvdream import (  # tests/ is on sys.path, see conftest.py
    TINY_UNET,
    VIEWS,
    build_tiny_mvdream,
    reference_get_camera,
    tiny_unet,
    write_original_checkpoint,
)

from dsd.cameras import orbit_cameras
from dsd.errors import UserError
from dsd.priors.mvdream import MVDreamConfig, MVDreamPrior

ORIGINAL_SHAPE = dict(unet_channels=list(TINY_UNET["block_out_channels"]),
                      unet_layers_per_block=TINY_UNET["layers_per_block"], unet_head_channels=TINY_UNET["head_channels"])
ELEVATION = [0.0, 15.0, 30.0, 10.0, 5.0, 20.0, 25.0, -5.0]
AZIMUTH = [-170.0, -80.0, 10.0, 100.0, -30.0, 60.0, 150.0, -120.0]  # 2 objects × 4 views


@pytest.fixture(scope="module")
def tiny_mvdream(tmp_path_factory, tiny_sd) -> Path:
    return build_tiny_mvdream(tmp_path_factory.mktemp("tiny_mvdream"), tiny_sd, seed=0)


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, tiny_mvdream) -> Path:
    """The tiny dir's UNet as MVDream's original sd-v2.1-base-4view.pt spells it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_mvdream / "unet")
    return write_original_checkpoint(unet, tmp_path_factory.mktemp("ckpt") / "tiny-4view.pt")


@pytest.fixture(scope="module")
def prior(tiny_mvdream) -> MVDreamPrior:
    return MVDreamPrior(MVDreamConfig(pretrained=str(tiny_mvdream), negative_prompt="blurry ugly"))


def cameras(n: int = 8):
    return orbit_cameras(torch.tensor(ELEVATION[:n]), torch.tensor(AZIMUTH[:n]), torch.full((n,), 2.0),
                         torch.full((n,), 40.0), 16, 16)


def inputs(prior, rows: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *prior.sample_shape, generator=g)
    t = torch.tensor([300] * VIEWS + [700] * VIEWS)[:rows]
    return x, t


# ---- loading -----------------------------------------------------------------------------------

def test_original_checkpoint_and_converted_dir_give_the_same_eps(prior, original_ckpt, tiny_sd, tmp_path):
    from dsd import convert
    from dsd.priors.mvdream_model import MVDreamUNetConfig

    converted = convert.convert_mvdream(original_ckpt, tmp_path / "unet-only", MVDreamUNetConfig(**TINY_UNET))
    assert not (converted / "vae").exists()  # dsd-convert writes the UNet only: the rest is prior.text_encoder's
    from_ckpt = MVDreamPrior(MVDreamConfig(pretrained=str(original_ckpt), text_encoder=str(tiny_sd),
                                           negative_prompt="blurry ugly", image_size=16, **ORIGINAL_SHAPE))
    from_converted = MVDreamPrior(MVDreamConfig(pretrained=str(converted), text_encoder=str(tiny_sd),
                                                negative_prompt="blurry ugly"))
    x, t = inputs(prior)
    uncond = torch.tensor([False] * VIEWS + [True] * VIEWS)
    expected = prior.predict_eps(x, t, prior.condition("a hamburger", 8, cameras()), uncond)
    for other in (from_ckpt, from_converted):
        assert other.sample_shape == prior.sample_shape and torch.equal(other.alphas_cumprod, prior.alphas_cumprod)
        got = other.predict_eps(x, t, other.condition("a hamburger", 8, cameras()), uncond)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and a different UNet gives a different ε (the comparison can fail)
    unet = tiny_unet(seed=7)
    unet.load_state_dict({k: v + 0.01 for k, v in unet.state_dict().items()})
    other_dir = tmp_path / "other"
    unet.save_pretrained(other_dir)
    other = MVDreamPrior(MVDreamConfig(pretrained=str(other_dir), text_encoder=str(tiny_sd)))
    assert not torch.allclose(other.predict_eps(x, t, other.condition("a hamburger", 8, cameras()), uncond),
                              expected, atol=1e-3)


def test_shapes_schedule_and_the_multi_view_contract(prior):
    from dsd.priors.base import scaled_linear_alphas_cumprod

    assert prior.views_per_sample == VIEWS and prior.needs_cameras
    assert prior.sample_shape == (4, 8, 8) and prior.image_shape == (3, 16, 16)  # UNet 8² × VAE scale 2
    torch.testing.assert_close(prior.alphas_cumprod, scaled_linear_alphas_cumprod(1000, 0.00085, 0.012))


def test_encode_is_differentiable_and_resizes_renders(prior):
    renders = torch.rand(VIEWS, 3, 24, 24, requires_grad=True)
    latents = prior.encode(renders)
    assert latents.shape == (VIEWS, 4, 8, 8)
    latents.square().sum().backward()
    assert renders.grad is not None and renders.grad.abs().sum() > 0
    assert prior.decode(latents.detach()).shape == (VIEWS, 3, 16, 16)


# ---- conditioning and CFG ----------------------------------------------------------------------

def reference_branches(tiny_mvdream: Path, x, t, prompt: str, negative: str):
    """The conditional and unconditional ε written directly on the diffusers parts: text from the
    tokenizer and text encoder, cameras from MVDream's get_camera (our azimuth + 90°), the
    unconditional rows on the negative prompt with the SAME cameras."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from dsd.priors.mvdream_model import set_multiview_attention

    unet = UNet2DConditionModel.from_pretrained(tiny_mvdream / "unet").eval()
    set_multiview_attention(unet, VIEWS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_mvdream / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_mvdream / "text_encoder").eval()
    camera = torch.stack([reference_get_camera(e, a + 90) for e, a in zip(ELEVATION, AZIMUTH)]).float()
    with torch.no_grad():
        ids = tokenizer([prompt, negative], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text, neg = encoder(ids)[0]
        rows = len(x)
        cond = unet(x, t, encoder_hidden_states=text.expand(rows, -1, -1), class_labels=camera).sample
        uncond = unet(x, t, encoder_hidden_states=neg.expand(rows, -1, -1), class_labels=camera).sample
    return cond, uncond


def check_against_reference(prior, tiny_mvdream: Path, prompt: str, scale: float = 7.5) -> None:
    x, t = inputs(prior)
    cond = prior.condition(prompt, 8, cameras())
    ref_cond, ref_uncond = reference_branches(tiny_mvdream, x, t, prompt, "blurry ugly")
    # raw rows: the first 8 conditional, the next 8 (the same cameras) unconditional, one call
    both = type(cond).cat([cond, cond])
    raw = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), both, torch.arange(16) >= 8)
    torch.testing.assert_close(raw[:8], ref_cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(raw[8:], ref_uncond, atol=1e-5, rtol=1e-4)
    # guided: CFG multiplies the branches' float error by up to 2·scale
    expected = ref_uncond + scale * (ref_cond - ref_uncond)
    torch.testing.assert_close(prior.eps(x, t, cond, scale), expected, atol=2 * scale * 1e-5, rtol=1e-4)


def test_eps_matches_an_independent_unet_call(prior, tiny_mvdream):
    check_against_reference(prior, tiny_mvdream, "a hamburger")


def test_prompt_suffix_is_appended(tiny_mvdream):
    suffixed = MVDreamPrior(MVDreamConfig(pretrained=str(tiny_mvdream), negative_prompt="blurry ugly",
                                          prompt_suffix=" on the table"))
    x, t = inputs(suffixed)
    raw = suffixed.predict_eps(x, t, suffixed.condition("a hamburger", 8, cameras()), torch.zeros(8, dtype=torch.bool))
    ref_cond, _ = reference_branches(Path(suffixed.cfg.pretrained), x, t, "a hamburger on the table", "blurry ugly")
    torch.testing.assert_close(raw, ref_cond, atol=1e-5, rtol=1e-4)


def test_permuting_the_views_of_an_object_permutes_eps(prior):
    x, t = inputs(prior)
    cams = cameras()
    uncond = torch.arange(8) >= 4  # object 1 on the unconditional branch

    def eps(x, cams):
        return prior.predict_eps(x, t, prior.condition("a hamburger", 8, cams), uncond)

    out = eps(x, cams)
    perm = torch.tensor([3, 1, 0, 2, 6, 4, 7, 5])  # within each object
    torch.testing.assert_close(eps(x[perm], cams.rows(perm)), out[perm], atol=1e-5, rtol=1e-4)
    # the views of an object see each other: another view of object 0 changes view 0's ε
    other = x.clone()
    other[2] = torch.randn_like(other[2])
    assert not torch.allclose(eps(other, cams)[0], out[0], atol=1e-4)


def test_condition_holds_cameras_and_text_rows(prior):
    cond = prior.condition("a hamburger", 8, cameras())
    assert len(cond) == 8 and cond.camera.shape == (8, 16)
    assert (cond.prompt_index != cond.negative_index).all()
    assert len(cond.rows(torch.arange(4))) == 4 and len(type(cond).cat([cond, cond])) == 16
    # the cache key holds the camera: two views of one seed are different conditions
    assert cond.cache_key(0) != cond.cache_key(1)


def test_condition_and_row_errors(prior):
    with pytest.raises(UserError, match="representation=gaussians or nerf"):
        prior.condition("a hamburger", 8, None)
    with pytest.raises(UserError, match="prior.num_views=4.*6"):
        prior.condition("a hamburger", 6, cameras(6))
    x, t = inputs(prior)
    cond = prior.condition("a hamburger", 8, cameras())
    uncond = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="whole objects"):
        prior.predict_eps(x[:6], t[:6], cond.rows(torch.arange(6)), uncond[:6])
    with pytest.raises(ValueError, match="one t per object"):
        prior.predict_eps(x, torch.arange(8) * 100, cond, uncond)
    mixed = uncond.clone()
    mixed[1] = True
    with pytest.raises(ValueError, match="one unconditional per object"):
        prior.predict_eps(x, t, cond, mixed)


# ---- bad weights -------------------------------------------------------------------------------

def test_original_checkpoint_with_wrong_keys_names_them(original_ckpt, tiny_sd, tmp_path):
    state = torch.load(original_ckpt, weights_only=True)
    del state["model.diffusion_model.input_blocks.4.0.emb_layers.1.weight"]
    state["model.diffusion_model.label_emb.0.weight"] = torch.zeros(3)
    broken = tmp_path / "broken-4view.pt"
    torch.save(state, broken)
    with pytest.raises(UserError, match=r"prior.pretrained=.*broken-4view.pt.*input_blocks\.4\.0\.emb_layers"
                                        r"\.1\.weight.*label_emb\.0\.weight"):
        MVDreamPrior(MVDreamConfig(pretrained=str(broken), text_encoder=str(tiny_sd), **ORIGINAL_SHAPE))
    with pytest.raises(UserError, match="prior.unet_channels"):  # the default (full-size) shape
        MVDreamPrior(MVDreamConfig(pretrained=str(original_ckpt), text_encoder=str(tiny_sd)))


def test_plain_stable_diffusion_dir_is_refused(tiny_sd):
    with pytest.raises(UserError, match="without MVDream's camera embedding"):
        MVDreamPrior(MVDreamConfig(pretrained=str(tiny_sd)))


def test_missing_text_encoder_names_the_key(tiny_mvdream, tmp_path):
    (tmp_path / "unet").symlink_to((tiny_mvdream / "unet").resolve())
    with pytest.raises(UserError, match="prior.text_encoder=/nonexistent/sd21 .*download"):
        MVDreamPrior(MVDreamConfig(pretrained=str(tmp_path), text_encoder="/nonexistent/sd21"))


def unet_dir_with_a_missing_key(tiny_mvdream: Path, path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path.mkdir()
    (path / "config.json").write_text((tiny_mvdream / "unet" / "config.json").read_text())
    state = load_file(tiny_mvdream / "unet" / "diffusion_pytorch_model.safetensors")
    del state["down_blocks.1.resnets.0.time_emb_proj.weight"]
    save_file(state, path / "diffusion_pytorch_model.safetensors")
    return path


@pytest.mark.parametrize("case", ["absent", "hub_offline", "missing_key"])
def test_bad_weights_exit_2_through_the_cli(case, tmp_path, tiny_mvdream, tiny_sd):
    overrides, needles = [], []
    if case == "absent":
        overrides, needles = ["prior.pretrained=/nonexistent/mvdream"], ["prior.pretrained=/nonexistent/mvdream",
                                                                          "dsd-convert mvdream", "not available"]
    elif case == "hub_offline":  # the default: the hub repo, offline
        needles = ["prior.pretrained=MVDream/MVDream", "download"]
    else:
        broken = unet_dir_with_a_missing_key(tiny_mvdream, tmp_path / "broken")
        overrides = [f"prior.pretrained={broken}", f"prior.text_encoder={tiny_sd}"]
        needles = ["1 missing keys: down_blocks.1.resnets.0.time_emb_proj.weight", "dsd-convert mvdream"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dsd-run"), "prior=mvdream", "representation=gaussians", *overrides,
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    for needle in needles:
        assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- end to end --------------------------------------------------------------------------------

FAST_3D = ("camera.video_frames=0", "camera.eval_views=4", "trainer.checkpoint_every=0", "trainer.steps=2")
REPRESENTATIONS = {
    "gaussians": ("representation=gaussians", "representation.num_points=150"),
    "nerf": ("representation=nerf", "representation.num_samples=16", "representation.resolutions=[]",
             "representation.lambda_orient=0", "representation.mesh_resolution=32",
             "representation.eval_resolution=16"),
}


@pytest.mark.parametrize("representation", sorted(REPRESENTATIONS))
def test_tiny_mvdream_text_to_3d_end_to_end(compose, tmp_path, tiny_mvdream, representation):
    from dsd.outputs import load_result
    from dsd.run import run

    cfg = compose("prior=mvdream", f"prior.pretrained={tiny_mvdream}", "guidance=dsd",
                  *REPRESENTATIONS[representation], *FAST_3D, "seeds=[0,1,2,3]")
    summary = run(cfg, tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [2, 2, 2, 2]
    for seed in range(4):
        assert load_result(tmp_path / f"seed_{seed}/result.npz").shape == (16, 16, 3)
    # every seed is one object of 4 views per step: the prior only ever sees whole objects, and DSD's
    # x̂(t) with CFG (2 × 4 rows) and x̂(t+δ) (4 rows) are at least 3 × 4 rows per seed and step
    assert all(e["prior_rows"] % VIEWS == 0 for e in summary["seeds"])
    assert summary["prior_rows_per_step"] >= 3 * VIEWS
