"""Zero123 building blocks: relative pose, conditioner, ldm -> diffusers checkpoint conversion
(with EMA), and the input-image loader. Tiny random models only (offline, CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_zero123 import flat_ema
from tiny_zero123 import unet_to_ldm as to_ldm

from dsd.errors import UserError
from dsd.priors.input_image import load_input_image
from dsd.priors.zero123_model import (
    Zero123Conditioner,
    Zero123UNetConfig,
    build_unet,
    convert_zero123_checkpoint,
    guidance_batch,
    ldm_unet_name,
    load_zero123,
    relative_pose,
)

TINY = Zero123UNetConfig(
    block_out_channels=(32, 64), layers_per_block=1, num_heads=2, cross_attention_dim=16, sample_size=8
)

# ---------------------------------------------------------------------------------------------
# Relative pose (values computed by hand)


def test_relative_pose_zero123_convention():
    T = relative_pose(
        torch.tensor([30.0, -10.0], dtype=torch.float64),
        torch.tensor([90.0, -90.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        ref_elevation=torch.tensor([0.0, 20.0], dtype=torch.float64),
        ref_azimuth=torch.tensor([0.0, 180.0], dtype=torch.float64),
        ref_distance=torch.tensor([1.5, 1.0], dtype=torch.float64),
    )
    # view 0: polar 60° vs 90° -> −30°; Δaz +90°; Δr 0.5.  view 1: polar 100° vs 70° -> +30°; Δaz −270°.
    expected = torch.tensor([[-math.pi / 6, 1.0, 0.0, 0.5], [math.pi / 6, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(T, expected, atol=1e-12, rtol=0)


def test_relative_pose_stable_zero123_uses_input_polar():
    T = relative_pose(torch.tensor([45.0]), torch.tensor([0.0]), torch.tensor([3.0]), 15.0, 0.0, 1.0, stable=True)
    # last entry = input view's polar, 90° − 15° = 75°, instead of Δr = 2
    torch.testing.assert_close(T, torch.tensor([[-math.pi / 6, 0.0, 1.0, math.radians(75.0)]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Conditioner and the CFG batch


def test_conditioner_projects_embedding_and_pose():
    torch.manual_seed(0)
    conditioner = Zero123Conditioner(embed_dim=16)
    embedding, pose = torch.randn(1, 1, 16), torch.randn(3, 4)
    token = conditioner(embedding, pose)
    W, b = conditioner.cc_projection.weight, conditioner.cc_projection.bias
    manual = torch.cat([embedding[0].expand(3, 16), pose], dim=1) @ W.T + b
    assert token.shape == (3, 1, 16)
    torch.testing.assert_close(token[:, 0], manual)


def test_guidance_batch_zeroes_token_and_input_latent_in_uncond_half():
    noisy, context, image_latent = torch.randn(2, 4, 8, 8), torch.randn(2, 1, 16), torch.randn(1, 4, 8, 8)
    x, ctx = guidance_batch(noisy, context, image_latent)
    assert x.shape == (4, 8, 8, 8) and ctx.shape == (4, 1, 16)
    assert torch.equal(x[:, :4], torch.cat([noisy, noisy]))  # both halves see the same noisy latent
    assert torch.equal(x[:2, 4:], torch.zeros(2, 4, 8, 8)) and torch.equal(ctx[:2], torch.zeros(2, 1, 16))
    assert torch.equal(x[2:, 4:], image_latent.expand(2, -1, -1, -1)) and torch.equal(ctx[2:], context)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion

# The ldm names of the TINY layout (2 levels, 1 ResBlock, attention at level 0) are the test's own
# hand-written tables, shared with the prior's tests: tests/tiny_zero123.py.


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    unet = build_unet(TINY).eval()
    conditioner = Zero123Conditioner(TINY.cross_attention_dim).eval()  # random, not ldm's identity init
    return unet, conditioner


def original_checkpoint(unet, conditioner, ema: bool) -> dict:
    """An ORIGINAL-layout Lightning checkpoint of the source model. With `ema`, the EMA buffers
    hold the source weights and model.diffusion_model.* holds other (random) weights."""
    state = {}
    for key, value in unet.state_dict().items():
        ldm = to_ldm(key)
        state["model.diffusion_model." + ldm] = torch.randn_like(value) if ema else value.clone()
        if ema:
            state[flat_ema(ldm)] = value.clone()
    if ema:
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7)
    state["cc_projection.weight"] = conditioner.cc_projection.weight.detach().clone()
    state["cc_projection.bias"] = conditioner.cc_projection.bias.detach().clone()
    # parts the converter must ignore
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)
    state["cond_stage_model.model.visual.proj"] = torch.zeros(4, 4)
    state["betas"] = torch.zeros(1000)
    return {"state_dict": state, "global_step": 105000}


def outputs(unet, conditioner):
    gen = torch.Generator().manual_seed(1)
    noisy, image_latent = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    embedding = torch.randn(1, 16, generator=gen)
    pose = relative_pose(torch.tensor([10.0, 40.0]), torch.tensor([30.0, -60.0]), torch.tensor([3.8, 3.8]),
                         5.0, 0.0, 3.8)
    x, ctx = guidance_batch(noisy, conditioner(embedding, pose), image_latent)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20, 500, 20]), encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("ema", [False, True])
def test_converted_checkpoint_reproduces_source_model(source, ema):
    unet, conditioner = source
    checkpoint = original_checkpoint(unet, conditioner, ema)
    unet_state, projection = convert_zero123_checkpoint(checkpoint, TINY)
    assert set(unet_state) == set(unet.state_dict())
    converted_unet, converted_conditioner = load_zero123(checkpoint, TINY)  # strict load
    torch.testing.assert_close(outputs(converted_unet, converted_conditioner), outputs(unet, conditioner),
                               atol=1e-5, rtol=0)


def test_ema_weights_win_over_raw_weights(source):
    unet, conditioner = source
    checkpoint = original_checkpoint(unet, conditioner, ema=True)
    unet_state, _ = convert_zero123_checkpoint(checkpoint, TINY)
    for key, value in unet.state_dict().items():
        assert torch.equal(unet_state[key], value), key
        assert not torch.equal(unet_state[key], checkpoint["state_dict"]["model.diffusion_model." + to_ldm(key)])


@pytest.mark.parametrize("ema", [False, True])
def test_missing_key_is_user_error_naming_it(source, ema):
    checkpoint = original_checkpoint(*source, ema)
    name = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    del checkpoint["state_dict"][flat_ema(name.removeprefix("model.diffusion_model.")) if ema else name]
    with pytest.raises(UserError, match="missing") as err:
        convert_zero123_checkpoint(checkpoint, TINY)
    assert ("model_ema.diffusion_modelinput_blocks10in_layers0weight" if ema else name) in str(err.value)


def test_unexpected_and_projection_keys_are_user_errors(source):
    checkpoint = original_checkpoint(*source, ema=False)
    checkpoint["state_dict"]["model.diffusion_model.input_blocks.9.0.op.weight"] = torch.zeros(1)
    del checkpoint["state_dict"]["cc_projection.bias"]
    with pytest.raises(UserError) as err:
        convert_zero123_checkpoint(checkpoint, TINY)
    assert "model.diffusion_model.input_blocks.9.0.op.weight" in str(err.value)
    assert "cc_projection.bias" in str(err.value)


def test_shape_mismatch_is_user_error(source):
    checkpoint = original_checkpoint(*source, ema=False)
    wider = Zero123UNetConfig(block_out_channels=(64, 128), layers_per_block=1, num_heads=2,
                              cross_attention_dim=16, sample_size=8)
    with pytest.raises(UserError, match="shapes"):
        load_zero123(checkpoint, wider)


def test_full_size_layout_spot_checks():
    """Names of the real 4-level, 2-ResBlock UNet that threestudio's converter maps this way."""
    cfg = Zero123UNetConfig()
    assert ldm_unet_name("down_blocks.0.downsamplers.0.conv.weight", cfg) == "input_blocks.3.0.op.weight"
    assert ldm_unet_name("down_blocks.2.downsamplers.0.conv.bias", cfg) == "input_blocks.9.0.op.bias"
    assert ldm_unet_name("down_blocks.1.attentions.0.proj_in.weight", cfg) == "input_blocks.4.1.proj_in.weight"
    assert ldm_unet_name("down_blocks.3.resnets.1.conv2.weight", cfg) == "input_blocks.11.0.out_layers.3.weight"
    assert ldm_unet_name("up_blocks.0.upsamplers.0.conv.weight", cfg) == "output_blocks.2.1.conv.weight"
    assert ldm_unet_name("up_blocks.1.upsamplers.0.conv.weight", cfg) == "output_blocks.5.2.conv.weight"
    assert ldm_unet_name("up_blocks.2.upsamplers.0.conv.weight", cfg) == "output_blocks.8.2.conv.weight"
    assert ldm_unet_name("up_blocks.3.attentions.2.norm.weight", cfg) == "output_blocks.11.1.norm.weight"
    assert ldm_unet_name("up_blocks.1.resnets.0.conv_shortcut.weight", cfg) == \
        "output_blocks.3.0.skip_connection.weight"
    unet = build_unet(cfg, device="meta")
    assert unet.conv_in.weight.shape == (320, 8, 3, 3)
    assert unet.down_blocks[0].attentions[0].proj_in.weight.shape == (320, 320, 1, 1)  # conv, not linear


# ---------------------------------------------------------------------------------------------
# Input image


def write_rgba(path, height, width, box, colour=(255, 0, 0)):
    """Transparent (with green garbage under alpha 0) except an opaque box (top, bottom, left, right)."""
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 1] = 200
    top, bottom, left, right = box
    pixels[top:bottom, left:right, :3] = colour
    pixels[top:bottom, left:right, 3] = 255
    Image.fromarray(pixels, mode="RGBA").save(path)
    return path


@pytest.mark.parametrize("background, value", [("white", 1.0), ("black", 0.0)])
def test_rgba_off_centre_square_comes_back_centred(tmp_path, background, value):
    path = write_rgba(tmp_path / "obj.png", 64, 48, box=(5, 21, 30, 46))  # 16×16, off centre
    rgb, mask = load_input_image(path, size=32, background=background, object_fraction=0.5)  # 16 px: no resampling
    expected_mask = torch.zeros(1, 32, 32)
    expected_mask[:, 8:24, 8:24] = 1.0
    assert rgb.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    torch.testing.assert_close(mask, expected_mask)
    expected_rgb = torch.full((3, 32, 32), value)
    expected_rgb[:, 8:24, 8:24] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    torch.testing.assert_close(rgb, expected_rgb)


def test_rgba_object_scaled_to_fraction_keeping_aspect(tmp_path):
    path = write_rgba(tmp_path / "tall.png", 50, 70, box=(30, 46, 2, 10))  # 16 tall × 8 wide, in a corner
    rgb, mask = load_input_image(path, size=40)  # default: longer side 0.8·40 = 32 px
    expected_mask = torch.zeros(1, 40, 40)
    expected_mask[:, 4:36, 12:28] = 1.0
    torch.testing.assert_close(mask, expected_mask, atol=1e-6, rtol=0)
    assert torch.allclose(rgb[:, 20, 20], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(rgb[:, 0, 0], torch.ones(3))


def test_rgb_image_masks_pixels_away_from_background(tmp_path):
    pixels = np.full((40, 40, 3), 255, dtype=np.uint8)
    pixels[0:10, 20:40] = (0, 0, 255)  # 10 tall × 20 wide
    Image.fromarray(pixels, mode="RGB").save(tmp_path / "rgb.png")
    rgb, mask = load_input_image(tmp_path / "rgb.png", size=40, object_fraction=0.5)  # 20 px wide: no resampling
    expected_mask = torch.zeros(1, 40, 40)
    expected_mask[:, 15:25, 10:30] = 1.0
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(rgb[:, 15:25, 10:30], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 10, 20))


def test_no_recenter_keeps_position(tmp_path):
    path = write_rgba(tmp_path / "obj.png", 32, 32, box=(0, 8, 0, 8))
    _, mask = load_input_image(path, size=32, recenter=False)
    assert mask[0, :8, :8].min() == 1.0 and mask[0, 8:, :].max() == 0.0


@pytest.mark.parametrize("kind", ["text", "missing", "directory", "transparent"])
def test_bad_image_is_user_error_naming_prior_image(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "notes.png"
        path.write_text("not an image")
    elif kind == "missing":
        path = tmp_path / "nope.png"
    elif kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "empty.png"
        Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8), mode="RGBA").save(path)
    with pytest.raises(UserError, match="prior.image") as err:
        load_input_image(path)
    assert str(path) in str(err.value)
