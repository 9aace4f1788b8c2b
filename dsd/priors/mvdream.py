"""prior=mvdream: MVDream (Shi et al. 2023), a multi-view latent prior for text-to-3D.

The F renders of one object at a step are ONE sample: F adjacent rows, one t, each row
conditioned on the prompt and its own camera (MVDream's 16-vector, `mvdream_camera`); the views
attend to each other inside the UNet (dsd/priors/mvdream_model.py). The unconditional rows of CFG
use the negative prompt and the SAME cameras (design/PRIORS.md §1: camera.repeat(2, 1) in
MVDream-threestudio multiview_diffusion_guidance.py:139).

Weights (`prior.pretrained`):
- a directory: the UNet in diffusers layout, either at its top (what `dsd-convert mvdream CKPT DIR`
  writes) or in unet/. Any of vae/, text_encoder/, tokenizer/, scheduler/ it also holds are used,
  the others come from `prior.text_encoder` (Stable Diffusion 2.1-base, whose text encoder and
  VAE MVDream was trained with; MVDream-threestudio configs/mvdream-sd21.yaml:62).
- a checkpoint file: MVDream's original sd-v2.1-base-4view.pt (or a .safetensors with the same
  keys), converted in memory (`convert_mvdream_checkpoint`); its VAE and OpenCLIP entries are not
  used, they come from `prior.text_encoder`.
- a hub id (org/name): `prior.checkpoint_file` of that repo, through the hub cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from dsd.config import PriorConfig
from dsd.errors import UserError
from dsd.priors.base import Condition, Prior
from dsd.priors.ldm_unet import key_listing
from dsd.priors.mvdream_model import (
    CAMERA_DIM,
    MVDreamUNetConfig,
    build_mvdream_unet,
    convert_mvdream_checkpoint,
    mvdream_camera,
    set_multiview_attention,
)
from dsd.priors.stable_diffusion import DTYPES, StableDiffusionPrior, alphas_cumprod_from
from dsd.registry import register

# MVDream-threestudio configs/mvdream-sd21.yaml:64
NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, cropped, "
    "lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, dehydrated, "
    "bad proportions"
)
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class MVDreamConfig(PriorConfig):
    name: str = "mvdream"
    # a diffusers dir (`dsd-convert mvdream` output or one with unet/), sd-v2.1-base-4view.pt, or a hub id
    pretrained: str = "MVDream/MVDream"  # the hub repo MVDream's model_zoo.py downloads from
    checkpoint_file: str = "sd-v2.1-base-4view.pt"  # the file inside a hub repo
    text_encoder: str = "stabilityai/stable-diffusion-2-1-base"  # SD 2.1-base dir or hub id (+ VAE, scheduler)
    num_views: int = 4  # F (n_view, multiview_diffusion_guidance.py:39)
    image_size: Optional[int] = None  # null: UNet sample_size × VAE scale = 256 (multiview_diffusion_guidance.py:40)
    negative_prompt: str = NEGATIVE_PROMPT
    # MVDream-threestudio encodes the prompt unchanged (prompt_processors/base.py:298, no view-dependent
    # prompting: multiview_diffusion_guidance.py:37); MVDream's own sampler appends ", 3d asset"
    # (bytedance/MVDream scripts/t2i.py:54).
    prompt_suffix: str = ""
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    local_files_only: Optional[bool] = None  # null: true when HF_HUB_OFFLINE=1
    # The UNet's shape, read only for an original checkpoint (a diffusers dir has its config.json):
    # MVDream's sd-v2-base.yaml (model_channels 320 × channel_mult [1,2,4,4], num_res_blocks 2,
    # num_head_channels 64). The context width is the text encoder's.
    unet_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    unet_layers_per_block: int = 2
    unet_head_channels: int = 64


@dataclass
class MultiViewCondition(Condition):
    prompt_index: Tensor  # (B,) long: text-table row of the prompt
    negative_index: Tensor  # (B,) long: text-table row of the negative prompt (the unconditional branch)
    camera: Tensor  # (B, 16) float32: MVDream's camera vector of the row's view


def missing_pretrained_error(value: str, reason: str) -> UserError:
    return UserError(
        f"prior.pretrained={value} could not be loaded: MVDream's weights are not available here ({reason}). "
        "Download sd-v2.1-base-4view.pt on a machine with internet (`hf download MVDream/MVDream "
        "sd-v2.1-base-4view.pt --local-dir /path/mvdream`), copy it here and either point prior.pretrained at "
        "the file, or convert it once with `dsd-convert mvdream /path/mvdream/sd-v2.1-base-4view.pt "
        "/path/mvdream-unet` and run `dsd-run prior=mvdream prior.pretrained=/path/mvdream-unet` (offline, add "
        "prior.text_encoder=/path/sd21: a local Stable Diffusion 2.1-base for the text encoder and VAE)."
    )


def missing_text_encoder_error(value: str, err: Exception) -> UserError:
    return UserError(
        f"prior.text_encoder={value} could not be loaded: the Stable Diffusion 2.1-base text encoder, tokenizer, "
        f"VAE and scheduler that MVDream uses are not available here ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}). Download them on a machine with internet, e.g. `hf download "
        "stabilityai/stable-diffusion-2-1-base --local-dir /path/sd21`, copy the folder here and set "
        "prior.text_encoder=/path/sd21 (a diffusers-layout folder: text_encoder/, tokenizer/, vae/, scheduler/)."
    )


def looks_local(value: str) -> bool:
    """A path rather than a hub id (hub ids are exactly org/name)."""
    from dsd.convert import CHECKPOINT_SUFFIXES

    return value.startswith((os.sep, ".", "~")) or value.count("/") != 1 or value.endswith(CHECKPOINT_SUFFIXES)


def unet_subfolder(root: Path, value: str) -> str | None:
    """Where the UNet of a diffusers dir lies: unet/ or the dir itself (`dsd-convert mvdream` output)."""
    if (root / "unet" / "config.json").is_file():
        return "unet"
    if (root / "config.json").is_file():
        return None
    raise UserError(f"prior.pretrained={value} is a directory without unet/config.json or config.json; "
                    "accepted: the output of `dsd-convert mvdream CKPT DIR`, a diffusers-layout directory with "
                    "unet/, or the original sd-v2.1-base-4view.pt file.")


@register("prior", "mvdream", MVDreamConfig)
class MVDreamPrior(Prior):
    name = "mvdream"
    needs_cameras = True

    # The text table and the VAE boundary are sd21's: MVDream keeps SD 2.1-base's text encoder and VAE.
    _embed = StableDiffusionPrior._embed
    embedding_table = StableDiffusionPrior.embedding_table
    encode = StableDiffusionPrior.encode
    decode = StableDiffusionPrior.decode

    def __init__(self, cfg: MVDreamConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.dtype not in ("auto", *DTYPES):
            raise UserError(f"prior.dtype={cfg.dtype!r} is not accepted; use one of: auto, fp32, fp16, bf16.")
        if cfg.num_views < 1:
            raise UserError(f"prior.num_views={cfg.num_views} is not accepted; use an integer >= 1 (MVDream: 4).")
        auto = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = auto if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.views_per_sample = cfg.num_views
        self.local = cfg.local_files_only
        if self.local is None:
            self.local = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        self._load()
        self._index: dict[str, int] = {}  # prompt string -> row of the embedding table
        self._rows: list[Tensor] = []  # (L, D) each
        self._table: Tensor | None = None  # (P, L, D) stacked lazily

    # ---- loading ------------------------------------------------------------------------------
    def _pretrained_path(self) -> Path:
        """The local directory or checkpoint file that `prior.pretrained` names (a hub id is
        resolved to the cached file)."""
        value = self.cfg.pretrained
        path = Path(os.path.expanduser(value))
        if path.exists():
            return path
        if looks_local(value):
            raise missing_pretrained_error(value, f"no file or directory {path}")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(value, self.cfg.checkpoint_file, local_files_only=self.local))
        except (OSError, ValueError) as err:  # offline, unknown repo or file
            raise missing_pretrained_error(value, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None

    def _component_root(self, pretrained: Path, name: str) -> str:
        """A diffusers dir's own vae/ etc. when it has one, else prior.text_encoder's."""
        if pretrained.is_dir() and (pretrained / name).is_dir():
            return str(pretrained)
        return os.path.expanduser(self.cfg.text_encoder)

    def _load(self) -> None:
        pretrained = self._pretrained_path()  # fail fast, before the slow imports
        text_encoder_dir = os.path.expanduser(self.cfg.text_encoder)
        roots = {name: self._component_root(pretrained, name) for name in SD_COMPONENTS}
        if text_encoder_dir in roots.values() and looks_local(self.cfg.text_encoder) and not os.path.isdir(text_encoder_dir):
            raise missing_text_encoder_error(self.cfg.text_encoder, FileNotFoundError(f"no directory {text_encoder_dir}"))
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"local_files_only": self.local}
        loaders = {
            "vae": lambda root: AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=self.dtype, **kw),
            "text_encoder": lambda root: CLIPTextModel.from_pretrained(
                root, subfolder="text_encoder", dtype=self.dtype, **kw),
            "tokenizer": lambda root: AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
            "scheduler": lambda root: DDIMScheduler.load_config(root, subfolder="scheduler", **kw),
        }
        parts = {}
        for name, loader in loaders.items():
            try:
                parts[name] = loader(roots[name])
            except (OSError, ValueError) as err:  # hub/file errors are OSError; bad repo ids ValueError
                if roots[name] != str(pretrained):
                    raise missing_text_encoder_error(self.cfg.text_encoder, err) from None
                raise UserError(f"prior.pretrained={self.cfg.pretrained}: its {name}/ could not be loaded "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None
        vae, text_encoder, self.tokenizer, scheduler = (parts[n] for n in ("vae", "text_encoder", "tokenizer", "scheduler"))
        source = "prior.pretrained" if roots["scheduler"] == str(pretrained) else "prior.text_encoder"
        # MVDream predicts ε (ldm's default parameterization; sd-v2-base.yaml sets no other), so only
        # ᾱ is read from the scheduler: an SD 2.1 (768-v) scheduler's prediction_type does not apply.
        self.alphas_cumprod = alphas_cumprod_from(scheduler, f"{source}={roots['scheduler']} scheduler")
        context = text_encoder.config.hidden_size
        if pretrained.is_dir():
            unet = self._unet_from_dir(pretrained)
        else:
            unet = self._unet_from_checkpoint(pretrained, context)
        self._check_compatible(unet, vae, context)
        set_multiview_attention(unet, self.cfg.num_views)  # diffusers does not save processors
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False).eval()
        self.unet, self.vae, self.text_encoder = unet.to(self.device), vae.to(self.device), text_encoder.to(self.device)
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.image_size = self.cfg.image_size or self.unet.config.sample_size * self.vae_scale
        if self.image_size % self.vae_scale:
            raise UserError(f"prior.image_size={self.image_size} is not accepted; use a multiple of the VAE's "
                            f"downsampling factor {self.vae_scale} (MVDream: 256).")

    def _unet_from_dir(self, root: Path):
        from diffusers import UNet2DConditionModel

        value = self.cfg.pretrained
        subfolder = unet_subfolder(root, value)
        try:
            unet, info = UNet2DConditionModel.from_pretrained(
                root, subfolder=subfolder, torch_dtype=self.dtype, output_loading_info=True,
                local_files_only=True,
            )  # fmt: skip
        except (OSError, ValueError) as err:  # unreadable files; a wrongly shaped tensor is a ValueError
            raise UserError(f"prior.pretrained={value}: the UNet could not be loaded ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]}).") from None
        if unet.config.class_embed_type != "projection" or unet.config.projection_class_embeddings_input_dim != CAMERA_DIM:
            raise UserError(f"prior.pretrained={value} holds a UNet without MVDream's camera embedding "
                            f"(class_embed_type={unet.config.class_embed_type!r}, expected 'projection' with "
                            f"{CAMERA_DIM} inputs); convert MVDream's checkpoint with `dsd-convert mvdream CKPT DIR`.")
        problems = [f"{len(info[kind])} {kind.replace('_', ' ')}: {key_listing(info[kind])}"
                    for kind in ("missing_keys", "unexpected_keys") if info[kind]]
        if problems:
            raise UserError(f"prior.pretrained={value}: the UNet weights do not match its config.json ("
                            + "; ".join(problems) + "); re-create the directory with `dsd-convert mvdream CKPT DIR`.")
        return unet

    def _unet_from_checkpoint(self, file: Path, context: int):
        from dsd.convert import load_state_dict

        cfg, value = self.cfg, self.cfg.pretrained
        shape = MVDreamUNetConfig(
            num_views=cfg.num_views, block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.unet_layers_per_block, head_channels=cfg.unet_head_channels,
            cross_attention_dim=context,
        )  # fmt: skip
        if any(c % shape.head_channels or c % shape.norm_num_groups for c in shape.block_out_channels):
            raise UserError(f"prior.unet_channels={list(cfg.unet_channels)} is not accepted; use multiples of "
                            f"prior.unet_head_channels={cfg.unet_head_channels} and of {shape.norm_num_groups}.")
        try:
            converted = convert_mvdream_checkpoint(load_state_dict(file), shape)
        except UserError as err:
            raise UserError(f"prior.pretrained={value}: {err} (The UNet's shape is set by prior.unet_channels, "
                            "prior.unet_layers_per_block and the text encoder's width.)") from None
        with torch.device("meta"):  # no random init of a full-size UNet: every weight is assigned below
            unet = build_mvdream_unet(shape)
        converted = {k: v.to(self.dtype) for k, v in converted.items()}
        unet.load_state_dict(converted, strict=True, assign=True)  # the converter checked names and shapes
        return unet

    def _check_compatible(self, unet, vae, context: int) -> None:
        value = self.cfg.pretrained
        if unet.config.cross_attention_dim != context:
            raise UserError(f"prior.pretrained={value} expects {unet.config.cross_attention_dim}-d text embeddings "
                            f"but prior.text_encoder={self.cfg.text_encoder} gives {context}-d; use SD 2.1-base's "
                            "text encoder (1024-d).")
        if unet.config.in_channels != vae.config.latent_channels:
            raise UserError(f"prior.pretrained={value} takes {unet.config.in_channels}-channel latents but the VAE "
                            f"of prior.text_encoder={self.cfg.text_encoder} gives {vae.config.latent_channels}.")

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.image_size // self.vae_scale
        return (self.unet.config.in_channels, size, size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    # ---- conditioning -------------------------------------------------------------------------
    def condition(self, prompt: str, batch: int, cameras=None) -> MultiViewCondition:
        """Rows of whole objects (F adjacent views each): the prompt, the negative prompt and each
        row's camera."""
        F = self.views_per_sample
        if cameras is None:
            raise UserError("prior=mvdream needs a 3D representation: representation=gaussians or nerf.")
        if batch % F:
            raise UserError(f"prior=mvdream evaluates the prior.num_views={F} views of one object together, "
                            f"but got a batch of {batch} views; it must be a multiple of {F}.")
        if len(cameras) != batch:
            raise ValueError(f"{len(cameras)} cameras for a batch of {batch} rows")
        negative, positive = self._embed([self.cfg.negative_prompt, prompt + self.cfg.prompt_suffix])
        return MultiViewCondition(
            prompt_index=torch.full((batch,), positive, dtype=torch.long),
            negative_index=torch.full((batch,), negative, dtype=torch.long),
            camera=mvdream_camera(cameras.c2w.detach()).float().cpu(),
        )

    def check_whole_objects(self, t: Tensor, unconditional: Tensor) -> None:
        """Rows must be whole objects: a multiple of F, one t and one branch per object."""
        F = self.views_per_sample
        if len(t) % F:
            raise ValueError(f"prior=mvdream got {len(t)} rows, not whole objects of {F} views")
        for name, value in (("t", t), ("unconditional", unconditional)):
            grouped = value.reshape(-1, F)
            if (grouped != grouped[:, :1]).any():
                raise ValueError(f"prior=mvdream needs one {name} per object of {F} adjacent views")

    # ---- the noise predictor --------------------------------------------------------------
    def predict_eps(self, x_t: Tensor, t: Tensor, cond: MultiViewCondition, unconditional: Tensor) -> Tensor:
        """Raw ε̂ (B, C, h, w) in x_t's dtype; B = whole objects of F adjacent views."""
        self.check_whole_objects(t.cpu(), unconditional.cpu())
        index = torch.where(unconditional.cpu(), cond.negative_index, cond.prompt_index)
        hidden = self.embedding_table()[index.to(self.device)].to(self.dtype)
        camera = cond.camera.to(self.device, self.dtype)
        with torch.no_grad():
            out = self.unet(x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=hidden,
                            class_labels=camera).sample
        return out.to(x_t.dtype)
