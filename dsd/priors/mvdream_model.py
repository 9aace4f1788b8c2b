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

    def has_attention(self, level: int) -> bool:
        """Down level `level` (0 = full resolution) has transformers: all but the deepest."""
        return level < self.num_levels() - 1

    def diffusers_kwargs(self) -> dict:
        levels = self.num_levels()
        down = tuple("CrossAttnDownBlock2D" if self.has_attention(b) else "DownBlock2D" for b in range(levels))
        up = tuple("CrossAttnUpBlock2D" if self.has_attention(levels - 1 - b) else "UpBlock2D" for b in range(levels))
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=self.cross_attention_dim,
            # diffusers' legacy name: for UNet2DConditionModel this is the number of HEADS per level
            attention_head_dim=tuple(c // self.head_channels for c in self.block_out_channels),
            use_linear_projection=True,  # ldm use_linear_in_transformer: True
            norm_num_groups=self.norm_num_groups,
            flip_sin_to_cos=True,  # ldm timestep embedding is cat([cos, sin])
            freq_shift=0,
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
# Read in threestudio scripts/convert_zero123_to_diffusers.py convert_ldm_unet_checkpoint and
# design/PRIORS.md ("Mapping ldm UNet keys to diffusers"); transformer internals keep their names.
RESBLOCK_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def ldm_module_table(config: MVDreamUNetConfig) -> dict[str, tuple[str, bool]]:
    """ldm module path -> (diffusers module path, is a ResBlock) for every module with weights
    outside the transformers' insides, for this config's levels and blocks per level."""
    levels, per = config.num_levels(), config.layers_per_block
    table: dict[str, tuple[str, bool]] = {
        "time_embed.0": ("time_embedding.linear_1", False),
        "time_embed.2": ("time_embedding.linear_2", False),
        "camera_embed.0": ("class_embedding.linear_1", False),
        "camera_embed.2": ("class_embedding.linear_2", False),
        "input_blocks.0.0": ("conv_in", False),
        "out.0": ("conv_norm_out", False),
        "out.2": ("conv_out", False),
        "middle_block.0": ("mid_block.resnets.0", True),
        "middle_block.1": ("mid_block.attentions.0", False),
        "middle_block.2": ("mid_block.resnets.1", True),
    }
    # input_blocks: index 0 is conv_in, then per level `per` (ResBlock[, transformer]) and, except
    # at the deepest level, one downsampler
    for b in range(levels):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            table[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", True)
            if config.has_attention(b):
                table[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", False)
        if b < levels - 1:
            table[f"input_blocks.{(b + 1) * (per + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", False)
    # output_blocks: per up block (deepest first) per+1 of (ResBlock[, transformer][, upsampler])
    for b in range(levels):
        attention = config.has_attention(levels - 1 - b)
        for j in range(per + 1):
            i = b * (per + 1) + j
            table[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", True)
            if attention:
                table[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", False)
            if j == per and b < levels - 1:
                slot = 2 if attention else 1
                table[f"output_blocks.{i}.{slot}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", False)
    return table


def ldm_to_diffusers_key(key: str, table: Mapping[str, tuple[str, bool]]) -> str | None:
    """The diffusers name of one ldm UNet key (prefix already removed), or None if it has none."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module path first
        module = ".".join(parts[:cut])
        if module not in table:
            continue
        target, is_resblock = table[module]
        rest = ".".join(parts[cut:])
        if is_resblock:
            for old, new in RESBLOCK_PARTS.items():
                if rest.startswith(old + "."):
                    return f"{target}.{new}{rest[len(old):]}"
            return None
        return f"{target}.{rest}"
    return None


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


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def convert_mvdream_checkpoint(state_dict: Mapping[str, Tensor],
                               config: MVDreamUNetConfig | None = None) -> dict[str, Tensor]:
    """MVDream's original (ldm) UNet weights -> a state dict for `build_mvdream_unet(config)`.
    A layout that does not match (missing, unexpected or wrongly shaped keys) is a UserError."""
    config = config or MVDreamUNetConfig()
    table = ldm_module_table(config)
    expected = expected_unet_shapes(config)
    converted, unexpected = {}, []
    for key, value in unet_part(state_dict).items():
        name = ldm_to_diffusers_key(key, table)
        if name is None or name not in expected:
            unexpected.append(key)
        else:
            converted[name] = value
    # report missing keys by their ldm names, as the user's file spells them
    inverse = {ldm_to_diffusers_key(k, table): k for k in _ldm_names_of(expected, table)}
    missing = [inverse.get(name, name) for name in expected if name not in converted]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in converted.items()
             if v.shape != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing UNet keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected UNet keys: {_listing(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} keys of the wrong shape: {_listing(wrong)}")
        raise UserError("the checkpoint is not an MVDream UNet of this shape (model.diffusion_model.* keys "
                        "of sd-v2.1-base-4view.pt, or the same keys without that prefix): "
                        + "; ".join(problems) + ".")
    return converted


def _ldm_names_of(expected: Mapping[str, torch.Size], table: Mapping[str, tuple[str, bool]]) -> list[str]:
    """ldm spellings of the diffusers names in `expected` that the table can produce (for messages)."""
    back = {target: (module, is_res) for module, (target, is_res) in table.items()}
    names = []
    for name in expected:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in back:
                ldm_module, is_res = back[module]
                rest = ".".join(parts[cut:])
                if is_res:
                    rest = next((old + rest[len(new):] for old, new in RESBLOCK_PARTS.items()
                                 if rest.startswith(new + ".")), rest)
                names.append(f"{ldm_module}.{rest}")
                break
    return names
