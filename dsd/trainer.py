"""The optimization loop for one batch of seeds (reads like Alg. 1 / Alg. 3 of the paper).

Each seed owns its representation, optimizer and generators; a batch only stacks their renders
so that the prior sees all rows in one call. A seed's result therefore does not depend on which
other seeds share its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dsd.cameras import Cameras, eval_cameras, multiview_order, sample_cameras, sample_multiview_cameras
from dsd.config import CameraConfig, TrainerConfig
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.outputs import save_torch
from dsd.priors.base import Prior, per_row
from dsd.representations.base import Representation
from dsd.seeding import eps_star_rows, prior_eps_star, step_generator


def view_count(cameras: Cameras | None) -> int:
    """Rows a seed contributes to a step: its cameras' views in 3D, one image in 2D."""
    return 1 if cameras is None else len(cameras)


@dataclass
class SeedState:
    seed: int
    representation: Representation
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # per-step randomness of this seed
    eps_star: Tensor  # (C, H, W) fixed noise of this seed; (F, C, H, W) for an F-view prior
    step: int = 0
    initialized: bool = False  # guidance's initial target applied
    prior_rows: float = 0.0  # prior rows attributed to this seed (its share of each batched call)
    wall_s: float = 0.0
    skipped_steps: int = 0  # steps skipped by the NaN guard
    losses: list[float] = field(default_factory=list)


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        # betas/eps of the official DSD config (configs/dsd.yaml)
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-15)
    return torch.optim.SGD(params, lr=lr)


class Trainer:
    def __init__(
        self,
        prior: Prior,
        guidance: Guidance,
        prompt: str,
        cfg: TrainerConfig,
        run_dir: Path,
        make_representation: Callable[[], Representation],
        device: torch.device,
        on_step: Callable[[list[SeedState], dict], None] | None = None,
        camera_cfg: CameraConfig | None = None,
    ) -> None:
        self.prior, self.guidance, self.prompt, self.cfg = prior, guidance, prompt, cfg
        self.run_dir, self.make_representation, self.device = Path(run_dir), make_representation, device
        self.on_step = on_step
        self.camera_cfg = camera_cfg or CameraConfig()
        override = guidance.optimizer_override(cfg.steps)
        self.optimizer_name, self.lr = cfg.optimizer, cfg.lr
        if override is not None:
            self.optimizer_name = override[0]
            self.lr = override[1] if override[1] is not None else cfg.lr

    # ---- state, checkpoints -------------------------------------------------------------
    def checkpoint_path(self, seed: int) -> Path:
        return self.run_dir / f"seed_{seed}" / "checkpoint.pt"

    def new_state(self, seed: int) -> SeedState:
        representation = self.make_representation().to(self.device)
        return SeedState(
            seed=seed,
            representation=representation,
            optimizer=self.make_optimizer(representation),
            generator=step_generator(seed),
            eps_star=prior_eps_star(seed, self.prior).to(self.device),
        )

    def make_optimizer(self, representation: Representation) -> torch.optim.Optimizer:
        """The representation's optimizer (its own parameter groups and lrs), with the guidance's
        Adam betas when it asks for others (e.g. ASD's and CFD's (0, 0.99))."""
        optimizer = representation.make_optimizer(self.optimizer_name, self.lr)
        betas = self.guidance.adam_betas()
        if betas is not None and self.optimizer_name == "adam":
            for group in optimizer.param_groups:
                group["betas"] = tuple(betas)
        return optimizer

    def save(self, state: SeedState) -> None:
        save_torch(
            self.checkpoint_path(state.seed),
            {
                "seed": state.seed,
                "step": state.step,
                "initialized": state.initialized,
                "representation": state.representation.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "generator": state.generator.get_state(),
                "prior_rows": state.prior_rows,
                "wall_s": state.wall_s,
                "skipped_steps": state.skipped_steps,
                "losses": state.losses,
                "guidance": self.guidance.state_for(state.seed),
            },
        )

    def load_or_new(self, seed: int, resume: bool) -> SeedState:
        state = self.new_state(seed)
        path = self.checkpoint_path(seed)
        if not (resume and path.exists()):
            return state
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        state.representation.load_state_dict(ckpt["representation"])
        # rebuilt: loading may replace parameters (a densified representation changes size)
        state.optimizer = self.make_optimizer(state.representation)
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.generator.set_state(ckpt["generator"])
        for key in ("step", "initialized", "prior_rows", "wall_s", "skipped_steps", "losses"):
            setattr(state, key, ckpt[key])
        self.guidance.load_state(ckpt["guidance"])
        return state

    # ---- the loop ---------------------------------------------------------------------------
    def render_size(self, state: SeedState, step: int) -> int:
        """Render resolution: the representation's coarse-to-fine schedule if it has one, else
        camera.resolution, else the prior's image size."""
        schedule = getattr(state.representation, "resolution_at", None)
        scheduled = schedule(step) if schedule is not None else None
        return int(scheduled or self.camera_cfg.resolution or self.prior.image_shape[-1])

    def training_cameras(self, states: list[SeedState], step: int) -> list[Cameras | None]:
        """Each seed's cameras for this step, from its own generator (None for 2D)."""
        if not states[0].representation.is_3d:
            return [None] * len(states)
        if self.prior.views_per_sample > 1:  # one object of F evenly spaced views per seed and step
            f = self.prior.views_per_sample
            return [sample_multiview_cameras(s.generator, f, self.camera_cfg, self.render_size(s, step)) for s in states]
        views = self.camera_cfg.views_per_step
        return [sample_cameras(s.generator, views, self.camera_cfg, self.render_size(s, step)) for s in states]

    def context(self, states: list[SeedState], step: int, cameras: list[Cameras | None]) -> GuidanceContext:
        """Rows of the step: every view of every seed, each with its seed's ε* and generator."""
        rows = [s for s, c in zip(states, cameras) for _ in range(view_count(c))]
        stacked = None if cameras[0] is None else Cameras.cat(cameras)
        return GuidanceContext(
            prior=self.prior,
            cond=self.prior.condition(self.prompt, batch=len(rows), cameras=stacked),
            seeds=[s.seed for s in rows],
            eps_star=torch.cat([eps_star_rows(s.eps_star, view_count(c), self.prior.views_per_sample) for s, c in zip(states, cameras)]),
            generators=[s.generator for s in rows],
            step=step,
            steps=self.cfg.steps,
            cameras=stacked,
            representations=[s.representation for s in rows],
            condition_for=None if stacked is None else (
                lambda cams: self.prior.condition(self.prompt, batch=len(cams), cameras=cams)),
        )

    def initialize(self, states: list[SeedState]) -> None:
        """Apply the guidance's initial target (e.g. DSD's x0(g_0)); 3D representations fit their
        renders from the evaluation views to it."""
        fresh = [s for s in states if not s.initialized]
        if not fresh:
            return
        if fresh[0].representation.is_3d:
            size = self.render_size(fresh[0], 0)
            views = eval_cameras(self.camera_cfg, self.camera_cfg.eval_views, size)
            if self.prior.views_per_sample > 1:  # whole objects of F evenly spaced views
                views = views.rows(multiview_order(views, self.prior.views_per_sample, self.camera_cfg.azimuth_range))
            cameras = [views for _ in fresh]
        else:
            cameras = [None] * len(fresh)
        target = self.guidance.initial_target(self.context(fresh, 0, cameras))
        first = 0
        for state, cams in zip(fresh, cameras):
            views = view_count(cams)
            if target is not None:
                state.representation.initialize_to(target[first : first + views], self.prior, cams)
            first += views
            state.initialized = True

    def step(self, states: list[SeedState], step: int) -> dict:
        """One optimization step for seeds that are all at `step`."""
        start, rows_before = time.perf_counter(), self.prior.rows_evaluated
        cameras = self.training_cameras(states, step)
        renders = torch.cat([s.representation.render(c) for s, c in zip(states, cameras)])  # (B, C, H, W)
        x = renders if states[0].representation.outputs_prior_space else self.prior.encode(renders)
        grad, info = self.guidance.grad(x.detach(), self.context(states, step, cameras))
        finite = torch.isfinite(grad).flatten(1).all(1)  # NaN guard: such a row adds nothing
        grad = torch.where(finite.reshape(-1, 1, 1, 1), grad, torch.zeros_like(grad))
        # d/dx of Σ x·grad/V is grad/V: each seed's parameters get the mean of its own views'
        # gradients, as the official loss 0.5·‖x − (x − grad)‖²/batch_size (BillyXYB/Diverse-Score-
        # Distillation, threestudio/models/guidance/stable_diffusion_dsd_guidance.py:447).
        views = torch.tensor([float(view_count(c)) for c in cameras for _ in range(view_count(c))], device=x.device)
        loss = (x * grad.detach() / per_row(views, x)).sum()
        for state in states:
            loss = loss + sum(state.representation.regularizers().values(), torch.zeros(()))
            loss = loss + self.reference_view_loss(state)
            state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        elapsed = time.perf_counter() - start
        rows = (self.prior.rows_evaluated - rows_before) / len(states)
        first = 0
        for state, cams in zip(states, cameras):
            views = view_count(cams)
            own = slice(first, first + views)
            first += views
            if bool(finite[own].all()):
                state.optimizer.step()
                state.representation.after_step(step, state.optimizer)
            else:
                state.skipped_steps += 1
            state.losses.append(0.5 * float((grad[own] ** 2).sum()) / views)  # official loss_dsd value
            state.step += 1
            state.prior_rows += rows
            state.wall_s += elapsed / len(states)
        return info

    def reference_view_loss(self, state: SeedState) -> Tensor:
        """λ_rgb·MSE + λ_mask·MSE of the render at the prior's input camera against the input view
        (image-to-3D; threestudio's zero123 system computes the same two terms). Outside the mask
        the RGB target is the render itself (detached): there the mask term pulls the opacity to 0,
        whatever the representation's background, so it also works with a learned background."""
        reference = self.prior.reference_view()
        cfg = self.cfg
        if reference is None or not state.representation.is_3d or (cfg.lambda_rgb == 0 and cfg.lambda_mask == 0):
            return torch.zeros((), device=self.device)
        camera = reference.camera
        out = state.representation.render(camera, with_alpha=True)[0]  # (4, H, W)
        size = tuple(out.shape[-2:])
        rgb = torch.nn.functional.interpolate(reference.rgb[None].to(out), size=size, mode="bilinear")[0]
        mask = torch.nn.functional.interpolate(reference.mask[None].to(out), size=size, mode="bilinear")[0]
        target = rgb * mask + out[:3].detach() * (1 - mask)
        return cfg.lambda_rgb * torch.nn.functional.mse_loss(out[:3], target) + cfg.lambda_mask * (
            torch.nn.functional.mse_loss(out[3:], mask)
        )

    def optimize(self, states: list[SeedState]) -> None:
        """Run every state to cfg.steps; saves checkpoints on schedule and on Ctrl-C/crash."""
        try:
            self.initialize(states)
            while pending := [s for s in states if s.step < self.cfg.steps]:
                step = min(s.step for s in pending)
                active = [s for s in pending if s.step == step]
                info = self.step(active, step)
                if self.on_step is not None:
                    self.on_step(active, info)
                every = self.cfg.checkpoint_every
                if every and (step + 1) % every == 0 and step + 1 < self.cfg.steps:
                    for state in active:
                        self.save(state)
        except BaseException:
            for state in states:  # keep what was done; resume with trainer.resume=true
                if state.step > 0:
                    self.save(state)
            raise
        for state in states:
            self.save(state)
