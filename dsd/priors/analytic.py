"""The analytic prior: the exact denoiser of a finite mixture of reference images.

Data distribution per prompt: uniform over K procedural references x_k (prior space [−1, 1]).
For a mixture of points the posterior mean is exact (Tweedie):
    E[x0 | x_t] = Σ_k softmax_k(−‖x_t − √ᾱ x_k‖² / 2(1−ᾱ)) x_k,   ε̂ = (x_t − √ᾱ E[x0|x_t]) / √(1−ᾱ).
Conditional = the prompt's K references; unconditional = the references of every prompt in the
pool plus the prompts conditioned on in this process, so classifier-free guidance is real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsd.config import PriorConfig
from dsd.errors import UserError
from dsd.priors.base import Condition, Prior, eps_from_x0, scaled_linear_alphas_cumprod
from dsd.priors.procedural import reference_images
from dsd.registry import register

DEFAULT_POOL = [
    "a hamburger",
    "a red apple",
    "a teapot",
    "a corgi",
    "a space shuttle",
    "an astronaut riding a horse",
    "a blue sports car",
    "a medieval castle",
]


@dataclass
class AnalyticPriorConfig(PriorConfig):
    name: str = "analytic"
    mode: str = "text"  # text: one view, SD-like
    num_references: int = 8  # K references per prompt
    image_size: int = 32
    pool: list[str] = field(default_factory=lambda: list(DEFAULT_POOL))
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # Stable Diffusion's scaled_linear schedule
    beta_end: float = 0.012


@dataclass
class AnalyticCondition(Condition):
    prompt_index: Tensor  # (B,) index into AnalyticPrior.prompts


@register("prior", "analytic", AnalyticPriorConfig)
class AnalyticPrior(Prior):
    name = "analytic"

    def __init__(self, cfg: AnalyticPriorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.mode != "text":
            raise UserError(
                f"prior.mode={cfg.mode!r} is not available yet for the analytic prior; accepted: text."
            )
        if cfg.num_references < 1 or cfg.image_size < 4:
            raise UserError(
                f"prior.num_references={cfg.num_references} and prior.image_size={cfg.image_size} "
                "must be >= 1 and >= 4."
            )
        self.cfg = cfg
        self.device = torch.device(device)
        self.alphas_cumprod = scaled_linear_alphas_cumprod(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end
        )
        self.prompts: list[str] = []
        self._refs = torch.zeros(0, cfg.num_references, 3 * cfg.image_size**2, dtype=torch.float64)
        for prompt in cfg.pool:
            self._index_of(prompt)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.cfg.image_size, self.cfg.image_size)

    def _index_of(self, prompt: str) -> int:
        key = prompt.strip().lower()
        if key not in self.prompts:
            images = reference_images(key, self.cfg.num_references, self.cfg.image_size)
            flat = self.encode(images.double()).reshape(1, self.cfg.num_references, -1)
            self._refs = torch.cat([self._refs, flat.to(self._refs)])
            self.prompts.append(key)
        return self.prompts.index(key)

    def references(self, prompt: str) -> Tensor:
        """The prompt's K reference images in [0, 1], (K, 3, S, S)."""
        refs = self._refs[self._index_of(prompt)].reshape(-1, *self.sample_shape)
        return self.decode(refs).float()

    def condition(self, prompt: str, batch: int, cameras=None) -> AnalyticCondition:
        index = self._index_of(prompt)
        return AnalyticCondition(prompt_index=torch.full((batch,), index, dtype=torch.long))

    def posterior(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, unconditional: Tensor) -> Tensor:
        """p(k | x_t) over all references of all prompts (B, P·K), zero outside each row's set."""
        refs = self._refs.reshape(-1, self._refs.shape[-1]).to(x_t.device)  # (P·K, D)
        x = x_t.reshape(len(x_t), -1).double()
        a = self.alpha(t.cpu()).to(x.device)[:, None]  # (B, 1)
        # ‖x − √a·x_k‖², expanded so it is one matmul; float64 keeps the cancellation harmless.
        d2 = (x**2).sum(1, keepdim=True) - 2 * a.sqrt() * (x @ refs.T) + a * (refs**2).sum(1)[None]
        logits = -d2 / (2 * (1 - a))
        owner = torch.arange(len(self._refs), device=x.device).repeat_interleave(self._refs.shape[1])
        allowed = unconditional[:, None].to(x.device) | (
            owner[None] == cond.prompt_index.to(x.device)[:, None]
        )
        return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, unconditional: Tensor) -> Tensor:
        refs = self._refs.reshape(-1, self._refs.shape[-1]).to(x_t.device)
        x0 = (self.posterior(x_t, t, cond, unconditional) @ refs).reshape(x_t.shape)  # E[x0 | x_t]
        return eps_from_x0(x_t.double(), x0, self.alpha(t.cpu()).to(x_t.device)).to(x_t.dtype)
