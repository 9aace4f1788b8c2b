"""The optimization loop for one batch of seeds (reads like Alg. 1 / Alg. 3 of the paper).

Each seed owns its representation, optimizer and generators; a batch only stacks their renders
so that the prior sees all rows in one call. A seed's result therefore does not depend on which
other seeds share its batch.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dsd.cameras import Cameras, eval_cameras, multiview_order, sample_cameras, sample_multiview_cameras
from dsd.config import CameraConfig, Config, TrainerConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.logging import console
from dsd.outputs import save_torch
from dsd.priors.base import Prior, per_row
from dsd.representations.base import Representation
from dsd.seeding import eps_star_rows, prior_eps_star, seeded_global_rng, step_generator


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
    nonfinite_in_a_row: int = 0  # consecutive skipped steps; trainer.max_nonfinite_steps stops the seed
    diverged: bool = False  # stopped for too many non-finite steps in a row
    losses: list[float] = field(default_factory=list)  # NaN/inf where the step's gradient was not finite
    in_step: bool = False  # a step has started (drawn randomness) but not finished: not a resumable state
    saved_step: int | None = None  # step of the checkpoint on disk written or read by this process


# Signals that ask a run to stop: Ctrl-C, SIGTERM (Slurm before preemption and at the time limit),
# SIGUSR1 and SIGUSR2 (Slurm's --signal; submitit's default preemption signal is USR2,
# submitit/core/job_environment.py:35).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after checkpointing at a step boundary. A KeyboardInterrupt, so
    whatever handles Ctrl-C handles it; `exit_code` is the shell's 128 + signal number, nonzero so
    that Slurm/submitit treat the job as not finished."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message, self.exit_code = signum, message, 128 + int(signum)
        self.reported = False  # set once the message was shown to the user


class StopRequests:
    """While active (main thread only: Python delivers signals there), a stop signal is recorded
    instead of raising, so the step in progress finishes and the loop stops at the next step
    boundary. A second Ctrl-C raises KeyboardInterrupt at once (the step in progress is then
    discarded: its seeds keep their last checkpoint)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def pass_on(self) -> None:
        """After checkpointing: let the handler that was installed before ours act (submitit's
        requeues the job and exits); Ctrl-C's default handler is left out, we raise ourselves."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


# trainer.seed_batch's default, for code that meets a null there (dsd.sharding); one value for every
# representation (benchmarks/cpu_defaults.py: batching never slowed a representation down)
DEFAULT_SEED_BATCH: int = TrainerConfig.seed_batch


def apply_num_threads(num_threads: int) -> None:
    """trainer.num_threads > 0: torch's intra-op threads for this process (0: leave torch's default).
    Small tensors on a busy machine run far faster on one thread (benchmarks/cpu_defaults.py)."""
    if num_threads < 0:
        raise UserError(f"trainer.num_threads={num_threads} is not accepted; use 0 (torch's default) or a "
                        "positive thread count.")
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def memory_budget_bytes(budget_gb: float | None, device: torch.device) -> float | None:
    """trainer.memory_budget_gb in bytes; null: half the machine's memory on CPU, no cap on CUDA
    (the per-seed estimates are CPU measurements); 0: no cap."""
    if budget_gb is None:
        return 0.5 * machine_memory_bytes() if device.type == "cpu" else None
    if budget_gb < 0:
        raise UserError(f"trainer.memory_budget_gb={budget_gb} is not accepted; use a size in GiB > 0, 0 (no cap) "
                        "or null (half the memory on CPU).")
    return budget_gb * 2**30 if budget_gb > 0 else None


def machine_memory_bytes() -> float:
    """Physical memory, or the cgroup's limit where lower (a Slurm job's --mem, a container)."""
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, float(text))
    return total


def batch_step_bytes(cfg: Config) -> Callable[[int], float] | None:
    """seeds -> the representation's estimate of a training step's peak memory at the largest
    render size of the run (None: the representation gives no estimate)."""
    from dsd import registry

    estimate = getattr(registry.lookup("representation", cfg.representation.name), "step_memory_bytes", None)
    schedule = getattr(cfg.representation, "resolutions", None) or []
    size = max(schedule, default=None) or cfg.camera.resolution or getattr(cfg.prior, "image_size", None)
    if estimate is None or size is None:
        return None
    # views per seed and step: a multi-view prior's F (MVDream; analytic mode=multiview), else the cameras'
    multiview = getattr(cfg.prior, "num_views", None) and getattr(cfg.prior, "mode", "multiview") == "multiview"
    views = cfg.prior.num_views if multiview else cfg.camera.views_per_step
    return lambda seeds: float(estimate(cfg.representation, int(size), int(views), seeds))


def resolve_seed_batch(cfg: Config, device: torch.device) -> int:
    """trainer.seed_batch, lowered (with a note) to the most seeds whose estimated step memory
    fits trainer.memory_budget_gb; at least one seed."""
    chosen = cfg.trainer.seed_batch or DEFAULT_SEED_BATCH
    budget = memory_budget_bytes(cfg.trainer.memory_budget_gb, device)
    estimate = batch_step_bytes(cfg)
    if budget is None or estimate is None or estimate(chosen) <= budget:
        return chosen
    fitting = max([n for n in range(1, chosen) if estimate(n) <= budget], default=1)
    shared = getattr(cfg.guidance, "particles", None) == "shared"
    console.print(
        f"note: trainer.seed_batch {chosen} -> {fitting}: a {cfg.representation.name} step of {chosen} seeds needs "
        f"about {estimate(chosen) / 2**30:.1f} GiB and trainer.memory_budget_gb allows {budget / 2**30:.1f} GiB"
        + (" (guidance.particles=shared: fewer seeds share each φ)" if shared else "")
        + ("; even one seed exceeds it" if estimate(1) > budget else "") + ".", markup=False, soft_wrap=True)
    return fitting


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
        fingerprint: dict | None = None,
    ) -> None:
        self.prior, self.guidance, self.prompt, self.cfg = prior, guidance, prompt, cfg
        apply_num_threads(cfg.num_threads)  # once per run, before any step
        # what a checkpoint must have been written with to be resumed by this run (see run.py)
        self.fingerprint = fingerprint
        self.saved: dict[int, int] = {}  # seed -> step of its checkpoint on disk (written or resumed)
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
        return checkpoint_files(self.run_dir, seed)[0]

    def previous_checkpoint_path(self, seed: int) -> Path:
        return checkpoint_files(self.run_dir, seed)[1]

    def has_checkpoint(self, seed: int) -> bool:
        return has_checkpoint(self.run_dir, seed)

    def new_state(self, seed: int) -> SeedState:
        with seeded_global_rng(seed, torch.device(self.device)):
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
        """checkpoint.pt of a seed at a step boundary; the one it replaces becomes checkpoint.prev.pt."""
        assert not state.in_step, "a seed in the middle of a step is not a resumable state"
        path = self.checkpoint_path(state.seed)
        save_torch(
            path,
            {
                "seed": state.seed,
                "config": self.fingerprint,
                "step": state.step,
                "initialized": state.initialized,
                "representation": state.representation.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "generator": state.generator.get_state(),
                "prior_rows": state.prior_rows,
                "wall_s": state.wall_s,
                "skipped_steps": state.skipped_steps,
                "nonfinite_in_a_row": state.nonfinite_in_a_row,
                "diverged": state.diverged,
                "losses": state.losses,
                "guidance": self.guidance.state_for(state.seed),
            },
            previous=self.previous_checkpoint_path(state.seed),
        )
        state.saved_step = self.saved[state.seed] = state.step

    def load_or_new(self, seed: int, resume: bool) -> SeedState:
        """The seed's state from its checkpoint when resuming (checkpoint.pt, else the previous
        one when checkpoint.pt is damaged, with a warning), else a fresh one."""
        state = self.new_state(seed)
        if not (resume and self.has_checkpoint(seed)):
            return state
        path, previous = self.checkpoint_path(seed), self.previous_checkpoint_path(seed)
        try:
            self.restore(state, path)
        except (UnreadableCheckpoint, FileNotFoundError) as err:
            if not previous.exists():
                raise UserError(f"{err} No previous checkpoint ({previous.name}) to fall back to; "
                                "delete the seed's directory to start it again.") from None
            state = self.new_state(seed)
            try:
                self.restore(state, previous)
            except UnreadableCheckpoint as err_previous:
                raise UserError(f"{err} The previous one is unusable too: {err_previous}") from None
            console.print(f"[yellow]warning:[/yellow] {err} Resuming seed {seed} from {previous} "
                          f"(step {state.step}) instead.", markup=True)
        return state

    def restore(self, state: SeedState, path: Path) -> None:
        """Load `path` into the fresh `state`; raises UnreadableCheckpoint for a damaged file and
        UserError for a checkpoint of another run config."""
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
            if not isinstance(ckpt, dict) or "representation" not in ckpt:
                raise ValueError("not a dsd checkpoint")
        except FileNotFoundError:
            raise
        except Exception as err:  # torch.load raises many types for a truncated or foreign file
            raise UnreadableCheckpoint(f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err}).") from None
        self.check_same_run(ckpt, path, state.seed)
        try:
            state.representation.load_state_dict(ckpt["representation"])
            # rebuilt: loading may replace parameters (a densified representation changes size)
            state.optimizer = self.make_optimizer(state.representation)
            state.optimizer.load_state_dict(ckpt["optimizer"])
            state.generator.set_state(ckpt["generator"])
            for key in ("step", "initialized", "prior_rows", "wall_s", "skipped_steps", "losses"):
                setattr(state, key, ckpt[key])
            state.nonfinite_in_a_row = ckpt.get("nonfinite_in_a_row", 0)
            state.diverged = ckpt.get("diverged", False)
            self.guidance.load_state(ckpt["guidance"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise UserError(
                f"{path} does not fit this run ({type(err).__name__}: {str(err).splitlines()[0]}); it was written "
                "by another configuration or version. Resume with the config it was written with, or use a new "
                "hydra.run.dir."
            ) from None
        state.saved_step = self.saved[state.seed] = state.step

    def check_same_run(self, ckpt: dict, path: Path, seed: int) -> None:
        """Refuse a checkpoint written by another seed or run config (prompt, guidance, prior, ...)."""
        if ckpt.get("seed") != seed:
            raise UserError(f"{path} belongs to seed {ckpt.get('seed')!r}, not seed {seed}; the run dir was altered.")
        theirs = ckpt.get("config")
        if theirs is None or self.fingerprint is None:  # written before fingerprints existed
            return
        differ = sorted(key for key in set(theirs) | set(self.fingerprint) if theirs.get(key) != self.fingerprint.get(key))
        if differ:
            shown = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, this run {self.fingerprint.get(k)!r}" for k in differ[:3])
            raise UserError(
                f"{path} was written by another run config ({shown}). Resume with the same settings, "
                "or start a new run in another hydra.run.dir."
            )

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
        """One optimization step for seeds that are all at `step`. Until it returns, the seeds are
        marked in_step: an exception in between leaves them unfit to checkpoint."""
        for state in states:
            state.in_step = True
        start, rows_before = time.perf_counter(), self.prior.rows_evaluated
        cameras = self.training_cameras(states, step)
        renders = torch.cat([s.representation.render(c) for s, c in zip(states, cameras)])  # (B, C, H, W)
        x = renders if states[0].representation.outputs_prior_space else self.prior.encode(renders)
        grad, info = self.guidance.grad(x.detach(), self.context(states, step, cameras))
        finite = torch.isfinite(grad).flatten(1).all(1)  # NaN guard: such a row adds nothing
        raw_grad = grad.detach()  # for the reported loss: a skipped step reports its NaN/inf, not 0
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
                state.nonfinite_in_a_row = 0
            else:
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
            state.losses.append(0.5 * float((raw_grad[own] ** 2).sum()) / views)  # official loss_dsd value
            state.step += 1
            state.prior_rows += rows
            state.wall_s += elapsed / len(states)
        for state in states:
            state.in_step = False
        return info

    def stop_diverged(self, states: list[SeedState]) -> None:
        """Stop a seed after trainer.max_nonfinite_steps skipped steps in a row (0: never)."""
        limit = self.cfg.max_nonfinite_steps
        for state in states:
            if limit and not state.diverged and state.nonfinite_in_a_row >= limit:
                state.diverged = True
                console.print(
                    f"[red]seed {state.seed} diverged[/red]: {state.nonfinite_in_a_row} non-finite steps in a row "
                    f"at step {state.step} (trainer.max_nonfinite_steps={limit}); stopped it, the other seeds go on. "
                    "Lower trainer.lr.", markup=True
                )

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
        """Run every state to cfg.steps (or until it diverges); saves checkpoints on schedule, at the
        end, and on a crash or a stop signal (Ctrl-C, SIGTERM, SIGUSR1/2): a signal lets the step in
        progress finish, checkpoints every seed at that step boundary and raises Interrupted."""
        with StopRequests() as stop:
            try:
                self.initialize(states)
                while stop.signum is None and (pending := self.pending(states)):
                    step = min(s.step for s in pending)
                    active = [s for s in pending if s.step == step]
                    info = self.step(active, step)
                    if self.on_step is not None:
                        self.on_step(active, info)
                    self.stop_diverged(active)
                    every = self.cfg.checkpoint_every
                    if every and (step + 1) % every == 0 and step + 1 < self.cfg.steps:
                        for state in active:
                            self.save(state)
                if stop.signum is not None:
                    self.save_resumable(states)
                    stop.pass_on()
                    raise Interrupted(stop.signum, self.interrupted_message(stop.signum, states))
            except Interrupted:
                raise
            except BaseException:
                if stop.signum is None:  # a crash; after a second Ctrl-C the user wants out now
                    self.save_resumable(states)  # keep what was done; resume with trainer.resume=true
                raise
            self.save_resumable(states)

    def pending(self, states: list[SeedState]) -> list[SeedState]:
        return [s for s in states if s.step < self.cfg.steps and not s.diverged]

    def save_resumable(self, states: list[SeedState]) -> None:
        """Checkpoint the seeds that are at a step boundary and moved since their last checkpoint.
        A seed caught in the middle of a step keeps its last checkpoint (its random streams have
        moved on, so saving it would break a bit-exact resume)."""
        for state in states:
            if state.step > 0 and not state.in_step and state.saved_step != state.step:
                self.save(state)

    def interrupted_message(self, signum: int, states: list[SeedState] | None = None) -> str:
        """What is on disk, in the user's words (true by construction: recorded at each save/load)."""
        name = signal.Signals(signum).name
        if not self.saved:
            return f"interrupted by {name}: no checkpoint was saved (no step had finished)."
        by_step: dict[int, list[int]] = {}
        for seed, step in sorted(self.saved.items()):
            by_step.setdefault(step, []).append(seed)
        where = "; ".join(f"at step {step} for seeds {seeds}" for step, seeds in sorted(by_step.items()))
        return f"interrupted by {name}: checkpoints saved {where}."


def checkpoint_files(run_dir: Path, seed: int) -> tuple[Path, Path]:
    """A seed's checkpoint and the one before it (the fallback for a damaged checkpoint.pt)."""
    seed_dir = Path(run_dir) / f"seed_{seed}"
    return seed_dir / "checkpoint.pt", seed_dir / "checkpoint.prev.pt"


def has_checkpoint(run_dir: Path, seed: int) -> bool:
    return any(path.exists() for path in checkpoint_files(run_dir, seed))


class UnreadableCheckpoint(Exception):
    """A checkpoint file that torch cannot load (truncated, garbage); the message names the file."""


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite loss is reported as null."""
    return value if value is not None and math.isfinite(value) else None
