"""MVDream's multi-view UNet on diffusers blocks, its camera vector, and its checkpoint converter.

MVDream (Shi et al. 2023, bytedance/MVDream) is the SD 2.1-base UNet with exactly two changes
(design/PRIORS.md §1, read in mvdream/ldm/modules/diffusionmodules/openaimodel.py and
mvdream/ldm/modules/attention.py):
1. `camera_embed` = Linear(16, 4·C0) · SiLU · Linear(4·C0, 4·C0) of the flattened 4×4 camera,
   added to the time embedding. That is diffusers' `class_embed_type="projection"`
   (a TimestepEmbedding: linear_1, SiLU, linear_2; the 16 numbers go in without a sinusoid).
2. Every transformer's self-attention (`attn1`) attends over the tokens of all F views of one
   object (`"(b f) l c -> b (f l) c"` in BasicTransformerBlock3D). Here a processor on every
   `attn1` joins the views before attention and splits them after. The F views of one object
   must be adjacent in the batch: rows are objects × F, F fastest.
No run integration here: this module only builds, converts and feeds the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.errors import UserError
from dsd.priors import ldm_unet
from dsd.priors.ldm_unet import key_listing, renamed

CAMERA_DIM = 16  # a flattened 4×4 camera-to-world matrix
LDM_UNET_PREFIX = "model.diffusion_model."


@dataclass
class MVDreamUNetConfig:
    """The UNet's shape. Defaults: MVDream's sd-v2-base.yaml (model_channels 320, channel_mult
    [1,2,4,4], num_res_blocks 2, attention_resolutions [4,2,1] = every level but the last,
    num_head_channels 64, context_dim 1024, camera_dim 16, 32×32 latents)."""

    num_views: int = 4  # F: views of one object that attend to each other
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # ldm num_res_blocks
    head_channels: int = 64  # ldm num_head_channels: heads = channels / head_channels
    cross_attention_dim: int = 1024
    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32

    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def diffusers_kwargs(self) -> dict:
        return ldm_unet.unet_kwargs(
            self.block_out_channels,
            heads=tuple(c // self.head_channels for c in self.block_out_channels),
            linear_projection=True,  # ldm use_linear_in_transformer: True (SD 2.x)
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups,
            class_embed_type="projection",  # MVDream's camera_embed
            projection_class_embeddings_input_dim=CAMERA_DIM,
        )


class MultiViewAttnProcessor:
    """Self-attention over the F views of each object: (B·F, L, C) rows are regrouped to
    (B, F·L, C), attended by `inner` (diffusers' SDPA processor: same heads, scale and
    projections) and split back. F is an attribute, not a call argument: diffusers'
    Attention.forward drops keyword arguments a processor's __call__ does not declare."""

    def __init__(self, num_views: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_views = num_views
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        views = self.num_views
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("MultiViewAttnProcessor is for attn1 (self-attention on (rows, tokens, "
                             "channels), no mask)")
        rows, tokens, channels = hidden_states.shape
        if rows % views:
            raise ValueError(f"{rows} rows are not whole objects of {views} views each")
        joined = hidden_states.reshape(rows // views, views * tokens, channels)
        out = self.inner(attn, joined, temb=temb)
        return out.reshape(rows, tokens, channels)


def set_multiview_attention(unet, num_views: int) -> None:
    """Give every self-attention (`*.attn1`) of `unet` the multi-view processor for F = num_views;
    cross-attention keeps diffusers' default. F = 1 is exactly the plain UNet."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = {}
    for name in unet.attn_processors:
        is_self = name.endswith("attn1.processor")
        processors[name] = MultiViewAttnProcessor(num_views) if is_self and num_views > 1 else AttnProcessor2_0()
    unet.set_attn_processor(processors)


def build_mvdream_unet(config: MVDreamUNetConfig):
    """A randomly initialized MVDream UNet (diffusers UNet2DConditionModel) with the multi-view
    processors set. Call it as `unet(x, t, encoder_hidden_states=text, class_labels=camera16)`."""
    from diffusers import UNet2DConditionModel

    if config.num_views < 1:
        raise UserError(f"num_views={config.num_views} is not accepted; use an integer >= 1.")
    unet = UNet2DConditionModel(**config.diffusers_kwargs())
    set_multiview_attention(unet, config.num_views)
    return unet


def mvdream_camera(c2w: Tensor) -> Tensor:
    """Our cameras (dsd/cameras.py: z-up world, OpenGL c2w) as MVDream's 16-vector, (B, 16).

    Our convention is threestudio's, which MVDream-threestudio passes on unchanged ("already
    blender coordinate system", multiview_diffusion_guidance.py get_camera_cond) after moving the
    camera onto the unit sphere (camera_utils.py normalize_camera: t / (|t| + 1e-8)); then the matrix
    is flattened row-major. Distance and fov are not part of the condition. The result equals
    MVDream's get_camera(elevation e, azimuth a + 90°) for our (e, a): MVDream azimuth 90 is our
    front view (+x)."""
    c2w = c2w.reshape(-1, 4, 4)
    position = c2w[:, :3, 3]
    unit = position / (position.norm(dim=-1, keepdim=True) + 1e-8)  # camera_utils.py normalize_camera
    normalized = torch.cat([c2w[:, :3, :3], unit[:, :, None]], dim=2)
    normalized = torch.cat([normalized, c2w[:, 3:, :]], dim=1)
    return normalized.reshape(-1, CAMERA_DIM)


# --- checkpoint conversion: MVDream's ldm key layout -> diffusers -------------------------------
# The shared ldm layout (dsd/priors/ldm_unet.py) plus MVDream's camera MLP.
CAMERA_EMBED_NAMES = {"class_embedding.linear_1": "camera_embed.0", "class_embedding.linear_2": "camera_embed.2"}


def ldm_unet_name(key: str, config: MVDreamUNetConfig) -> str:
    """The ldm name (prefix removed) of the diffusers UNet parameter `key`; KeyError outside the layout."""
    camera = renamed(key, CAMERA_EMBED_NAMES)
    if camera is not None:
        return camera
    levels = config.num_levels()
    return ldm_unet.ldm_unet_name(key, levels, config.layers_per_block, ldm_unet.attention_levels(levels))


def unet_part(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The UNet's keys without their prefix. A full MVDream checkpoint holds the UNet under
    `model.diffusion_model.` next to the VAE, the CLIP text model and the noise schedule buffers,
    which are dropped; a UNet-only file (ashawkey/mvdream-sd2.1-diffusers unet/) has no prefix."""
    if any(k.startswith(LDM_UNET_PREFIX) for k in state_dict):
        return {k[len(LDM_UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_UNET_PREFIX)}
    return dict(state_dict)


def expected_unet_shapes(config: MVDreamUNetConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of the diffusers UNet for `config`, built without memory."""
    with torch.device("meta"):
        unet = build_mvdream_unet(config)
    return {k: v.shape for k, v in unet.state_dict().items()}


def convert_mvdream_checkpoint(state_dict: Mapping[str, Tensor],
                               config: MVDreamUNetConfig | None = None) -> dict[str, Tensor]:
    """MVDream's original (ldm) UNet weights -> a state dict for `build_mvdream_unet(config)`.
    A layout that does not match (missing, unexpected or wrongly shaped keys) is a UserError."""
    config = config or MVDreamUNetConfig()
    expected = expected_unet_shapes(config)
    diffusers_of = {ldm_unet_name(name, config): name for name in expected}
    given = unet_part(state_dict)
    converted = {diffusers_of[key]: value for key, value in given.items() if key in diffusers_of}
    unexpected = [key for key in given if key not in diffusers_of]
    missing = [key for key in diffusers_of if key not in given]  # by their ldm names, as the file spells them
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in converted.items()
             if v.shape != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing UNet keys: {key_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected UNet keys: {key_listing(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} keys of the wrong shape: {key_listing(wrong)}")
        raise UserError("the checkpoint is not an MVDream UNet of this shape (model.diffusion_model.* keys "
                        "of sd-v2.1-base-4view.pt, or the same keys without that prefix): "
                        + "; ".join(problems) + ".")
    return converted
