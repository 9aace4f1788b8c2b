"""dsd-convert: original checkpoints -> diffusers-layout folders that the priors load.

    dsd-convert mvdream CKPT OUT_DIR

CKPT is MVDream's sd-v2.1-base-4view.pt (hf MVDream/MVDream), or any .pt/.ckpt/.safetensors with
the same UNet keys (with or without the `model.diffusion_model.` prefix). OUT_DIR receives the
UNet (`save_pretrained`: config.json + diffusion_pytorch_model.safetensors). The VAE and text
encoder are SD 2.1-base's, so they are not converted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsd.errors import UserError

CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin", ".safetensors")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file; a Lightning-style {"state_dict": ...} wrapper is opened."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist or is not a file.")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"checkpoint {path} has suffix {path.suffix!r}; accepted: {', '.join(CHECKPOINT_SUFFIXES)}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or pickled non-tensor objects
        raise UserError(f"checkpoint {path} could not be read as a state dict "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors).")
    return state


def convert_mvdream(checkpoint: Path, out_dir: Path, config=None) -> Path:
    """Convert MVDream's UNet and write it to `out_dir` in diffusers layout. `config`
    (MVDreamUNetConfig) defaults to sd-v2.1-base-4view's shape."""
    from dsd.priors.mvdream_model import MVDreamUNetConfig, build_mvdream_unet, convert_mvdream_checkpoint

    config = config or MVDreamUNetConfig()
    state = load_state_dict(checkpoint)
    converted = convert_mvdream_checkpoint(state, config)
    unet = build_mvdream_unet(config)
    unet.load_state_dict(converted, strict=True)  # the converter checked names and shapes
    unet.save_pretrained(out_dir)
    return out_dir


CONVERTERS = {"mvdream": convert_mvdream}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dsd-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", help=f"which model: {', '.join(CONVERTERS)}")
    parser.add_argument("checkpoint", type=Path, help="the original checkpoint file")
    parser.add_argument("out_dir", type=Path, help="where the diffusers-layout UNet is written")
    args = parser.parse_args(argv)
    try:
        if args.kind not in CONVERTERS:
            raise UserError(f"kind={args.kind!r} is not accepted; use one of: {', '.join(CONVERTERS)}.")
        out = CONVERTERS[args.kind](args.checkpoint, args.out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
