"""The SD-style ldm UNet's state-dict names for diffusers' `UNet2DConditionModel` names, shared by
the MVDream and Zero123 checkpoint converters.

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
