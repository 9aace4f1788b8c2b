"""HiFA (Zhu, Zhuang & Koyejo, ICLR 2024): denoising scores in latent and image space, annealed t.

Defaults are the official code's (JunzheJosephZhu/HiFA: the argparse defaults of main.py and
StableDiffusion.train_step in nerf/sd.py). Each step draws a fresh ε per row (sd.py:254), takes the
deterministic t = t_max − (t_max − t_min)·√(i/N) (sd.py:219-222), noises x_t = add_noise(x, ε, ᾱ_t)
and denoises it with CFG g (ε_u + g·(ε_c − ε_u), sd.py:274) to a target x̂0:
  * denoising_steps = 1: the one-step x̂0 = x0_from_eps(x_t, ε̂_g) (sd.py:275);
  * n > 1 (their default 4): DDIM with stride ⌊T/n⌋ from t down while ≥ 0, stochastic with η
    (sd.py:363-403 through diffusers' DDIMScheduler.step), the last step landing on ᾱ_0
    (set_alpha_to_one=False of SD 2.x's scheduler); the final sample is the target.
Their loss is w·[½‖z − sg(ẑ)‖² + λ_rgb·½‖rgb − sg(D(ẑ))‖²] with constant w (sd.py:284-318), where
z is the render's latent, rgb the render and D the VAE decoder. Here, in the prior's space x:
    grad = w·[(x − x̂0) + λ_rgb·J_D(x)ᵀ·(D(x) − D(x̂0))]
the image term pulled back through the prior's decoder by autograd (`Prior.decode` without its
no_grad decorator). For a pixel prior D(x) = (x + 1)/2 is the render itself, so this equals their
gradient exactly (the trainer's encode x = 2·rgb − 1 adds the factor 2 back); for a latent prior
D(x) = D(E(rgb)) stands in for the render, exact up to the VAE's reconstruction error (the trainer
only hands a guidance prior-space x, not the render).

HiFA's z-variance regulariser (main.py:143, λ = 3 in their code) acts on the NeRF's rays, not on the
renders: it is `representation.lambda_z_variance` of representation=nerf, not part of this module.

Cost: one guided prior call per denoising step: 2 prior rows per render row with
denoising_steps = 1; with n = 4 and T = 1000, ⌊t/250⌋ + 1 ∈ {2, 3, 4} calls (4–8 rows) over t ∈
[300, 980]; plus one differentiable decode of 2B rows for λ_rgb > 0 (a VAE decoder forward and
backward for latent priors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.guidance.dsd import check_choice
from dsd.priors.base import add_noise, per_row, x0_from_eps
from dsd.registry import register
from dsd.schedules import timestep_bounds


@dataclass
class HiFAConfig(GuidanceConfig):
    name: str = "hifa"
    cfg_scale: float = 100.0  # --guidance_scale (main.py:30), g of ε_u + g·(ε_c − ε_u) (sd.py:274)
    t_min: float = 0.3  # --min_percent (main.py:34), fractions of T
    t_max: float = 0.98  # --max_percent (main.py:33)
    t_schedule: str = "sqrt"  # --timestep_scheduling (main.py:39; sd.py:219-226): sqrt | linear
    denoising_steps: int = 4  # --denoising_steps (main.py:36); 1: the one-step x̂0
    eta: float = 1.0  # --eta (main.py:38), DDIM stochasticity of the multi-step target
    weight: float = 0.05  # --sds_weight constant (main.py:47): w = 0.05 (sd.py:235-236)
    lambda_rgb: float = 0.1  # --lambda_rgb (main.py:145): the image-space term


def ddim_eta_step(x_t, eps, a, a_prev, eta: float, noise):
    """DDIM (Song et al. 2021, Eq. 12) with σ = η·√((1−ā')/(1−ā)·(1 − ā/ā')), diffusers' step:
    √ā'·x0 + √(1 − ā' − σ²)·ε̂ + σ·z."""
    std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
    out = per_row(a_prev, x_t).sqrt() * x0_from_eps(x_t, eps, a) + per_row(1 - a_prev - std**2, x_t).sqrt() * eps
    return out if noise is None else out + per_row(std, x_t) * noise


@register("guidance", "hifa", HiFAConfig)
class HiFA(Guidance):
    def __init__(self, cfg: HiFAConfig, prior) -> None:
        super().__init__(cfg, prior)
        check_choice("guidance.t_schedule", cfg.t_schedule, ("sqrt", "linear"))
        if not 0 <= cfg.t_min <= cfg.t_max < 1:
            raise UserError(f"guidance.t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 <= t_min <= t_max < 1.")
        if cfg.denoising_steps < 1:
            raise UserError(f"guidance.denoising_steps={cfg.denoising_steps} must be >= 1.")
        if not 0 <= cfg.eta <= 1:
            raise UserError(f"guidance.eta={cfg.eta} must be in [0, 1].")
        for key in ("weight", "lambda_rgb"):
            if getattr(cfg, key) < 0:
                raise UserError(f"guidance.{key}={getattr(cfg, key)} must be >= 0.")
        if cfg.cfg_scale <= 0:
            raise UserError(f"guidance.cfg_scale={cfg.cfg_scale} must be > 0.")

    def timestep(self, ctx: GuidanceContext) -> int:
        """Their t on integer bounds, in their order (sd.py:160-161, :219-226): annealed_timestep
        mixes the fractions before scaling by T, which is 1 off at some steps."""
        lo, hi = timestep_bounds(self.prior.num_train_timesteps, self.cfg.t_min, self.cfg.t_max)
        progress = ctx.step / ctx.steps
        if self.cfg.t_schedule == "sqrt":
            progress = math.sqrt(progress)
        return int((hi - lo) * (1 - progress) + lo)

    def denoise(self, x_t, t: int, ctx: GuidanceContext):
        """The target from x_t at t: one-step x̂0, or DDIM(η) with stride ⌊T/n⌋ down to ᾱ_0."""
        cfg, prior = self.cfg, self.prior
        rows = lambda s: torch.full((len(x_t),), s, dtype=torch.long, device=x_t.device)  # noqa: E731
        if cfg.denoising_steps == 1:
            return x0_from_eps(x_t, prior.eps(x_t, rows(t), ctx.cond, cfg.cfg_scale), prior.alpha(rows(t)))
        stride = prior.num_train_timesteps // cfg.denoising_steps
        x = x_t
        for s in range(t, -1, -stride):
            a = prior.alpha(rows(s))
            a_prev = prior.alpha(rows(max(s - stride, 0)))  # ᾱ_0 past the end (set_alpha_to_one=False)
            eps = prior.eps(x, rows(s), ctx.cond, cfg.cfg_scale)
            x = ddim_eta_step(x, eps, a, a_prev, cfg.eta, ctx.randn_like_rows(x) if cfg.eta > 0 else None)
        return x

    def image_term(self, x, target):
        """J_D(x)ᵀ·(D(x) − D(target)), by autograd through the prior's decoder."""
        with torch.no_grad():  # the target needs no backward through the decoder
            aim = self.prior.decode(target.detach())
        with torch.enable_grad():
            source = x.detach().requires_grad_(True)
            own = self.prior.decode(source)
            if not own.requires_grad:
                raise UserError(f"guidance.lambda_rgb={self.cfg.lambda_rgb} needs a prior whose decode is "
                                f"differentiable ({self.prior.name}'s is not); set guidance.lambda_rgb=0.")
            (pulled,) = torch.autograd.grad(own, source, grad_outputs=own.detach() - aim)
        return pulled.to(x)

    def grad(self, x, ctx: GuidanceContext):
        cfg = self.cfg
        t = self.timestep(ctx)
        a = self.prior.alpha(torch.full((len(x),), t, dtype=torch.long, device=x.device))
        target = self.denoise(add_noise(x, ctx.randn_like_rows(x), a), t, ctx)
        grad = x - target
        if cfg.lambda_rgb > 0:
            grad = grad + cfg.lambda_rgb * self.image_term(x, target)
        return cfg.weight * grad, {"t": float(t)}
