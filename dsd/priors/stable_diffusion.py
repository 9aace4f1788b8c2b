"""prior=sd21: Stable Diffusion 2.1 (or any SD checkpoint in diffusers layout) as a latent prior.

Text embeddings are computed once per distinct prompt string and kept in a table; a condition
holds only small per-row indices into it (plus Perp-Neg's mixing ratio and weights), so rows(),
cat() and the ODE cache key stay cheap. Classifier-free guidance, the negative prompt and
Perp-Neg rows are all evaluated in ONE UNet call by `Prior.eps`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from dsd.config import PriorConfig
from dsd.errors import UserError
from dsd.priors import perp_neg
from dsd.priors.base import Condition, Prior, eps_from_v, resize_pixels, scaled_linear_betas
from dsd.registry import register

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusionConfig(PriorConfig):
    name: str = "sd21"
    pretrained: str = "stabilityai/stable-diffusion-2-1-base"  # hub id or a local diffusers dir
    revision: Optional[str] = None
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    negative_prompt: str = ""  # the unconditional branch of CFG
    view_dependent: bool = True  # "<prompt>, front view" etc. when the trainer passes cameras
    perp_neg: Optional[bool] = None  # null: on when view_dependent (Perp-Neg, Armandpour et al.)
    perp_neg_f_fs: list[float] = field(default_factory=lambda: list(perp_neg.F_FS))
    perp_neg_f_sf: list[float] = field(default_factory=lambda: list(perp_neg.F_SF))
    perp_neg_f_sb: list[float] = field(default_factory=lambda: list(perp_neg.F_SB))
    perp_neg_f_fsb: list[float] = field(default_factory=lambda: list(perp_neg.F_FSB))
    azimuth_bin_deg: float = 0.0  # >0: quantize azimuth for Perp-Neg, so ODE cache keys repeat
    attention_slicing: bool = False
    vae_slicing: bool = False
    compile: bool = False  # torch.compile the UNet (first calls are slow)
    local_files_only: Optional[bool] = None  # null: true when HF_HUB_OFFLINE=1


@dataclass
class TextCondition(Condition):
    prompt_index: Tensor  # (B, 2) long: table rows mixed for the positive prompt
    prompt_mix: Tensor  # (B,) float64: weight of prompt_index[:, 0]; 1 − it for [:, 1]
    negative_index: Tensor  # (B,) long: the unconditional (negative) prompt
    perp_index: Tensor  # (B, K) long: Perp-Neg negative view prompts (K = 0 without Perp-Neg)
    perp_weight: Tensor  # (B, K) float64: their weights (0: not evaluated)

    def negative_prompts(self):
        if self.perp_index.shape[1] == 0:
            return None
        owner, slot = (self.perp_weight != 0).nonzero(as_tuple=True)
        index = self.perp_index[owner, slot]
        negatives = TextCondition(
            prompt_index=index[:, None].repeat(1, 2),
            prompt_mix=torch.ones(len(index), dtype=torch.float64),
            negative_index=self.negative_index[owner],
            perp_index=torch.zeros(len(index), self.perp_index.shape[1], dtype=torch.long),
            perp_weight=torch.zeros(len(index), self.perp_index.shape[1], dtype=torch.float64),
        )
        return negatives, owner, self.perp_weight[owner, slot]

    def without_negatives(self) -> TextCondition:
        return dataclasses.replace(self, perp_weight=torch.zeros_like(self.perp_weight))  # weight 0: not evaluated


def missing_weights_error(cfg: StableDiffusionConfig, err: Exception) -> UserError:
    return UserError(
        f"prior.pretrained={cfg.pretrained} could not be loaded: the Stable Diffusion weights are not "
        f"available here (offline or not downloaded; {type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Download them on a machine with internet, e.g. `hf download stabilityai/stable-diffusion-2-1-base "
        "--local-dir /path/sd21` (older hubs: `huggingface-cli download`), copy the folder here and run "
        "`dsd-run prior=sd21 prior.pretrained=/path/sd21` (a local folder in diffusers layout: unet/, "
        "vae/, text_encoder/, tokenizer/, scheduler/)."
    )


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' DDIMScheduler's
# Fields that change the model itself (not just how diffusers samples it), with the values we do not
# implement. Every other field (timestep_spacing, steps_offset, set_alpha_to_one, clip_sample,
# thresholding, solver settings, ...) only shapes diffusers' own samplers and is ignored on purpose:
# our DDIM grid and step follow the official DSD code (dsd/ode.py).
UNMODELED_VALUES = {
    "variance_type": ("learned", "learned_range"),  # the UNet also predicts a variance
    "timestep_type": ("continuous",),  # the UNet is fed a σ-based time, not the integer t
    "use_flow_sigmas": (True,),  # flow matching, not x_t = √ᾱ·x0 + √(1−ᾱ)·ε
}
# ᾱ at T−1 under zero terminal SNR: 0 exactly would make σ(T−1) infinite and x0_from_eps 0/0 at
# the ODE's first grid point and the top of the t range; diffusers' samplers clamp it to this
# (scheduling_euler_discrete.py:251 in diffusers 0.42.1, "FP16 smallest positive subnormal").
ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """ "squaredcos_cap_v2" (improved DDPM's cosine schedule): β_i = min(1 − f((i+1)/T)/f(i/T), max_beta),
    f(s) = cos²((s + 0.008)/1.008 · π/2); max_beta 0.999 as diffusers' betas_for_alpha_bar. (T,) float64"""
    s = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed"), Alg. 1,
    on ᾱ directly: shift √ᾱ so its last value is 0 and scale it so its first value is kept."""
    root = alphas_cumprod.sqrt()
    first, last = root[0], root[-1]
    return ((root - last) * first / (first - last)) ** 2


def alphas_cumprod_from(config: dict, source: str = "the scheduler config") -> Tensor:
    """ᾱ (T,) in float64 from a diffusers scheduler config, built from the same fields as diffusers'
    DDIMScheduler (num_train_timesteps, beta_start/end, beta_schedule, trained_betas,
    rescale_betas_zero_snr); a value we do not model is a UserError naming it."""
    for key, refused in UNMODELED_VALUES.items():
        if config.get(key) in refused:
            raise UserError(f"{source}: {key}={config[key]!r} is not supported (it changes the model, "
                            f"which this prior does not implement); accepted: anything but {list(refused)}.")
    T = config.get("num_train_timesteps", 1000)
    if not isinstance(T, int) or T < 2:
        raise UserError(f"{source}: num_train_timesteps={T!r} is not accepted; use an integer >= 2.")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64).flatten()
        if len(betas) != T:
            raise UserError(f"{source}: trained_betas has {len(betas)} values but num_train_timesteps={T}; "
                            "they must match.")
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(T, start, end)
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise UserError(f"{source}: beta_schedule={kind!r} is not supported; accepted: "
                        f"{', '.join(BETA_SCHEDULES)} (or trained_betas).")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if zero_snr not in (True, False):
        raise UserError(f"{source}: rescale_betas_zero_snr={zero_snr!r} is not accepted; use true or false.")
    if zero_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHA_CUMPROD
    return alphas_cumprod


@register("prior", "sd21", StableDiffusionConfig)
class StableDiffusionPrior(Prior):
    name = "sd21"

    def __init__(self, cfg: StableDiffusionConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.dtype not in ("auto", *DTYPES):
            raise UserError(f"prior.dtype={cfg.dtype!r} is not accepted; use one of: auto, fp32, fp16, bf16.")
        if cfg.perp_neg and not cfg.view_dependent:
            raise UserError("prior.perp_neg=true needs prior.view_dependent=true (Perp-Neg mixes view prompts).")
        auto = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = auto if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.use_perp_neg = cfg.view_dependent if cfg.perp_neg is None else cfg.perp_neg
        self._load()
        self._index: dict[str, int] = {}  # prompt string -> row of the embedding table
        self._rows: list[Tensor] = []  # (L, D) each
        self._table: Tensor | None = None  # (P, L, D) stacked lazily

    def _load(self) -> None:
        cfg = self.cfg
        value = os.path.expanduser(cfg.pretrained)
        looks_local = value.startswith((os.sep, ".")) or value.count("/") > 1  # hub ids are org/name
        if looks_local and not os.path.isdir(value):  # fail fast, before the slow imports
            raise missing_weights_error(cfg, FileNotFoundError(f"no directory {value}"))
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        local = cfg.local_files_only
        if local is None:
            local = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        kw = {"revision": cfg.revision, "local_files_only": local}
        try:
            unet = UNet2DConditionModel.from_pretrained(
                value, subfolder="unet", torch_dtype=self.dtype, **kw
            )
            vae = AutoencoderKL.from_pretrained(value, subfolder="vae", torch_dtype=self.dtype, **kw)
            text_encoder = CLIPTextModel.from_pretrained(
                value, subfolder="text_encoder", dtype=self.dtype, **kw
            )
            self.tokenizer = AutoTokenizer.from_pretrained(value, subfolder="tokenizer", **kw)
            scheduler = DDIMScheduler.load_config(value, subfolder="scheduler", **kw)
        except (OSError, ValueError) as err:  # hub/file errors are OSError; bad repo ids ValueError
            raise missing_weights_error(cfg, err) from None
        self.prediction_type = scheduler.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type={self.prediction_type!r} of {cfg.pretrained} is not supported; "
                            "accepted: epsilon, v_prediction.")
        self.alphas_cumprod = alphas_cumprod_from(scheduler, f"prior.pretrained={cfg.pretrained} scheduler")
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False).eval()
        # UNet, VAE and text encoder all run in the prior's dtype (loaded so, see above); inputs and
        # outputs are converted at this class's boundary (predict_eps, encode, decode).
        self.unet, self.vae, self.text_encoder = unet.to(self.device), vae.to(self.device), text_encoder.to(self.device)
        # diffusers uses torch's scaled_dot_product_attention by default (AttnProcessor2_0).
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        if cfg.attention_slicing:
            self.unet.set_attention_slice("auto")
        if cfg.vae_slicing:
            self.vae.use_slicing = True  # encode/decode one image at a time
        self._unet = torch.compile(self.unet) if cfg.compile else self.unet
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size * self.vae_scale
        return (3, size, size)

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> list[int]:
        """Table rows of `prompts`; the text encoder runs once, batched, for the new ones only."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._index))
        if new:
            tokens = self.tokenizer(
                new, padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)  # fmt: skip
            # SD 2.x conditions on the encoder's last hidden state (diffusers' pipeline does too;
            # the converted OpenCLIP text encoder already ends at the penultimate layer).
            hidden = self.text_encoder(tokens)[0]  # (P, L, D)
            for prompt, row in zip(new, hidden):
                self._index[prompt] = len(self._rows)
                self._rows.append(row)
            self._table = None
        return [self._index[p] for p in prompts]

    def embedding_table(self) -> Tensor:
        if self._table is None:
            self._table = torch.stack(self._rows)
        return self._table

    def condition(self, prompt: str, batch: int, cameras=None) -> TextCondition:
        """Without cameras: the plain prompt. With cameras and view_dependent: the row's view
        prompt, or with Perp-Neg the azimuth-interpolated view prompts and negative views."""
        K = 2 if self.use_perp_neg else 0
        view_dependent = cameras is not None and self.cfg.view_dependent
        texts = [f"{prompt}, {v} view" for v in perp_neg.VIEW_LABELS] if view_dependent else [prompt]
        negative, *rows = self._embed([self.cfg.negative_prompt, *texts])  # one encoder call at most
        perp_index = torch.zeros(batch, K, dtype=torch.long)
        perp_weight = torch.zeros(batch, K, dtype=torch.float64)
        mix = torch.ones(batch, dtype=torch.float64)
        if not view_dependent:
            index = torch.full((batch, 2), rows[0], dtype=torch.long)
        else:
            views = torch.tensor(rows)  # table rows of the front/side/back/overhead prompts
            labels = cameras.view_labels()
            index = views[[perp_neg.VIEW_LABELS.index(v) for v in labels]][:, None].repeat(1, 2)
            if self.use_perp_neg:
                azimuth = cameras.azimuth_deg.detach().cpu().double()
                if self.cfg.azimuth_bin_deg > 0:
                    azimuth = torch.round(azimuth / self.cfg.azimuth_bin_deg) * self.cfg.azimuth_bin_deg
                pn = perp_neg.perp_neg_views(
                    azimuth, torch.tensor([v == "overhead" for v in labels]), self.cfg.perp_neg_f_fs,
                    self.cfg.perp_neg_f_sf, self.cfg.perp_neg_f_sb, self.cfg.perp_neg_f_fsb,
                )  # fmt: skip
                index, mix, perp_index, perp_weight = views[pn.pos], pn.mix, views[pn.neg], pn.weight
        return TextCondition(
            prompt_index=index,
            prompt_mix=mix,
            negative_index=torch.full((batch,), negative, dtype=torch.long),
            perp_index=perp_index,
            perp_weight=perp_weight,
        )

    def text_embeddings(self, cond: TextCondition, unconditional: Tensor) -> Tensor:
        """Per-row encoder hidden states (B, L, D) in the prior's dtype."""
        table = self.embedding_table()
        mix = cond.prompt_mix.to(self.device, torch.float32)[:, None, None]
        pos = mix * table[cond.prompt_index[:, 0]].float() + (1 - mix) * table[cond.prompt_index[:, 1]].float()
        uncond = table[cond.negative_index].float()
        return torch.where(unconditional.to(self.device)[:, None, None], uncond, pos).to(self.dtype)

    # ---- the noise predictor --------------------------------------------------------------
    def predict_eps(self, x_t: Tensor, t: Tensor, cond: TextCondition, unconditional: Tensor) -> Tensor:
        """Raw ε̂ (B, C, h, w) in x_t's dtype; a v-prediction checkpoint's output is converted."""
        hidden = self.text_embeddings(cond, unconditional)
        with torch.no_grad():
            out = self._unet(x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=hidden).sample
        out = out.to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            out = eps_from_v(x_t, out, self.alpha(t.cpu()).to(x_t.device))
        return out

    # ---- latents ----------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [0, 1] (B, 3, H, W) -> latents (B, 4, h, w), differentiable w.r.t. images."""
        x = resize_pixels(images.to(self.device), self.image_shape[1:])
        # The posterior mean, not a sample: the latent of a render is then a deterministic function
        # of it, so all randomness stays in the seed's own generators (the VAE's std is tiny anyway).
        latents = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist.mean * self.scaling_factor
        return latents.to(images.dtype).to(images.device)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 4, h, w) -> pixels in [0, 1] (B, 3, H, W), float32, on the input's device.
        Differentiable w.r.t. the latents (HiFA's image-space term); callers that only look at the
        pixels run it under torch.no_grad or on latents without grad."""
        x = self.vae.decode((latents.to(self.device) / self.scaling_factor).to(self.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).to(latents.device)
