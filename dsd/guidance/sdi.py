"""SDI: Score Distillation via Reparametrized DDIM (Lukoianov et al. 2024), as the DSD authors run it
(BillyXYB/Diverse-Score-Distillation, configs/sdi.yaml and threestudio/models/guidance/
stable_diffusion_sdi_guidance.py, "SDI file" below).

Instead of fresh noise, the noisy point is found by DDIM *inversion* of the current render x:
  1. t anneals linearly, t = ⌊T·((t_max − t_min)(1 − i/N) + t_min)⌋ (SDI file :647-661); the
     inversion goes through the "leading" grid points k·⌊T/n⌋ + offset strictly below t and ends at
     t + δ, δ = ⌊U·T/n⌋, capped at T−1 (:329-377);
  2. each inversion step from s to s' predicts ε̂ with CFG scale g_inv (−7.5: it pushes away from the
     prompt) and moves x deterministically, x' = √ᾱ_s'·x0(x, ε̂) + √(1−ᾱ_s')·ε̂, then adds
     η·σ·z with σ² = (1−ᾱ_s)/(1−ᾱ_s')·(1 − ᾱ_s'/ᾱ_s), the DDIM variance of the step back (:269-327);
  3. at the inverted point x_τ (τ = t + δ) the guided prediction is taken with the time label t, and
     the target is x̂0 = (x_τ − √(1−ᾱ_t)·ε̂_g(x_τ, t))/√ᾱ_t (:448-460, scheduler.step's x0 at t);
     grad = x − x̂0 (:524: ½‖x − x̂0‖², its constant 1/(B·numel) dropped: Adam is scale-free).

Deviation: the inversion starts at label 0 where the SDI file starts at offset − ⌊T/n⌋ = −99, a time
outside the trained range (the analytic prior cannot evaluate it); its ᾱ is ᾱ_0 in both
(DDIMInverseScheduler.initial_alpha_cumprod with set_alpha_to_one=False), so only the network's
time label differs.

Cost: (grid points below t) + 2 guided prior calls per render row and step, 2 rows each without
Perp-Neg: 24 rows per render row at t = 0.98·T, 10 at t = 0.25·T. Nothing is cached (x changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.guidance.dsd import check_choice
from dsd.ode import ddim_step
from dsd.priors.base import per_row, x0_from_eps
from dsd.registry import register
from dsd.schedules import annealed_timestep, timestep_bounds, uniform_timestep


@dataclass
class SDIConfig(GuidanceConfig):
    name: str = "sdi"
    # Scales g of ε_u + g·(ε_c − ε_u). configs/sdi.yaml:66 turns Perp-Neg on, whose branch mixes
    # exactly so (SDI file :241): guidance_scale 7.5 (yaml:71) and inversion_guidance_scale −7.5
    # (yaml:78). Without Perp-Neg the SDI file mixes ε_c + g·(ε_c − ε_u) (:263), i.e. g + 1 here.
    cfg_scale: float = 7.5
    inversion_cfg_scale: float = -7.5
    inversion_steps: int = 10  # n (yaml:79)
    inversion_eta: float = 0.3  # η (yaml:80)
    # Stable Diffusion's scheduler: "leading" spacing, steps_offset 1 (SDI file :337-345)
    inversion_steps_offset: int = 1
    t_schedule: str = "linear"  # linear: t_anneal=true (yaml:81) | random: t ~ U{t_min..t_max} per sample
    t_min: float = 0.25  # fractions of T (yaml:73-74)
    t_max: float = 0.98


def ddim_variance(a_from: Tensor, a_to: Tensor) -> Tensor:
    """σ² of the DDIM step from the noisier ᾱ_to back to ᾱ_from (DDIM Eq. 16, η = 1):
    (1−ᾱ_from)/(1−ᾱ_to)·(1 − ᾱ_to/ᾱ_from)."""
    return (1 - a_from) / (1 - a_to) * (1 - a_to / a_from)


def inversion_path(t: int, last: int, num_train_timesteps: int, steps: int, offset: int) -> list[int]:
    """Time labels the inversion visits: 0 (the render), the leading grid points below t, `last`."""
    ratio = num_train_timesteps // steps
    return [0, *(k * ratio + offset for k in range(steps) if k * ratio + offset < t), last]


@register("guidance", "sdi", SDIConfig)
class SDI(Guidance):
    def __init__(self, cfg: SDIConfig, prior) -> None:
        super().__init__(cfg, prior)
        check_choice("guidance.t_schedule", cfg.t_schedule, ("linear", "random"))
        if not 0 <= cfg.t_min <= cfg.t_max < 1:
            raise UserError(f"guidance.t_min={cfg.t_min}, guidance.t_max={cfg.t_max}: need 0 <= t_min <= t_max < 1.")
        if not 1 <= cfg.inversion_steps <= prior.num_train_timesteps:
            raise UserError(f"guidance.inversion_steps={cfg.inversion_steps} must be in [1, {prior.num_train_timesteps}].")
        if cfg.inversion_eta < 0:
            raise UserError(f"guidance.inversion_eta={cfg.inversion_eta} must be >= 0.")
        if not 0 <= cfg.inversion_steps_offset < prior.num_train_timesteps // cfg.inversion_steps:
            raise UserError(f"guidance.inversion_steps_offset={cfg.inversion_steps_offset} must be in "
                            f"[0, T/inversion_steps) = [0, {prior.num_train_timesteps // cfg.inversion_steps}).")

    def timesteps(self, ctx: GuidanceContext) -> tuple[Tensor, Tensor]:
        """t (B,) and the inversion's end τ = min(t + ⌊U·T/n⌋, T−1) (B,), one of each per sample."""
        cfg, T = self.cfg, self.prior.num_train_timesteps
        if cfg.t_schedule == "linear":
            t = torch.full((len(ctx.seeds),), annealed_timestep(ctx.step, ctx.steps, T, cfg.t_max, cfg.t_min, "linear"))
        else:
            t_min, t_max = timestep_bounds(T, cfg.t_min, cfg.t_max)
            t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max))
        delta = torch.div(ctx.rand_rows() * T, cfg.inversion_steps, rounding_mode="floor").long()
        return t, (t + delta).clamp(max=T - 1)

    @torch.no_grad()
    def invert(self, x: Tensor, t: Tensor, end: Tensor, ctx: GuidanceContext) -> Tensor:
        """x_τ: each row's render inverted along its path to τ = end[row]. (B, C, H, W)"""
        cfg = self.cfg
        paths = [inversion_path(int(ti), int(ei), self.prior.num_train_timesteps, cfg.inversion_steps,
                                cfg.inversion_steps_offset) for ti, ei in zip(t, end)]
        x = x.clone()
        for k in range(max(map(len, paths)) - 1):
            # rows still inverting; a sample's rows share t and τ, so multi-view objects stay whole
            rows = [i for i, path in enumerate(paths) if k + 1 < len(path)]
            s = torch.tensor([paths[i][k] for i in rows], device=x.device)
            s_next = torch.tensor([paths[i][k + 1] for i in rows], device=x.device)
            eps = self.prior.eps(x[rows], s, ctx.cond.rows(rows), cfg.inversion_cfg_scale)
            a, a_next = self.prior.alpha(s), self.prior.alpha(s_next)
            moved = ddim_step(x[rows], eps, a, a_next)
            if cfg.inversion_eta > 0:
                noise = ctx.randn_like_rows(x)[rows]
                moved = moved + cfg.inversion_eta * per_row(ddim_variance(a, a_next).sqrt(), x) * noise
            x[rows] = moved
        return x

    def grad(self, x, ctx: GuidanceContext):
        t, end = self.timesteps(ctx)
        t, end = t.to(x.device), end.to(x.device)
        x_tau = self.invert(x, t, end, ctx)
        eps = self.prior.eps(x_tau, t, ctx.cond, self.cfg.cfg_scale)  # label t at the point τ, as the SDI file
        target = x0_from_eps(x_tau, eps, self.prior.alpha(t))
        return x - target, {"t": float(t.float().mean()), "t_inverted": float(end.float().mean())}
