"""DSD (interp): Diverse Score Distillation, Eq. 9–10 / Alg. 3, with the official code's defaults.

Each seed has a fixed ε*. At step i, t anneals deterministically; t+δ ≥ t with
δ = U·min(0.1(t − t_min), T−1−t) (official, after ASD). ε_ode is the ODE's prediction at t+δ:
the DDIM ODE from ε* (CFG ode_cfg_scale) is stepped to t+δ exactly and evaluated there, as
Alg. 3 lines 7–8 and the official code (BillyXYB/Diverse-Score-Distillation,
threestudio/models/guidance/stable_diffusion_dsd_guidance.py:335-351); see
`OdeTrajectories.eps_exactly_at`. Then
    x̂(t) = √ᾱ(t)·x + √(1−ᾱ(t))·ε_ode,  x̂(t+δ) likewise,                               (Eq. 9)
    grad = w(t)·(ε̂_{g}(x̂(t), t) − ε̂_{g+}(x̂(t+δ), t+δ))                               (Eq. 10)
with both points in ONE prior call. `ode_target=grid` is the cheap variant: ε at the last grid
point at or above t+δ, free from the trajectory cache (the exact target costs one more guided
prior call per row and step). Ablations (Table 3) replace ε_ode: `ode=random` draws fresh noise
every step (ASD-like), `ode=linear` uses ε* itself (a straight line from x to ε*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsd.cameras import snapped_orbit_cameras
from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.ode import OdeTrajectories
from dsd.priors.base import Condition, add_noise, per_row
from dsd.registry import register
from dsd.schedules import annealed_timestep, loss_weight, shifted_timestep, timestep_bounds, uniform_timestep


@dataclass
class DSDConfig(GuidanceConfig):
    name: str = "dsd"
    ode: str = "interp"  # interp (the paper's) | random (ASD-like) | linear (ε*), Table 3
    cfg_scale: float = 7.5  # at x̂(t)
    cfg_scale_plus: float = 1.0  # at x̂(t+δ); the paper's 3D setting
    ode_cfg_scale: float = 7.5  # along the ODE
    ode_steps: int = 10  # N_ddim
    ode_cache: bool = True  # False re-simulates the ODE every step (official behaviour)
    # exact: step the ODE to t+δ and evaluate ε there (Alg. 3, official code; +1 guided prior call
    # per row and step) | grid: ε at the last grid point at or above t+δ (cached, no extra call)
    ode_target: str = "exact"
    # > 0: a row's ODE is conditioned on its camera snapped to this elevation/azimuth grid (degrees)
    # instead of the camera itself, so nearby views share one trajectory (fewer ODEs to simulate: the
    # cost lever of 3D, benchmarks/ode_cache.py --setting 3d). 0: every camera its own ODE (official).
    ode_camera_deg: float = 0.0
    # trajectories kept per seed (least recently used dropped); bounds memory and the checkpoint
    ode_cache_per_seed: int = 128
    t_schedule: str = "sqrt"  # sqrt (official) | linear (Alg. 1) | random (uniform, SDS-like)
    t_min: float = 0.32  # fractions of T (official configs/dsd.yaml)
    t_max: float = 0.98
    delta_ratio: float = 0.1  # δ ≤ delta_ratio·(t − t_min)
    delta_min: int = 1  # t+δ is clamped to [delta_min, T−1]
    init: str = "none"  # none | ode_x0: start the representation at the seed's x0(g_0)
    optimizer: Optional[str] = None  # override trainer.optimizer (adam | sgd)
    lr: Optional[float] = None  # override trainer.lr; with optimizer=sgd, null means N_ddim/N (Alg. 2)


def check_choice(key: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise UserError(f"{key}={value!r} is not accepted; use one of: {', '.join(accepted)}.")


class OdeGuidance(Guidance):
    """Shared by the ε*-following methods: the trajectory cache, init, optimizer override."""

    def __init__(self, cfg, prior) -> None:
        super().__init__(cfg, prior)
        check_choice("guidance.init", cfg.init, ("none", "ode_x0"))
        if cfg.optimizer is not None:
            check_choice("guidance.optimizer", cfg.optimizer, ("adam", "sgd"))
        if cfg.ode_steps < 1:
            raise UserError(f"guidance.ode_steps={cfg.ode_steps} must be >= 1.")
        self.ode_camera_deg = float(getattr(cfg, "ode_camera_deg", 0.0))  # only DSDConfig has it
        if not 0 <= self.ode_camera_deg <= 180:
            raise UserError(f"guidance.ode_camera_deg={cfg.ode_camera_deg} must be in [0, 180] (0: off).")
        max_per_seed = getattr(cfg, "ode_cache_per_seed", 128)  # only DSDConfig has it
        if max_per_seed < 1:
            raise UserError(f"guidance.ode_cache_per_seed={max_per_seed} must be >= 1 (trajectories kept per seed).")
        self.ode = OdeTrajectories(prior, cfg.ode_steps, cfg.ode_cfg_scale, enabled=cfg.ode_cache,
                                   max_per_seed=max_per_seed)

    def ode_condition(self, ctx: GuidanceContext) -> tuple[list, Condition]:
        """(trajectory keys, condition) of the rows' ODEs: their own cameras', or with
        ode_camera_deg > 0 the snapped stand-in cameras' (3D only)."""
        if self.ode_camera_deg == 0 or ctx.cameras is None or ctx.condition_for is None:
            return ctx.trajectory_keys(), ctx.cond
        cond = ctx.condition_for(snapped_orbit_cameras(ctx.cameras, self.ode_camera_deg))
        return ctx.trajectory_keys(cond), cond

    def initial_target(self, ctx: GuidanceContext):
        if self.cfg.init == "none":
            return None
        first = torch.zeros(len(ctx.seeds), dtype=torch.long)
        keys, cond = self.ode_condition(ctx)
        return self.ode.x0_at(keys, ctx.eps_star, cond, first)

    def optimizer_override(self, steps: int):
        if self.cfg.optimizer is None:
            return None
        lr = self.cfg.lr
        if lr is None:
            lr = self.cfg.ode_steps / steps if self.cfg.optimizer == "sgd" else None
        return self.cfg.optimizer, lr

    def state_for(self, seed: int) -> dict:
        return {"trajectories": self.ode.state_for(seed)}

    def load_state(self, state: dict) -> None:
        self.ode.load_state(state.get("trajectories", {}))


@register("guidance", "dsd", DSDConfig)
class DSD(OdeGuidance):
    def __init__(self, cfg: DSDConfig, prior) -> None:
        super().__init__(cfg, prior)
        check_choice("guidance.ode", cfg.ode, ("interp", "random", "linear"))
        check_choice("guidance.ode_target", cfg.ode_target, ("grid", "exact"))
        check_choice("guidance.t_schedule", cfg.t_schedule, ("sqrt", "linear", "random"))
        if not 0 <= cfg.t_min <= cfg.t_max < 1:
            raise UserError(f"guidance.t_min={cfg.t_min}, t_max={cfg.t_max}: need 0 <= t_min <= t_max < 1.")

    def timesteps(self, ctx: GuidanceContext) -> tuple[torch.Tensor, torch.Tensor, int]:
        """t (B,) from the schedule and t+δ (B,) from each sample's own generator."""
        T, cfg = self.prior.num_train_timesteps, self.cfg
        t_min, t_max = timestep_bounds(T, cfg.t_min, cfg.t_max)
        if cfg.t_schedule == "random":
            t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max))
        else:
            t = torch.full(
                (len(ctx.seeds),), annealed_timestep(ctx.step, ctx.steps, T, cfg.t_max, cfg.t_min, cfg.t_schedule)
            )
        t_plus = shifted_timestep(t, t_min, cfg.delta_ratio, ctx.rand_rows(), T, lowest=cfg.delta_min)
        return t, t_plus, t_min

    def grad(self, x, ctx: GuidanceContext):
        t, t_plus, _ = self.timesteps(ctx)
        if self.cfg.ode == "interp" and self.cfg.ode_target == "exact":
            keys, ode_cond = self.ode_condition(ctx)
            eps_ode = self.ode.eps_exactly_at(keys, ctx.eps_star, ode_cond, t_plus).to(x)
        elif self.cfg.ode == "interp":
            keys, ode_cond = self.ode_condition(ctx)
            j = self.ode.grid_index_at_or_above(t_plus)
            eps_ode = self.ode.eps_at(keys, ctx.eps_star, ode_cond, j).to(x)
        elif self.cfg.ode == "random":
            eps_ode = ctx.randn_like_rows(x)
        else:
            eps_ode = ctx.eps_star.to(x)
        a, a_plus = self.prior.alpha(t), self.prior.alpha(t_plus)
        batch = len(x)
        x_hat = torch.cat([add_noise(x, eps_ode, a), add_noise(x, eps_ode, a_plus)])  # Eq. 9
        scales = torch.tensor([self.cfg.cfg_scale] * batch + [self.cfg.cfg_scale_plus] * batch)
        eps_hat = self.prior.eps(
            x_hat, torch.cat([t, t_plus]).to(x.device), ctx.cond.cat([ctx.cond, ctx.cond]), scales
        )
        grad = per_row(loss_weight(a), x) * (eps_hat[:batch] - eps_hat[batch:])  # Eq. 10, w(t) of Alg. 3
        return grad, {"t": float(t.float().mean()), "t_plus": float(t_plus.float().mean())}
