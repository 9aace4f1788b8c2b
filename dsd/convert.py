"""dsd-convert: original checkpoints -> diffusers-layout folders that the priors load.

    dsd-convert mvdream CKPT OUT_DIR
    dsd-convert zero123 CKPT OUT_DIR [--image-encoder CLIP_DIR] [--image-size 256]

mvdream: CKPT is MVDream's sd-v2.1-base-4view.pt (hf MVDream/MVDream), or any .pt/.ckpt/.safetensors
with the same UNet keys (with or without the `model.diffusion_model.` prefix). OUT_DIR receives the
UNet (`save_pretrained`: config.json + diffusion_pytorch_model.safetensors). The VAE and text
encoder are SD 2.1-base's, so they are not converted.

zero123: CKPT is an original zero123 (105000.ckpt ...), zero123-xl or stable_zero123 .ckpt. OUT_DIR
receives a folder that `prior=zero123 prior.pretrained=OUT_DIR` loads: unet/ (EMA weights when the
checkpoint has them), vae/, scheduler/, clip_camera_projection/ and, with --image-encoder, a copy
of that CLIPVisionModelWithProjection folder as image_encoder/ (the checkpoint's own OpenAI-layout
CLIP is not converted; threestudio's converter takes lambdalabs/sd-image-variations-diffusers').
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


def convert_zero123_components(state: dict, source: str, sample_size: int = 32):
    """An original Zero123 state dict -> (UNet, VAE, pose projection, scheduler config), in memory.
    `sample_size`: the UNet's latent size (32: Zero123's 256² images)."""
    from dsd.priors.zero123_model import SCHEDULER_CONFIG, infer_unet_config, load_vae, load_zero123

    unet, conditioner = load_zero123(state, infer_unet_config(state, source, sample_size), source)
    return unet, load_vae(state, source), conditioner, dict(SCHEDULER_CONFIG)


def convert_zero123(checkpoint: Path, out_dir: Path, image_encoder: Path | None = None,
                    image_size: int = 256) -> Path:
    """Convert an original Zero123 checkpoint into a diffusers-layout folder (see the module doc)."""
    import shutil

    from diffusers import DDIMScheduler

    from dsd.priors.zero123 import save_projection

    if image_encoder is not None and not (image_encoder / "config.json").is_file():
        raise UserError(f"--image-encoder {image_encoder} is not a model folder (no config.json); accepted: a "
                        "CLIPVisionModelWithProjection folder, e.g. sd-image-variations-diffusers/image_encoder.")
    state = load_state_dict(checkpoint)
    probe = convert_zero123_components(state, str(checkpoint))
    vae_scale = 2 ** (len(probe[1].config.block_out_channels) - 1)
    if image_size <= 0 or image_size % vae_scale:
        raise UserError(f"--image-size {image_size} is not accepted; use a positive multiple of {vae_scale}.")
    unet, vae, conditioner, scheduler = probe
    unet.register_to_config(sample_size=image_size // vae_scale)
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir / "unet")
    vae.register_to_config(sample_size=image_size)
    vae.save_pretrained(out_dir / "vae")
    DDIMScheduler(**scheduler).save_pretrained(out_dir / "scheduler")
    save_projection(conditioner, out_dir / "clip_camera_projection")
    if image_encoder is not None:
        shutil.copytree(image_encoder, out_dir / "image_encoder", dirs_exist_ok=True)
    return out_dir


CONVERTERS = {"mvdream": convert_mvdream, "zero123": convert_zero123}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dsd-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", help=f"which model: {', '.join(CONVERTERS)}")
    parser.add_argument("checkpoint", type=Path, help="the original checkpoint file")
    parser.add_argument("out_dir", type=Path, help="where the diffusers-layout folder is written")
    parser.add_argument("--image-encoder", type=Path, default=None,
                        help="zero123: a CLIPVisionModelWithProjection folder copied to OUT_DIR/image_encoder")
    parser.add_argument("--image-size", type=int, default=256, help="zero123: the model's image size (256)")
    args = parser.parse_args(argv)
    try:
        if args.kind not in CONVERTERS:
            raise UserError(f"kind={args.kind!r} is not accepted; use one of: {', '.join(CONVERTERS)}.")
        if args.kind == "zero123":
            out = convert_zero123(args.checkpoint, args.out_dir, args.image_encoder, args.image_size)
        else:
            out = CONVERTERS[args.kind](args.checkpoint, args.out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
