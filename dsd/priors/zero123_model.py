"""Zero-1-to-3 (Zero123 / Zero123-XL / Stable Zero123) building blocks: the relative-pose vector,
the image+pose conditioner, the 8-channel UNet and a converter from the ORIGINAL ldm checkpoint.

Facts (checked in the public code; see /work/shared/design/PRIORS.md, section 2):
- The UNet sees `cat([noisy latent, input-view latent], dim=1)` (8 channels; ldm conditioning_key
  "hybrid") and cross-attends to ONE token: `cc_projection(cat([CLIP image embedding (768), T (4)]))`
  with cc_projection = Linear(772 → 768) (zero123 ldm/models/diffusion/ddpm.py, LatentDiffusion).
- Unconditional branch (threestudio threestudio/models/guidance/zero123_guidance.py, `get_cond`):
  zeros AFTER cc_projection (`torch.zeros_like(clip_emb)`, clip_emb being the projected token) and
  a zero input-view latent; batch ordered [uncond; cond].
- The input-view latent is the VAE posterior mode() NOT multiplied by 0.18215 (same `get_img_embeds`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsd.errors import UserError
from dsd.priors import ldm_unet
from dsd.priors.ldm_unet import key_listing

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")  # LitEma buffers that are not weights
PROJECTION_PREFIX = "cc_projection."
POSE_DIM = 4  # [Δpolar, sin Δazimuth, cos Δazimuth, Δradius (Zero123) | input polar (Stable Zero123)]


# ----------------------------------------------------------------------------------------------
# Relative pose


def relative_pose(
    elevation: Tensor,
    azimuth: Tensor,
    distance: Tensor,
    ref_elevation: float | Tensor,
    ref_azimuth: float | Tensor,
    ref_distance: float | Tensor,
    stable: bool = False,
) -> Tensor:
    """Zero123's 4-vector T for target views (elevation, azimuth in DEGREES, distance) relative to
    the input view (ref_*). (...,) -> (..., 4), in the dtype of `elevation`.

    Zero123's polar angle is measured from +z, so polar = 90° − elevation, and its azimuth turns
    from +x towards +y as threestudio's does (zero123 ldm/data/simple.py `get_T`; threestudio
    zero123_guidance.py `get_cond`):
      T = [rad((90 − e) − (90 − e_ref)), sin(rad(a − a_ref)), cos(rad(a − a_ref)), d − d_ref].
    Stable Zero123 (`stable=True`) replaces the last entry by the input view's absolute polar
    rad(90 − e_ref) (threestudio stable_zero123_guidance.py `get_cond`; ComfyUI nodes_stable3d.py).
    """
    elevation, azimuth, distance = (torch.as_tensor(v) for v in (elevation, azimuth, distance))
    ref_elevation, ref_azimuth, ref_distance = (
        torch.as_tensor(v, dtype=elevation.dtype, device=elevation.device)
        for v in (ref_elevation, ref_azimuth, ref_distance)
    )
    polar, ref_polar = 90.0 - elevation, 90.0 - ref_elevation
    d_azimuth = torch.deg2rad(azimuth - ref_azimuth)
    last = torch.deg2rad(ref_polar).expand_as(polar) if stable else distance - ref_distance
    return torch.stack([torch.deg2rad(polar - ref_polar), torch.sin(d_azimuth), torch.cos(d_azimuth), last], dim=-1)


# ----------------------------------------------------------------------------------------------
# Conditioning


class Zero123Conditioner(nn.Module):
    """CLIP image embedding ⊕ pose T -> the single cross-attention token, via `cc_projection`."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.cc_projection = nn.Linear(embed_dim + POSE_DIM, embed_dim)

    def forward(self, image_embedding: Tensor, pose: Tensor) -> Tensor:
        """image_embedding (B, D) or (B, 1, D), or one row broadcast to B; pose (B, 4) -> (B, 1, D)."""
        embedding = image_embedding.reshape(-1, self.embed_dim)
        embedding = embedding.expand(pose.shape[0], -1) if embedding.shape[0] == 1 else embedding
        token = self.cc_projection(torch.cat([embedding, pose.to(embedding.dtype)], dim=-1))
        return token[:, None, :]


def unconditional_context(context: Tensor) -> Tensor:
    """The CFG null token: zeros after the projection (threestudio zero123_guidance.py `get_cond`)."""
    return torch.zeros_like(context)


def unet_input(noisy_latents: Tensor, image_latents: Tensor) -> Tensor:
    """The 8-channel UNet input: noisy latents (B, 4, h, w) ⊕ the input-view latent (B or 1, 4, h, w)."""
    return torch.cat([noisy_latents, image_latents.expand_as(noisy_latents)], dim=1)


def guidance_batch(noisy_latents: Tensor, context: Tensor, image_latents: Tensor) -> tuple[Tensor, Tensor]:
    """UNet inputs for one CFG call, ordered [uncond; cond] as threestudio: the unconditional half
    has a zero token AND a zero input-view latent. -> (x (2B, 8, h, w), context (2B, 1, D))."""
    image_latents = image_latents.expand_as(noisy_latents)
    x = torch.cat([unet_input(noisy_latents, torch.zeros_like(image_latents)), unet_input(noisy_latents, image_latents)])
    return x, torch.cat([unconditional_context(context), context])


# ----------------------------------------------------------------------------------------------
# UNet


@dataclass
class Zero123UNetConfig:
    """The ldm UNet of sd-objaverse-finetune-c_concat-256.yaml (zero123 configs): model_channels 320,
    channel_mult [1,2,4,4], num_res_blocks 2, attention at every level but the deepest
    (attention_resolutions [4,2,1]), num_heads 8, context_dim 768, 8 in / 4 out channels, 32×32."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_heads: int = 8
    cross_attention_dim: int = 768
    in_channels: int = 8
    out_channels: int = 4
    sample_size: int = 32
    norm_num_groups: int = 32  # ldm's GroupNorm32


def build_unet(cfg: Zero123UNetConfig, device: torch.device | str | None = None):
    """A diffusers UNet2DConditionModel with the Zero123 layout (SD1.x-shaped: conv proj_in/out)."""
    from diffusers import UNet2DConditionModel

    kwargs = ldm_unet.unet_kwargs(
        cfg.block_out_channels,
        heads=cfg.num_heads,  # the same head count at every level (SD 1.x layout)
        linear_projection=False,  # ldm use_linear_in_transformer: False -> 1×1 conv proj_in/out
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return UNet2DConditionModel(**kwargs)


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion (original ldm layout -> diffusers)

def ldm_unet_name(key: str, cfg: Zero123UNetConfig) -> str:
    """The ldm name (without `model.diffusion_model.`) of the diffusers UNet parameter `key`; attention
    at every level but the deepest. KeyError for a name outside this layout."""
    levels = len(cfg.block_out_channels)
    return ldm_unet.ldm_unet_name(key, levels, cfg.layers_per_block, ldm_unet.attention_levels(levels))


def ema_name(ldm_key: str) -> str:
    """LitEma's buffer for a UNet weight: `model_ema.` + the name relative to `model.` with the dots
    removed (zero123 ldm/modules/ema.py; diffusers convert_from_ckpt.py builds `flat_ema_key` so)."""
    return EMA_PREFIX + ldm_key.removeprefix("model.").replace(".", "")


def _layout_error(what: str, missing, unexpected) -> UserError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {key_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {key_listing(unexpected)}")
    return UserError(f"{what} does not have the Zero123 (ldm sd-objaverse-finetune-c_concat-256) layout: "
                     f"{'; '.join(parts)}. Accepted: an original zero123 / zero123-xl / stable-zero123 .ckpt.")


def _unet_keys(cfg: Zero123UNetConfig) -> list[str]:
    return list(build_unet(cfg, device="meta").state_dict().keys())


def convert_zero123_checkpoint(
    checkpoint: Mapping, cfg: Zero123UNetConfig | None = None, source: str = "the Zero123 checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """ORIGINAL Zero123 checkpoint (the Lightning dict or its `state_dict`) -> (UNet state dict in
    diffusers layout, cc_projection state dict {weight, bias}). UNet weights come from the EMA
    (`model_ema.*`) when the checkpoint has it, as threestudio loads it (`model_ema.copy_to`);
    cc_projection is not covered by the EMA. VAE, CLIP and schedule buffers are ignored here.
    A layout mismatch is a UserError listing a few missing / unexpected keys."""
    cfg = cfg or Zero123UNetConfig()
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserError(f"{source} is not a state dict (got {type(checkpoint).__name__}); "
                        "accepted: an original zero123 .ckpt ({'state_dict': ...}).")
    sources = {key: UNET_PREFIX + ldm_unet_name(key, cfg) for key in _unet_keys(cfg)}
    use_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in state)
    expected = set(sources.values()) | {PROJECTION_PREFIX + "weight", PROJECTION_PREFIX + "bias"}
    if use_ema:
        expected |= {ema_name(k) for k in sources.values()}
    present = {k for k in state if k.startswith((UNET_PREFIX, PROJECTION_PREFIX))
               or (k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING)}
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        raise _layout_error(source, missing, unexpected)
    unet = {key: state[ema_name(ldm) if use_ema else ldm] for key, ldm in sources.items()}
    projection = {name: state[PROJECTION_PREFIX + name] for name in ("weight", "bias")}
    return unet, projection


def load_zero123(
    checkpoint: Mapping, cfg: Zero123UNetConfig | None = None, source: str = "the Zero123 checkpoint"
):
    """Convert and load: -> (diffusers UNet, Zero123Conditioner), both in eval mode. A shape
    mismatch (e.g. a checkpoint of another size) is a UserError."""
    cfg = cfg or Zero123UNetConfig()
    unet_state, projection_state = convert_zero123_checkpoint(checkpoint, cfg, source)
    unet, conditioner = build_unet(cfg), Zero123Conditioner(cfg.cross_attention_dim)
    try:
        unet.load_state_dict(unet_state, strict=True)
        conditioner.cc_projection.load_state_dict(projection_state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{source} has the Zero123 key layout but other tensor shapes "
                        f"({str(err).splitlines()[-1].strip()[:300]}); accepted: a checkpoint matching "
                        f"{cfg}.") from None
    return unet.eval(), conditioner.eval()


# ----------------------------------------------------------------------------------------------
# The rest of the original checkpoint: layouts read from tensor shapes, VAE, schedule

LDM_NUM_HEADS = 8  # sd-objaverse-finetune-c_concat-256.yaml num_heads (not stored in the weights)
LDM_NORM_GROUPS = 32  # ldm's GroupNorm32 / Normalize, in the UNet and the VAE
VAE_PREFIX = "first_stage_model."
VAE_SCALE_FACTOR = 0.18215  # the yaml's scale_factor
# The yaml's linear_start/linear_end/timesteps; ldm "linear" is diffusers "scaled_linear" (PRIORS.md)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1}


def _not_zero123(source: str, missing: str) -> UserError:
    return UserError(f"{source} does not have the Zero123 (ldm) layout: no {missing}. Accepted: an original "
                     "zero123 / zero123-xl / stable-zero123 .ckpt.")


def _indices(state: Mapping, prefix: str) -> set[int]:
    """The integers i of the keys `prefix + i + "."...`."""
    return {int(k[len(prefix):].split(".", 1)[0]) for k in state
            if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}


def infer_unet_config(state: Mapping[str, Tensor], source: str = "the Zero123 checkpoint",
                      sample_size: int = 32) -> Zero123UNetConfig:
    """The UNet layout of an original checkpoint from its tensor shapes (channels, levels, ResBlocks
    per level, context size); the head count is the yaml's, which the weights do not record."""
    def shape(name: str) -> tuple[int, ...]:
        if UNET_PREFIX + name not in state:
            raise _not_zero123(source, UNET_PREFIX + name)
        return tuple(state[UNET_PREFIX + name].shape)

    conv_in = shape("input_blocks.0.0.weight")
    blocks = _indices(state, UNET_PREFIX + "input_blocks.")
    downsamples = sum(UNET_PREFIX + f"input_blocks.{i}.0.op.weight" in state for i in blocks)
    levels = downsamples + 1
    per_block = (len(blocks) - 1 - downsamples) // levels
    channels = tuple(shape(f"input_blocks.{1 + b * (per_block + 1)}.0.out_layers.3.weight")[0] for b in range(levels))
    context = next((tuple(v.shape)[1] for k, v in state.items()
                    if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if context is None:
        raise _not_zero123(source, "cross-attention (attn2.to_k) weights")
    return Zero123UNetConfig(block_out_channels=channels, layers_per_block=per_block, num_heads=LDM_NUM_HEADS,
                             cross_attention_dim=context, in_channels=conv_in[1],
                             out_channels=shape("out.2.weight")[0], sample_size=sample_size,
                             norm_num_groups=LDM_NORM_GROUPS)


def vae_kwargs(state: Mapping[str, Tensor], source: str = "the Zero123 checkpoint") -> dict:
    """`AutoencoderKL` arguments of the checkpoint's kl-f8 VAE (`first_stage_model.*`), from shapes."""
    def shape(name: str) -> tuple[int, ...]:
        if VAE_PREFIX + name not in state:
            raise _not_zero123(source, VAE_PREFIX + name)
        return tuple(state[VAE_PREFIX + name].shape)

    levels = len(_indices(state, VAE_PREFIX + "encoder.down."))
    per_block = len(_indices(state, VAE_PREFIX + "encoder.down.0.block."))
    return dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)),
        layers_per_block=per_block,
        latent_channels=shape("encoder.conv_out.weight")[0] // 2,  # the encoder outputs mean ⊕ logvar
        norm_num_groups=LDM_NORM_GROUPS,
        scaling_factor=VAE_SCALE_FACTOR,
    )


def load_vae(state: Mapping[str, Tensor], source: str = "the Zero123 checkpoint"):
    """The checkpoint's VAE as a diffusers `AutoencoderKL` (diffusers' own ldm VAE key mapping),
    strictly loaded: a mismatch is a UserError listing a few keys."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    kwargs = vae_kwargs(state, source)
    vae = AutoencoderKL(**kwargs)
    ldm = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    converted = {k: v for k, v in convert_ldm_vae_checkpoint(ldm, kwargs).items() if v is not None}
    expected = set(vae.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise _layout_error(f"{source} (VAE, {VAE_PREFIX}*)", missing, unexpected)
    try:
        vae.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise UserError(f"{source}: the VAE weights have other shapes than its layout "
                        f"({str(err).splitlines()[-1].strip()[:300]}).") from None
    return vae.eval()


__all__ = [
    "Zero123Conditioner",
    "Zero123UNetConfig",
    "build_unet",
    "convert_zero123_checkpoint",
    "ema_name",
    "guidance_batch",
    "infer_unet_config",
    "load_vae",
    "ldm_unet_name",
    "load_zero123",
    "relative_pose",
    "unconditional_context",
    "unet_input",
]
