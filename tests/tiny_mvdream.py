"""A tiny random MVDream, built offline (tests and benchmarks).

- `build_tiny_mvdream(path, sd_dir)`: a diffusers-layout directory usable as `prior.pretrained`:
  unet/ (the multi-view UNet, `save_pretrained`) next to the tiny SD's vae/, text_encoder/,
  tokenizer/ and scheduler/ (symlinked; tests/tiny_sd.py).
- `write_original_checkpoint(unet, file)`: the same UNet as MVDream's released
  sd-v2.1-base-4view.pt spells it: `model.diffusion_model.*` in the ldm key layout, next to stand-ins
  for the VAE, OpenCLIP and schedule entries the real file also holds. The ldm names are written
  here from the ldm layout (design/PRIORS.md "Mapping ldm UNet keys to diffusers"), independently of
  dsd's converter, so converting this file checks the converter.

Sizes: three levels (two with attention), two ResBlocks per level, 16 channels per head, 32-d text
context (the tiny SD's text encoder), 8×8 latents.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

VIEWS = 4
TINY_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, head_channels=16, cross_attention_dim=32,
                 sample_size=8)
# prior=mvdream overrides that describe TINY_UNET's shape (needed to read an original checkpoint)
ORIGINAL_SHAPE_OVERRIDES = ("prior.unet_channels=[32,64,64]", "prior.unet_layers_per_block=2",
                            "prior.unet_head_channels=16")
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def tiny_unet(num_views: int = VIEWS, seed: int = 0):
    """A random tiny MVDream UNet (multi-view processors set)."""
    from dsd.priors.mvdream_model import MVDreamUNetConfig, build_mvdream_unet

    torch.manual_seed(seed)
    unet = build_mvdream_unet(MVDreamUNetConfig(num_views=num_views, **TINY_UNET)).eval()
    with torch.no_grad():  # move norms and biases off their 1/0 init, so a swapped name shows
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def reference_get_camera(elevation_deg: float, azimuth_deg: float) -> torch.Tensor:
    """MVDream camera_utils.get_camera for one view, re-derived: y-up OpenGL look-at on the unit
    sphere, then flip_yz (OpenGL y-up -> Blender z-up), flattened row-major."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up / up.norm(), -forward, pos
    flip_yz = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return (flip_yz @ m).flatten()


RES_BACK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_name(key: str, levels: int, per: int, up_has_attention: set[int]) -> str:
    """diffusers -> original MVDream (ldm) name: ldm input_blocks count conv_in then (per ResBlocks
    + a downsampler) per level; output_blocks are (per + 1) per level, the upsampler after the
    transformer if there is one."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding.linear_1": "camera_embed.0", "class_embedding.linear_2": "camera_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, leaf = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{leaf}"

    def res(rest: str) -> str:
        head, tail = rest.split(".", 1)
        return f"{RES_BACK[head]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, j = int(m[1]), int(m[2])
        return f"input_blocks.{1 + b * (per + 1) + j}.0.{res(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j = int(m[1]), int(m[2])
        return f"input_blocks.{1 + b * (per + 1) + j}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.0.{res(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * (per + 1) + per}.{2 if b in up_has_attention else 1}.conv.{m[2]}"
    raise AssertionError(f"no ldm name for {key}")


def original_checkpoint(unet, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """`unet`'s weights under MVDream's original (ldm) names."""
    state = unet.state_dict()
    up_has_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions", k)}
    levels, per = len(unet.config.block_out_channels), unet.config.layers_per_block
    return {prefix + ldm_name(k, levels, per, up_has_attention): v.clone() for k, v in state.items()}


def write_original_checkpoint(unet, file: Path) -> Path:
    """A synthetic sd-v2.1-base-4view.pt: the UNet in the ldm layout plus entries a converter
    must skip (VAE, OpenCLIP text model, noise schedule buffers)."""
    state = original_checkpoint(unet)
    state.update({"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
                  "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4),
                  "betas": torch.zeros(1000), "alphas_cumprod": torch.ones(1000)})
    torch.save(state, file)
    return Path(file)


def link_sd_components(path: Path, sd_dir: Path) -> None:
    for name in SD_COMPONENTS:
        (path / name).symlink_to((Path(sd_dir) / name).resolve())


def build_tiny_mvdream(path: Path, sd_dir: Path, seed: int = 0) -> Path:
    """Write a tiny MVDream in diffusers layout to `path` (unet/ plus the tiny SD's other parts)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed).save_pretrained(path / "unet")
    link_sd_components(path, sd_dir)
    return path
