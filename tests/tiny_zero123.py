"""A tiny random Zero123 built offline, in both layouts the prior loads.

- `build_tiny_zero123(path)`: a diffusers-layout folder as the hub exports have it (unet/ with 8
  input channels, vae/, image_encoder/ (CLIPVisionModelWithProjection), scheduler/ and the pose
  projection in clip_camera_projection/ (`proj.*`) or cc_projection/ (`projection.*`)).
- `write_original_checkpoint(folder, ckpt)`: the same weights as an ORIGINAL ldm Lightning
  checkpoint ({"state_dict": ...}) with the real key names (model.diffusion_model.*, EMA buffers
  model_ema.*, first_stage_model.*, cc_projection.*), at tiny channel counts.

Sizes: UNet channels (32, 64), one ResBlock per level, attention at the first level, 8 heads (the
yaml's), 32-d context; VAE (32, 64) (scale 2, GroupNorm 32 as ldm), 16×16 pixels -> 8×8 latents.
The name mappings below are written out by hand for exactly this layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONTEXT = 32
IMAGE = 16

# The UNet's ldm layout (channel_mult (1, 2), num_res_blocks 1, attention at level 0):
# ldm module -> diffusers module.
UNET_LDM_MODULES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "input_blocks.1.1": "down_blocks.0.attentions.0",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0": "down_blocks.1.resnets.0",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.2.0": "up_blocks.1.resnets.0",
    "output_blocks.2.1": "up_blocks.1.attentions.0",
    "output_blocks.3.0": "up_blocks.1.resnets.1",
    "output_blocks.3.1": "up_blocks.1.attentions.1",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
LDM_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# The VAE's ldm layout (ch_mult (1, 2), num_res_blocks 1): ldm module -> diffusers module.
VAE_LDM_MODULES = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.down.0.block.0": "encoder.down_blocks.0.resnets.0",
    "encoder.down.0.downsample.conv": "encoder.down_blocks.0.downsamplers.0.conv",
    "encoder.down.1.block.0": "encoder.down_blocks.1.resnets.0",
    "encoder.mid.block_1": "encoder.mid_block.resnets.0",
    "encoder.mid.attn_1": "encoder.mid_block.attentions.0",
    "encoder.mid.block_2": "encoder.mid_block.resnets.1",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.mid.block_1": "decoder.mid_block.resnets.0",
    "decoder.mid.attn_1": "decoder.mid_block.attentions.0",
    "decoder.mid.block_2": "decoder.mid_block.resnets.1",
    "decoder.up.1.block.0": "decoder.up_blocks.0.resnets.0",  # ldm numbers decoder levels from the top
    "decoder.up.1.block.1": "decoder.up_blocks.0.resnets.1",
    "decoder.up.1.upsample.conv": "decoder.up_blocks.0.upsamplers.0.conv",
    "decoder.up.0.block.0": "decoder.up_blocks.1.resnets.0",
    "decoder.up.0.block.1": "decoder.up_blocks.1.resnets.1",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
LDM_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _to_ldm(key: str, modules: dict[str, str]) -> tuple[str, str, str]:
    """-> (ldm module, diffusers module, the rest of the name) for the longest matching module."""
    for ldm, ours in sorted(modules.items(), key=lambda kv: -len(kv[1])):
        if key.startswith(ours + "."):
            return ldm, ours, key[len(ours) + 1:]
    raise AssertionError(f"no hand-written ldm name for {key}")


def unet_to_ldm(key: str) -> str:
    ldm, ours, rest = _to_ldm(key, UNET_LDM_MODULES)
    if ".resnets." in ours:
        module, param = rest.split(".", 1)
        rest = {v: k for k, v in LDM_RESBLOCK.items()}[module] + "." + param
    return f"{ldm}.{rest}"


def vae_to_ldm(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """ldm name and tensor: ldm's VAE attention uses 1×1 convs where diffusers has Linear layers."""
    ldm, ours, rest = _to_ldm(key, VAE_LDM_MODULES)
    if ".attentions." in ours:
        module, param = rest.rsplit(".", 1)
        rest = {v: k for k, v in LDM_VAE_ATTENTION.items()}[module] + "." + param
        if value.dim() == 2:
            value = value[:, :, None, None]
    elif ".resnets." in ours:
        rest = rest.replace("conv_shortcut", "nin_shortcut")
    return f"{ldm}.{rest}", value


def flat_ema(ldm_unet_key: str) -> str:
    """LitEma's buffer name: "model_ema." + the name under `model.` without its dots."""
    return "model_ema." + ("diffusion_model." + ldm_unet_key).replace(".", "")


def build_tiny_zero123(path: Path, seed: int = 0, projection_folder: str = "clip_camera_projection") -> Path:
    """Write a tiny random Zero123 in diffusers layout to `path` and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE // 2,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT,
        attention_head_dim=8,  # the head count, 8 as the ldm yaml
        use_linear_projection=False,  # conv proj_in/out as ldm's use_linear_in_transformer False
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE,
        scaling_factor=0.18215,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=CONTEXT, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE, patch_size=8,
    ))
    projection = torch.nn.Linear(CONTEXT + 4, CONTEXT)  # random, not ldm's identity init
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    image_encoder.save_pretrained(path / "image_encoder")
    scheduler.save_pretrained(path / "scheduler")
    prefix = {"clip_camera_projection": "proj.", "cc_projection": "projection."}[projection_folder]
    (path / projection_folder).mkdir(parents=True)
    save_file({prefix + "weight": projection.weight.detach().contiguous(), prefix + "bias": projection.bias.detach()},
              str(path / projection_folder / "diffusion_pytorch_model.safetensors"))
    (path / projection_folder / "config.json").write_text(json.dumps({"embedding_dim": CONTEXT}))
    return path


def write_original_checkpoint(folder: Path, ckpt: Path, ema: bool = True) -> Path:
    """The weights of the diffusers folder as an original Lightning checkpoint. With `ema`, the EMA
    buffers hold the folder's UNet and model.diffusion_model.* other (random) weights, as a
    checkpoint whose EMA has drifted from the raw weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    projection = load_file(str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    state = {}
    generator = torch.Generator().manual_seed(123)
    for key, value in unet.state_dict().items():
        ldm = unet_to_ldm(key)
        raw = torch.randn(value.shape, generator=generator) if ema else value.clone()
        state["model.diffusion_model." + ldm] = raw
        if ema:
            state[flat_ema(ldm)] = value.clone()
    if ema:
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(105000)
    for key, value in vae.state_dict().items():
        ldm, tensor = vae_to_ldm(key, value)
        state["first_stage_model." + ldm] = tensor.clone()
    state["cc_projection.weight"], state["cc_projection.bias"] = projection["proj.weight"], projection["proj.bias"]
    # parts every loader must ignore: the OpenAI CLIP and ldm's schedule buffers
    state["cond_stage_model.model.visual.proj"] = torch.zeros(32, CONTEXT)
    state["betas"], state["alphas_cumprod"] = torch.zeros(1000), torch.zeros(1000)
    torch.save({"state_dict": state, "global_step": 105000}, ckpt)
    return Path(ckpt)
