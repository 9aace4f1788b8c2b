"""MVDream building blocks: multi-view attention, camera vector, ldm checkpoint conversion."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_mvdream import TINY_UNET as TINY  # tests/ is on sys.path, see conftest.py
from tiny_mvdream import VIEWS, ldm_name, original_checkpoint, reference_get_camera, tiny_unet

from dsd.cameras import orbit_cameras
from dsd.errors import UserError
from dsd.priors.mvdream_model import (
    MultiViewAttnProcessor,
    MVDreamUNetConfig,
    build_mvdream_unet,
    convert_mvdream_checkpoint,
    mvdream_camera,
)


def unet_inputs(objects: int, views: int = VIEWS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rows = objects * views
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.tensor([500] * rows)
    text = torch.randn(rows, 5, 32, generator=g)
    camera = torch.randn(rows, 16, generator=g)
    return x, t, text, camera


def run(unet, x, t, text, camera):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, class_labels=camera).sample


def test_processor_is_self_attention_over_the_views_of_one_object():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    h = torch.randn(2 * VIEWS, 6, 16)  # 2 objects × 4 views, 6 tokens each
    with torch.no_grad():
        attn.set_processor(MultiViewAttnProcessor(VIEWS))
        out = attn(h)
        attn.set_processor(AttnProcessor())  # diffusers' plain (non-SDPA) attention as reference
        joint = attn(h.reshape(2, VIEWS * 6, 16)).reshape(2 * VIEWS, 6, 16)
        separate = attn(h)
    torch.testing.assert_close(out, joint, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, separate, atol=1e-3)


def test_permuting_the_views_of_an_object_permutes_the_outputs():
    unet = tiny_unet()
    x, t, text, camera = unet_inputs(objects=2)
    out = run(unet, x, t, text, camera)
    perm = torch.tensor([2, 0, 3, 1, 4 + 1, 4 + 3, 4 + 0, 4 + 2])  # views shuffled within each object
    out_perm = run(unet, x[perm], t[perm], text[perm], camera[perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-4)
    # and the views do see each other: one object's other views change its first view's output
    other = x.clone()
    other[1:4] = torch.randn(3, 4, 8, 8)
    assert not torch.allclose(run(unet, other, t, text, camera)[0], out[0], atol=1e-4)
    # objects do not: changing object 1 leaves object 0 unchanged
    other = x.clone()
    other[4:] = torch.randn(4, 4, 8, 8)
    torch.testing.assert_close(run(unet, other, t, text, camera)[:4], out[:4], atol=1e-5, rtol=1e-4)


def test_one_view_is_the_plain_diffusers_unet_with_camera_added_to_time():
    from diffusers import UNet2DConditionModel

    unet = tiny_unet(num_views=1)
    plain = UNet2DConditionModel.from_config(unet.config).eval()
    plain.load_state_dict(unet.state_dict())
    plain.set_default_attn_processor()
    x, t, text, camera = unet_inputs(objects=3, views=1)
    torch.testing.assert_close(run(unet, x, t, text, camera), run(plain, x, t, text, camera), atol=1e-5, rtol=1e-4)
    # the camera goes through Linear-SiLU-Linear (MVDream's camera_embed) into the time embedding
    emb = plain.class_embedding
    assert [type(m).__name__ for m in (emb.linear_1, emb.act, emb.linear_2)] == ["Linear", "SiLU", "Linear"]
    assert emb.linear_1.in_features == 16 and emb.linear_2.out_features == 4 * TINY["block_out_channels"][0]


# --- camera -----------------------------------------------------------------------------------

@pytest.mark.parametrize("elevation,azimuth", [(0, 0), (15, 0), (15, 90), (30, -45), (-10, 170), (5, -150)])
def test_camera_matches_mvdream_get_camera_with_azimuth_offset(elevation, azimuth):
    cams = orbit_cameras(torch.tensor([float(elevation)]), torch.tensor([float(azimuth)]), torch.tensor([2.7]),
                         torch.tensor([40.0]), 64, 64)
    ours = mvdream_camera(cams.c2w.double())
    # MVDream's azimuth 90 is our azimuth 0 (design/PRIORS.md, measured against threestudio)
    torch.testing.assert_close(ours[0], reference_get_camera(elevation, azimuth + 90), atol=1e-6, rtol=0)


# --- converter --------------------------------------------------------------------------------

def test_original_checkpoint_converts_to_the_same_network():
    source = tiny_unet(seed=3)
    ckpt = original_checkpoint(source)
    assert "model.diffusion_model.camera_embed.0.weight" in ckpt
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ckpt  # upsampler after a plain level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ckpt  # ... and after a transformer
    # the rest of a full MVDream file: VAE, CLIP text model, noise schedule buffers
    ckpt.update({"first_stage_model.encoder.conv_in.weight": torch.zeros(3), "betas": torch.zeros(10),
                 "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)})
    config = MVDreamUNetConfig(num_views=VIEWS, **TINY)
    converted = convert_mvdream_checkpoint(ckpt, config)
    target = build_mvdream_unet(config).eval()
    result = target.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    inputs = unet_inputs(objects=2)
    torch.testing.assert_close(run(target, *inputs), run(source, *inputs), atol=1e-5, rtol=0)


def test_unprefixed_unet_checkpoint_converts_too():
    source = tiny_unet(seed=4)
    config = MVDreamUNetConfig(num_views=VIEWS, **TINY)
    converted = convert_mvdream_checkpoint(original_checkpoint(source, prefix=""), config)
    assert converted.keys() == source.state_dict().keys()


def test_missing_and_unexpected_keys_are_named():
    config = MVDreamUNetConfig(num_views=VIEWS, **TINY)
    ckpt = original_checkpoint(tiny_unet())
    del ckpt["model.diffusion_model.input_blocks.4.0.emb_layers.1.weight"]
    with pytest.raises(UserError, match=r"1 missing UNet keys: input_blocks\.4\.0\.emb_layers\.1\.weight"):
        convert_mvdream_checkpoint(ckpt, config)
    ckpt = original_checkpoint(tiny_unet())
    ckpt["model.diffusion_model.label_emb.0.weight"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"unexpected UNet keys: label_emb\.0\.weight"):
        convert_mvdream_checkpoint(ckpt, config)
    ckpt = original_checkpoint(tiny_unet())
    ckpt["model.diffusion_model.camera_embed.0.weight"] = torch.zeros(128, 12)
    with pytest.raises(UserError, match=r"wrong shape: class_embedding\.linear_1\.weight \(128, 12\)"):
        convert_mvdream_checkpoint(ckpt, config)


def test_full_size_layout_converts():
    """sd-v2.1-base-4view's shape (on the meta device: names and shapes only)."""
    with torch.device("meta"):
        unet = build_mvdream_unet(MVDreamUNetConfig())
    state = unet.state_dict()
    up_has_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions", k)}
    ckpt = {"model.diffusion_model." + ldm_name(k, 4, 2, up_has_attention): v for k, v in state.items()}
    for name in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.9.0.op.weight",
                 "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.weight", "camera_embed.2.bias"):
        assert "model.diffusion_model." + name in ckpt  # names of the real file (design/PRIORS.md)
    assert state["class_embedding.linear_1.weight"].shape == (1280, 16)
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 5  # 320 / 64
    assert convert_mvdream_checkpoint(ckpt).keys() == state.keys()


def test_dsd_convert_writes_a_loadable_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    from dsd import convert
    from dsd.priors.mvdream_model import set_multiview_attention

    source = tiny_unet(seed=5)
    ckpt_path = tmp_path / "tiny-4view.pt"
    torch.save(original_checkpoint(source), ckpt_path)
    convert.convert_mvdream(ckpt_path, tmp_path / "unet", MVDreamUNetConfig(num_views=VIEWS, **TINY))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    set_multiview_attention(loaded, VIEWS)
    inputs = unet_inputs(objects=1)
    torch.testing.assert_close(run(loaded, *inputs), run(source, *inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("args", [["mvdream", "{tmp}/absent.pt", "{tmp}/out"], ["zero999", "{tmp}/x.pt", "{tmp}/out"]])
def test_dsd_convert_bad_input_exits_2(tmp_path, args, capsys):
    from dsd import convert

    with pytest.raises(SystemExit) as exit_info:
        convert.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
