"""The Prior interface and the diffusion formulas every guidance shares (one formula, one place).

Notation (paper Sec. 3.1): a = alphas_cumprod[t] (ᾱ), x_t = √a·x0 + √(1−a)·ε.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.cameras import Cameras
from dsd.priors.perp_neg import perp_neg_guidance


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Stable Diffusion's "scaled_linear" betas: linear in √β, in float64. (T,)"""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """ᾱ of Stable Diffusion's "scaled_linear" beta schedule, in float64. (T,)"""
    return torch.cumprod(1.0 - scaled_linear_betas(num_train_timesteps, beta_start, beta_end), dim=0)


def per_row(a: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) in the dtype of `like`, so it broadcasts over (B, C, H, W)."""
    return a.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """x_t = √a·x0 + √(1−a)·ε  (forward process; also the interpolation of DSD Eq. 9)."""
    a = per_row(a, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """One-step data prediction x0 = (x_t − √(1−a)·ε) / √a  (Eq. 3, in x_t form)."""
    a = per_row(a, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, a: Tensor) -> Tensor:
    """ε = (x_t − √a·x0) / √(1−a): the noise that explains x_t given x0."""
    a = per_row(a, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def eps_from_v(x_t: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """ε from a v-prediction v = √a·ε − √(1−a)·x0 (Salimans & Ho 2022, Sec. 4):
    ε = √a·v + √(1−a)·x_t."""
    a = per_row(a, x_t)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def resize_pixels(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Renders (B, 3, H, W) to the prior's pixel size: plain bilinear (no antialias), so the
    gradient stays simple; a no-op at the right size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


def sigma(a: Tensor) -> Tensor:
    """σ(t) = √(1−ᾱ)/√ᾱ, the noise scale of x̄ = x/√ᾱ (Sec. 3.1)."""
    return ((1 - a) / a).sqrt()


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: Tensor) -> Tensor:
    """ε_g = ε_u + g·(ε_c − ε_u); g per row, (B,). g is diffusers' guidance_scale (Imagen's w,
    Saharia et al. 2022 Eq. 2): g = 1 is no guidance. Ho & Salimans 2022 (Eq. 6) and threestudio's
    non-Perp-Neg branch write (1 + w)·ε_c − w·ε_u instead, i.e. g = w + 1."""
    return eps_uncond + per_row(scale, eps_cond) * (eps_cond - eps_uncond)


@dataclass
class Condition:
    """Per-row conditioning. Every tensor field has the batch as its first dimension, so
    `rows`/`cat` work for any prior's condition without prior-specific code."""

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def __len__(self) -> int:
        return len(getattr(self, self._tensor_fields()[0]))

    def rows(self, index: Tensor | Sequence[int]) -> Condition:
        index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(
            self,
            **{
                name: getattr(self, name)[index.to(getattr(self, name).device)]
                for name in self._tensor_fields()
            },
        )

    @classmethod
    def cat(cls, conditions: Sequence[Condition]) -> Condition:
        first = conditions[0]
        return dataclasses.replace(
            first,
            **{name: torch.cat([getattr(c, name) for c in conditions]) for name in first._tensor_fields()},
        )

    def negative_prompts(self) -> tuple[Condition, Tensor, Tensor] | None:
        """Perp-Neg negatives of these rows: (their conditions, N rows; owner (N,), the row each
        belongs to; weight (N,)), or None when the prior has none (then guidance is plain CFG)."""
        return None

    def without_negatives(self) -> Condition:
        """The same rows with no Perp-Neg negatives, so a row at scale 1 is the plain conditional
        ε̂_c (ASD's t⁺). Conditions without negatives return themselves."""
        return self

    def cache_key(self, row: int) -> Hashable:
        """What makes two rows follow the same ODE (with the same seed): their conditioning."""
        return tuple(tuple(getattr(self, name)[row].flatten().tolist()) for name in self._tensor_fields())


@dataclass
class ReferenceView:
    """The input view of an image-conditioned prior (Zero-1-to-3, analytic image mode): the camera
    it was taken from and what it shows, for the reference-view loss of image-to-3D."""

    camera: Cameras  # one view
    rgb: Tensor  # (3, H, W) in [0, 1], the object over its background
    mask: Tensor  # (1, H, W) in [0, 1], 1 on the object


class Prior(torch.nn.Module, abc.ABC):
    """A pretrained (or exact) noise predictor with classifier-free guidance.

    Subclasses set `alphas_cumprod` (float64, (T,)) and implement `predict_eps` (raw, unguided
    rows), `condition`, `encode`/`decode` and `sample_shape`.

    Multi-view priors (MVDream, analytic `mode=multiview`) set `views_per_sample` F > 1: the F
    renders of one object at a step are ONE sample. Then every batch they get is whole objects, F
    adjacent rows each (view slots 0..F−1, in that order), with one t per object; the trainer
    renders F cameras per seed and step (`dsd.cameras.sample_multiview_cameras`) and a seed's ε*
    is F noises, one per view slot.
    """

    name: str = "prior"
    alphas_cumprod: Tensor
    views_per_sample: int = 1  # F: rows evaluated jointly as one sample (see above)
    needs_cameras: bool = False  # True: only 3D representations (the condition is a camera set)

    def reference_view(self) -> ReferenceView | None:
        """The input view the result must reproduce (image-conditioned priors), else None."""
        return None

    def __init__(self) -> None:
        super().__init__()
        self.rows_evaluated = 0  # prior batch rows evaluated so far (the cost measure)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t: Tensor) -> Tensor:
        """ᾱ at integer timesteps t (B,), float64."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample in the prior's space (latents for a latent prior)."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of decoded pixels; equal to sample_shape for pixel priors."""
        return (3, *self.sample_shape[1:])

    @abc.abstractmethod
    def condition(self, prompt: str, batch: int, cameras=None) -> Condition:
        """Conditioning for `batch` rows of `prompt` (and per-row cameras when the prior uses them)."""

    @abc.abstractmethod
    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Condition, unconditional: Tensor) -> Tensor:
        """Raw ε̂ for each row; row i is evaluated unconditionally where unconditional[i]."""

    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [0, 1] (B, 3, H, W) -> prior space. Pixel priors use [−1, 1]."""
        return images * 2 - 1

    def decode(self, x: Tensor) -> Tensor:
        """Prior space -> pixels in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def eps(self, x_t: Tensor, t: Tensor, cond: Condition, cfg_scale: float | Tensor) -> Tensor:
        """Guided ε̂ for B rows in ONE batched call. (B, C, H, W), t (B,), cfg_scale float or (B,).

        A row is "guided" (gets an unconditional row) when its scale is not 1 or it has Perp-Neg
        negatives (`Condition.negative_prompts`): at g = 1 plain CFG is the conditional prediction,
        so mixed-scale batches such as DSD's two points cost no waste, but Perp-Neg at g = 1 is
        still ε_c − Σ w_i·e_i^⊥: the official DSD code evaluates x̂(t+δ) with guidance_scale 1.0
        through its Perp-Neg branch (BillyXYB/Diverse-Score-Distillation,
        threestudio/models/guidance/stable_diffusion_dsd_guidance.py:364 and :200-233).
        The guided rows' negative prompts join the same call and are mixed by `perp_neg_guidance`.
        """
        batch = x_t.shape[0]
        scale = torch.as_tensor(cfg_scale, dtype=torch.float64, device=x_t.device).expand(batch)
        negatives = cond.negative_prompts()
        needs_uncond = scale != 1
        if negatives is not None:
            needs_uncond[negatives[1].to(x_t.device)] = True
        guided = needs_uncond.nonzero().flatten()
        xs, ts, conds = [x_t, x_t[guided]], [t, t[guided]], [cond]
        if len(guided):
            conds.append(cond.rows(guided.cpu()))
        if negatives is not None:  # Perp-Neg: every row's negative prompts, same batch
            neg_cond, owner, weight = negatives
            owner = owner.to(x_t.device)
            xs, ts, conds = [*xs, x_t[owner]], [*ts, t[owner]], [*conds, neg_cond]
        x_all, t_all = torch.cat(xs), torch.cat(ts)
        cond_all = Condition.cat(conds) if len(conds) > 1 else cond
        unconditional = torch.zeros(len(x_all), dtype=torch.bool, device=x_t.device)
        unconditional[batch : batch + len(guided)] = True
        raw = self.predict_eps(x_all, t_all, cond_all, unconditional)
        self.rows_evaluated += len(x_all)
        out = raw[:batch].clone()
        if not len(guided):
            return out
        eps_uncond = raw[batch : batch + len(guided)]
        if negatives is not None:
            slot = torch.cumsum(needs_uncond, 0) - 1  # row -> its position among the guided rows
            out[guided] = perp_neg_guidance(
                eps_uncond, raw[guided], raw[batch + len(guided) :], slot[owner].to(raw.device),
                weight.to(raw.device), scale[guided],
            )  # fmt: skip
        else:
            out[guided] = classifier_free_guidance(eps_uncond, raw[guided], scale[guided])
        return out
