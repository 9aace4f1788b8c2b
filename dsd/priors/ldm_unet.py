"""The SD-style ldm UNet on diffusers' `UNet2DConditionModel`: its layout (shared by the MVDream and
Zero123 builders) and its state-dict names (shared by their checkpoint converters).

ldm numbers blocks flatly (after removing `model.diffusion_model.`): input_blocks.0 is conv_in,
then per level R ResBlocks (each `.0`, with its transformer at `.1`) and, except at the deepest
level, a Downsample; output_blocks hold R+1 ResBlocks per level (deepest first), the Upsample being
the last submodule of the level's last block. Transformer internals keep their names. Read in
threestudio scripts/convert_zero123_to_diffusers.py (`convert_ldm_unet_checkpoint`,
`renew_resnet_paths`) and design/PRIORS.md ("Mapping ldm UNet keys to diffusers").
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

# Inside a ResBlock, diffusers name -> ldm name
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL_NAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
MID_BLOCK_NAMES = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
BLOCK_KEY = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def attention_levels(levels: int) -> range:
    """Levels (0 = full resolution) with transformers: every level but the deepest, as ldm's
    attention_resolutions [4, 2, 1] for channel_mult [1, 2, 4, 4] (SD, MVDream, Zero123)."""
    return range(levels - 1)


def unet_kwargs(block_out_channels: tuple[int, ...], heads: tuple[int, ...] | int, linear_projection: bool,
                **shape) -> dict:
    """`UNet2DConditionModel` arguments of an ldm UNet: block types from `attention_levels`, ldm's
    cos-before-sin timestep embedding, `heads` per level (diffusers' legacy `attention_head_dim`
    is the head COUNT for this model), conv (False) or linear (True) transformer projections.
    `shape`: in/out channels, layers_per_block, cross_attention_dim, sample_size, norm groups and
    any model-specific extra (e.g. MVDream's camera projection)."""
    levels = len(block_out_channels)
    attention = attention_levels(levels)
    return dict(
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if b in attention else "DownBlock2D" for b in range(levels)),
        up_block_types=tuple("CrossAttnUpBlock2D" if levels - 1 - b in attention else "UpBlock2D"
                             for b in range(levels)),
        attention_head_dim=heads,
        use_linear_projection=linear_projection,
        flip_sin_to_cos=True,  # ldm timestep embedding is cat([cos, sin])
        freq_shift=0,
        **shape,
    )


def renamed(key: str, modules: Mapping[str, str]) -> str | None:
    """`key` with its leading module renamed by `modules` (diffusers -> ldm), or None if none matches."""
    for name, ldm in modules.items():
        if key.startswith(name + "."):
            return ldm + key[len(name):]
    return None


def _resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    if module not in RESNET_NAMES:
        raise KeyError(module)
    return f"{RESNET_NAMES[module]}.{param}"


def ldm_unet_name(key: str, levels: int, per_block: int, attention_levels: Collection[int]) -> str:
    """The ldm name of the diffusers UNet parameter `key`, for a UNet of `levels` levels with
    `per_block` ResBlocks per down level and transformers at the down levels `attention_levels`
    (0 = full resolution). KeyError for a name outside this layout."""
    top = renamed(key, TOP_LEVEL_NAMES)
    if top is not None:
        return top
    if key.startswith("mid_block."):
        for name, ldm in MID_BLOCK_NAMES.items():
            if key.startswith(f"mid_block.{name}."):
                rest = key[len(f"mid_block.{name}."):]
                return f"{ldm}.{_resnet(rest) if name.startswith('resnets') else rest}"
    match = BLOCK_KEY.fullmatch(key)
    if match is None:
        raise KeyError(key)
    side, b, kind, j, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    R = per_block
    if side == "down":
        if kind == "downsamplers":  # the block after level b's R ResBlocks
            return f"input_blocks.{(b + 1) * (R + 1)}.0.op.{rest.removeprefix('conv.')}"
        index = 1 + b * (R + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if kind == "upsamplers":  # after the ResBlock (and its transformer, if the level has one)
        slot = 2 if levels - 1 - b in attention_levels else 1  # up_blocks.0 is the deepest level
        return f"output_blocks.{b * (R + 1) + R}.{slot}.{rest}"
    index = b * (R + 1) + j
    return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"


def key_listing(keys: Iterable[str], limit: int = 5) -> str:
    """A few of `keys`, sorted, for a missing / unexpected keys message."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
