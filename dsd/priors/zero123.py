"""prior=zero123: Zero-1-to-3 / Zero123-XL / Stable Zero123 as a per-view, camera-conditioned prior.

The input image (`prior.image`) is encoded once: its CLIP image embedding (cross-attention, with
the relative pose through the 772 → 768 projection) and its VAE latent (the 4 extra UNet input
channels). Each row's condition is only its relative pose to the input view, so rows(), cat() and
the ODE cache key are small. Weights: a diffusers-layout folder (what `dsd-convert zero123`
writes, or the ashawkey / bennyguo / kxic hub folders downloaded) or the original .ckpt, converted
in memory. Building blocks and the facts they follow: dsd/priors/zero123_model.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from dsd.cameras import Cameras, orbit_cameras
from dsd.config import PriorConfig
from dsd.errors import UserError
from dsd.priors.base import Condition, Prior, ReferenceView, resize_pixels
from dsd.priors.input_image import OBJECT_FRACTION, load_input_image
from dsd.priors.stable_diffusion import DTYPES, alphas_cumprod_from
from dsd.priors.zero123_model import Zero123Conditioner, relative_pose, unet_input
from dsd.registry import register

VARIANTS = ("zero123", "stable_zero123")
# CLIP ViT-L/14 normalisation applied after resizing to the encoder's input size (zero123
# ldm/modules/encoders/modules.py FrozenCLIPImageEmbedder.preprocess).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The pose projection folder: threestudio's Zero123Pipeline (ashawkey / bennyguo hub folders,
# `proj.*`) or diffusers' community Zero1to3 pipeline (kxic hub folders, `projection.*`).
PROJECTION_FOLDERS = {"clip_camera_projection": "proj.", "cc_projection": "projection."}


@dataclass
class Zero123Config(PriorConfig):
    name: str = "zero123"
    pretrained: str = ""  # diffusers-layout folder, or the original .ckpt (converted in memory)
    image_encoder: Optional[str] = None  # CLIPVisionModelWithProjection folder; null: <pretrained>/image_encoder
    variant: str = "zero123"  # zero123 (zero123, zero123-xl) | stable_zero123 (4th pose entry)
    image: str = ""  # the input view: RGBA (alpha = mask) or RGB on `background`
    background: str = "white"  # white | black
    object_fraction: float = OBJECT_FRACTION  # longer side of the object's box / image side
    recenter: bool = True
    # The input view's camera (threestudio configs/zero123.yaml:12-15 @28d9d80)
    input_elevation_deg: float = 5.0
    input_azimuth_deg: float = 0.0
    input_distance: float = 3.8
    input_fovy_deg: float = 20.0
    image_size: Optional[int] = None  # input and render size in pixels; null: the UNet's (256 for Zero123)
    dtype: str = "auto"  # UNet dtype: auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16


@dataclass
class PoseCondition(Condition):
    pose: Tensor  # (B, 4) float64: relative pose of the row's camera to the input view


def missing_weights_error(cfg: Zero123Config, why: str) -> UserError:
    return UserError(
        f"prior.pretrained={cfg.pretrained!r} could not be loaded: {why}. Accepted: a local folder in "
        "diffusers layout (unet/, vae/, scheduler/, clip_camera_projection/ or cc_projection/, image_encoder/), "
        "e.g. written once by `dsd-convert zero123 zero123-xl.ckpt /path/zero123 --image-encoder /path/clip`, "
        "or the original zero123 / zero123-xl / stable_zero123 .ckpt with prior.image_encoder=<a "
        "CLIPVisionModelWithProjection folder, e.g. lambdalabs/sd-image-variations-diffusers/image_encoder>."
    )


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def load_projection(folder: Path, prefix: str, embed_dim: int) -> Zero123Conditioner:
    """The pose projection from a diffusers-layout folder (safetensors or torch .bin)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no .safetensors or .bin weights in {folder}")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(files[0]))
    else:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    conditioner = Zero123Conditioner(embed_dim)
    wanted = {name: prefix + name for name in ("weight", "bias")}
    missing = [key for key in wanted.values() if key not in state]
    if missing:
        raise UserError(f"{files[0]} lacks {', '.join(missing)} (has: {', '.join(sorted(state)[:5])}); "
                        f"accepted: the {folder.name}/ folder of a Zero123 diffusers export.")
    try:
        conditioner.cc_projection.load_state_dict({name: state[key] for name, key in wanted.items()})
    except RuntimeError as err:
        raise UserError(f"{files[0]}: the pose projection does not fit cross_attention_dim {embed_dim} "
                        f"({str(err).splitlines()[-1].strip()[:200]}).") from None
    return conditioner


def load_diffusers_folder(root: Path, dtype: torch.dtype):
    """-> (unet, vae, conditioner, scheduler config) from a diffusers-layout folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    scheduler = DDIMScheduler.load_config(root, subfolder="scheduler", local_files_only=True)
    folder = next((root / name for name in PROJECTION_FOLDERS if (root / name).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"no {' or '.join(PROJECTION_FOLDERS)} folder in {root}")
    conditioner = load_projection(folder, PROJECTION_FOLDERS[folder.name], unet.config.cross_attention_dim)
    return unet, vae, conditioner, scheduler


def load_original_checkpoint(path: Path, dtype: torch.dtype):
    """-> (unet, vae, conditioner, scheduler config) from the original ldm checkpoint."""
    from dsd.convert import convert_zero123_components, load_state_dict

    source = f"prior.pretrained={str(path)!r}"
    unet, vae, conditioner, scheduler = convert_zero123_components(load_state_dict(path), source)
    return unet.to(dtype), vae, conditioner, scheduler


def load_image_encoder(folder: str):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)


@register("prior", "zero123", Zero123Config)
class Zero123Prior(Prior):
    """ε̂(x_t, t | input image, relative pose). One view per row (views_per_sample 1); the
    condition is a camera, so only 3D representations can use it; the prompt is ignored."""

    name = "zero123"
    needs_cameras = True

    def __init__(self, cfg: Zero123Config, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.variant not in VARIANTS:
            raise UserError(f"prior.variant={cfg.variant!r} is not accepted; use one of: {', '.join(VARIANTS)}.")
        if cfg.dtype not in ("auto", *DTYPES):
            raise UserError(f"prior.dtype={cfg.dtype!r} is not accepted; use one of: auto, fp32, fp16, bf16.")
        if not cfg.image:
            raise UserError("prior.image is not set; prior=zero123 needs the input view: "
                            "prior.image=path/to/object.png (RGBA with its alpha mask, or RGB on a plain background).")
        auto = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = auto if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        load_input_image(cfg.image, 8, cfg.background, cfg.recenter, cfg.object_fraction)  # fail fast on a bad file
        self._load()
        self.rgb, self.mask = load_input_image(
            cfg.image, self.image_shape[-1], cfg.background, cfg.recenter, cfg.object_fraction
        )
        self._encode_input_view()

    # ---- weights ------------------------------------------------------------------------------
    def _load(self) -> None:
        cfg = self.cfg
        if not cfg.pretrained:
            raise missing_weights_error(cfg, "it is not set")
        path = Path(cfg.pretrained).expanduser()
        if not path.exists():
            raise missing_weights_error(cfg, "no such file or folder")
        try:
            if path.is_dir():
                unet, vae, conditioner, scheduler = load_diffusers_folder(path, self.dtype)
            else:
                unet, vae, conditioner, scheduler = load_original_checkpoint(path, self.dtype)
        except (OSError, ValueError, KeyError) as err:
            raise missing_weights_error(cfg, _first_line(err)) from None
        encoder_dir = cfg.image_encoder or (str(path / "image_encoder") if path.is_dir() else None)
        if encoder_dir is None or not Path(encoder_dir).expanduser().is_dir():
            raise UserError(
                f"prior.image_encoder={cfg.image_encoder!r}: no CLIP image encoder folder "
                f"({encoder_dir or 'none inside prior.pretrained'}); accepted: a CLIPVisionModelWithProjection "
                "folder, e.g. lambdalabs/sd-image-variations-diffusers/image_encoder downloaded, or "
                "<prior.pretrained>/image_encoder."
            )
        try:
            image_encoder = load_image_encoder(str(Path(encoder_dir).expanduser()))
        except (OSError, ValueError) as err:
            raise UserError(f"prior.image_encoder={encoder_dir!r} could not be loaded ({_first_line(err)}); "
                            "accepted: a CLIPVisionModelWithProjection folder (config.json + weights).") from None
        if image_encoder.config.projection_dim + 4 != conditioner.cc_projection.in_features:
            raise UserError(f"prior.image_encoder={encoder_dir!r} embeds in {image_encoder.config.projection_dim} "
                            f"dimensions but the pose projection expects {conditioner.cc_projection.in_features - 4}; "
                            "use the CLIP ViT-L/14 image encoder that Zero123 was trained with.")
        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise UserError(f"prior.pretrained={cfg.pretrained!r}: prediction_type={prediction!r} is not "
                            "supported; accepted: epsilon (every Zero123 release).")
        self.alphas_cumprod = alphas_cumprod_from(scheduler, f"prior.pretrained={cfg.pretrained} scheduler")
        for module in (unet, vae, conditioner, image_encoder):
            module.requires_grad_(False).eval()
        # UNet in the prior's dtype; VAE, CLIP and the projection in fp32 (threestudio's
        # zero123_guidance.py keeps the VAE in fp32 too).
        self.unet = unet.to(self.device)
        self.vae, self.conditioner = vae.to(self.device), conditioner.to(self.device)
        self.image_encoder = image_encoder.to(self.device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        size = cfg.image_size if cfg.image_size is not None else unet.config.sample_size * self.vae_scale
        if size <= 0 or size % self.vae_scale:
            raise UserError(f"prior.image_size={cfg.image_size} is not accepted; use null or a positive "
                            f"multiple of {self.vae_scale} (the VAE's downsampling).")
        self.latent_size = size // self.vae_scale

    @torch.no_grad()
    def _encode_input_view(self) -> None:
        """The CLIP embedding (1, D) and the unscaled VAE latent (1, 4, h, w) of the input view."""
        x = self.rgb[None].to(self.device)
        size = self.image_encoder.config.image_size
        pixels = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
        mean, std = (torch.tensor(v, device=self.device)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
        self.image_embedding = self.image_encoder(pixel_values=(pixels - mean) / std).image_embeds  # (1, D)
        # c_concat is the posterior mode WITHOUT the 0.18215 scaling (threestudio zero123_guidance.py
        # get_img_embeds; zero123 gradio_new.py)
        self.image_latent = self.vae.encode(2 * x - 1).latent_dist.mode()

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.unet.config.out_channels, self.latent_size, self.latent_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.latent_size * self.vae_scale
        return (3, size, size)

    # ---- the input view -----------------------------------------------------------------------
    def input_camera(self) -> Cameras:
        one = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
        cfg, size = self.cfg, self.image_shape[-1]
        return orbit_cameras(one(cfg.input_elevation_deg), one(cfg.input_azimuth_deg), one(cfg.input_distance),
                             one(cfg.input_fovy_deg), size, size)

    def reference_view(self) -> ReferenceView:
        return ReferenceView(camera=self.input_camera(), rgb=self.rgb, mask=self.mask)

    # ---- conditioning and the noise predictor ---------------------------------------------------
    def condition(self, prompt: str, batch: int, cameras: Cameras | None = None) -> PoseCondition:
        """Each row's pose relative to the input view, from its orbit angles and distance (as
        threestudio's zero123 guidance). The prompt is not used."""
        if cameras is None:
            raise UserError("prior=zero123 needs a 3D representation (representation=gaussians or "
                            "representation=nerf): its condition is the camera relative to the input view.")
        if len(cameras) != batch:
            raise ValueError(f"{len(cameras)} cameras for {batch} rows")
        cfg = self.cfg
        pose = relative_pose(
            cameras.elevation_deg.detach().cpu().double(), cameras.azimuth_deg.detach().cpu().double(),
            cameras.distance.detach().cpu().double(), cfg.input_elevation_deg, cfg.input_azimuth_deg,
            cfg.input_distance, stable=cfg.variant == "stable_zero123",
        )  # fmt: skip
        return PoseCondition(pose=pose)

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: PoseCondition, unconditional: Tensor) -> Tensor:
        """Raw ε̂ (B, 4, h, w) in x_t's dtype. Unconditional rows get a zero token and a zero input
        latent (threestudio zero123_guidance.py get_cond; PRIORS.md section 2)."""
        uncond = unconditional.to(self.device)
        with torch.no_grad():
            token = self.conditioner(self.image_embedding, cond.pose.to(self.device, torch.float32))  # (B, 1, D)
            token = torch.where(uncond[:, None, None], torch.zeros_like(token), token)
            latent = self.image_latent.expand(len(x_t), -1, -1, -1)
            latent = torch.where(uncond[:, None, None, None], torch.zeros_like(latent), latent)
            x = unet_input(x_t.to(self.device, torch.float32), latent).to(self.dtype)
            out = self.unet(x, t.to(self.device), encoder_hidden_states=token.to(self.dtype)).sample
        return out.to(x_t.dtype).to(x_t.device)

    # ---- latents ------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [0, 1] (B, 3, H, W) -> scaled latents (B, 4, h, w), differentiable (the
        posterior mean, as prior=sd21)."""
        x = resize_pixels(images.to(self.device), self.image_shape[1:])
        latents = self.vae.encode((2 * x - 1).float()).latent_dist.mean * self.scaling_factor
        return latents.to(images.dtype).to(images.device)

    def decode(self, latents: Tensor) -> Tensor:
        x = self.vae.decode(latents.to(self.device).float() / self.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1).to(latents.device)


def projection_config(embed_dim: int) -> dict:
    """config.json of the clip_camera_projection/ folder (threestudio's CLIPCameraProjection)."""
    return {"_class_name": "CLIPCameraProjection", "embedding_dim": embed_dim, "additional_embeddings": 4}


def save_projection(conditioner: Zero123Conditioner, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    layer = conditioner.cc_projection
    save_file({"proj.weight": layer.weight.detach().contiguous(), "proj.bias": layer.bias.detach().contiguous()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(projection_config(layer.out_features), indent=2))
