"""One experiment: build the parts from the config, sweep the seeds in batches, write outputs."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dsd import registry
from dsd.cameras import Cameras, eval_cameras, multiview_order, turntable
from dsd.config import Config, resolve_device, validate
from dsd.errors import UserError
from dsd.logging import RunLogger, console, make_progress, report_error
from dsd.metrics.reference import nearest_reference, psnr, reach_threshold_db, summarize_references
from dsd.outputs import (
    RunDirLock,
    atomic_write_bytes,
    remove_orphaned_temporaries,
    save_grid,
    save_json,
    save_png,
    save_result,
    save_video,
    save_views,
    unwritable,
)
from dsd.sharding import SeedShard, shard_seeds, shard_unit
from dsd.trainer import (
    Interrupted,
    SeedState,
    Trainer,
    apply_num_threads,
    finite_or_none,
    has_checkpoint,
    resolve_seed_batch,
)

# trainer keys that do not change a seed's result, so a resumed run may change them
RESUMABLE_TRAINER_KEYS = ("resume", "auto_resume", "checkpoint_every", "log_every", "seed_batch", "max_nonfinite_steps",
                          "memory_budget_gb")  # the budget only picks the seed batch, itself resumable
# written only to the end-of-run outputs: a resume may change them
OUTPUT_ONLY_CAMERA_KEYS = ("video_frames", "video_resolution")


def build_prior(cfg: Config, device: torch.device):
    return registry.build("prior", cfg.prior, device=device)


def reference_set(prior, prompt: str, cameras: Cameras | None = None) -> torch.Tensor | None:
    """The prompt's references in [0, 1] as (K, H, W, 3), or (K, V, H, W, 3) rendered from `cameras`
    in 3D; None when the prior does not know its data (only the analytic prior does)."""
    if cameras is not None:
        if not hasattr(prior, "reference_renders"):
            return None
        return prior.reference_renders(prompt, cameras).permute(0, 1, 3, 4, 2)
    if hasattr(prior, "references"):
        return prior.references(prompt).permute(0, 2, 3, 1)
    return None


def reference_metrics(prior, prompt: str, views: torch.Tensor, cameras: Cameras | None = None) -> dict:
    """nearest_reference, psnr_to_reference and reached (PSNR above the reach threshold, see
    dsd.metrics.reference) when the prior knows its data (analytic).
    views: (H, W, 3) for 2D, or (V, H, W, 3) rendered from `cameras` for 3D."""
    refs = reference_set(prior, prompt, cameras)
    if refs is None:
        return {}
    k, db = nearest_reference(views, refs)
    return {"nearest_reference": k, "psnr_to_reference": db, "reached": db >= reach_threshold_db(refs)}


def reference_summary(prior, prompt: str, entries: list[dict], cameras: Cameras | None = None) -> dict:
    """Set-level exact metrics (distinct references reached, mean/median PSNR) for summary.json."""
    refs = reference_set(prior, prompt, cameras)
    if refs is None or not entries or "nearest_reference" not in entries[0]:
        return {}
    summary = summarize_references(
        [e["nearest_reference"] for e in entries], [e["psnr_to_reference"] for e in entries], reach_threshold_db(refs)
    )
    return {**summary, "num_references": len(refs)}  # K, so coverage (distinct / K) needs no config


def check_prior_fits_representation(prior, cfg: Config) -> None:
    """A prior conditioned on cameras (MVDream, Zero123, analytic multiview/image) needs a 3D
    representation; a multi-view prior sees the evaluation views in whole objects."""
    if prior.needs_cameras and not registry.lookup("representation", cfg.representation.name).is_3d:
        raise UserError(
            f"prior={cfg.prior.name} conditions on cameras, so it needs a 3D representation; "
            f"representation={cfg.representation.name} is 2D. Use representation=gaussians or representation=nerf."
        )
    if prior.views_per_sample > 1:
        # raises when the evaluation views do not make whole objects
        multiview_order(evaluation_cameras(cfg, prior), prior.views_per_sample, cfg.camera.azimuth_range)


def evaluation_cameras(cfg: Config, prior) -> Cameras:
    """The fixed views every 3D seed is rendered from for metrics and grid.png."""
    return eval_cameras(cfg.camera, cfg.camera.eval_views, cfg.camera.resolution or prior.image_shape[-1])


@torch.no_grad()
def write_seed_outputs(state: SeedState, prior, cfg: Config, seed_dir: Path) -> tuple[dict, np.ndarray]:
    """result.npz, final.png, exports (and for 3D the turntable video); returns the summary entry
    and the seed's row of grid.png (V, H, W, 3): one image in 2D, the evaluation views in 3D."""
    rep = state.representation
    cameras = None
    if rep.is_3d:
        cameras = evaluation_cameras(cfg, prior)
        views = rep.render(cameras).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()  # (V, H, W, 3)
        if cfg.camera.video_frames:
            video = turntable(cfg.camera.video_frames, cfg.camera.eval_elevation, cfg.camera.eval_distance,
                              cfg.camera.eval_fovy, cfg.camera.video_resolution, cfg.camera.video_resolution)
            frames = torch.cat([rep.render(video.rows(range(i, min(i + 8, len(video)))))
                                for i in range(0, len(video), 8)])
            save_video(seed_dir / "turntable.mp4", frames.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    else:
        views = rep.final_image(prior)[None]  # (1, H, W, 3)
    image = views[0]  # the contract: the first evaluation view
    save_result(seed_dir / "result.npz", image.numpy())
    save_views(seed_dir / "views.npz", views.numpy())
    save_png(seed_dir / "final.png", image.numpy())
    rep.export(seed_dir, prior)
    metrics = reference_metrics(prior, cfg.prompt, views if cameras is not None else image, cameras)
    metrics.update(input_view_metrics(prior, rep))
    return seed_entry(state, metrics), views.numpy()


@torch.no_grad()
def input_view_metrics(prior, representation) -> dict:
    """For an image-conditioned prior: how well the result reproduces its input view (PSNR of
    the render at the input camera against the input image, both over their backgrounds)."""
    reference = prior.reference_view()
    if reference is None or not representation.is_3d:
        return {}
    render = representation.render(reference.camera)[0].float().cpu()
    target = torch.nn.functional.interpolate(reference.rgb[None].float(), size=tuple(render.shape[-2:]),
                                             mode="bilinear")[0]
    return {"input_view_psnr": psnr(render.permute(1, 2, 0), target.permute(1, 2, 0))}


def sweep_group(cfg: Config) -> str | None:
    """W&B group: the configured one, else the multirun sweep dir (one group per sweep)."""
    if cfg.wandb.group:
        return cfg.wandb.group
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
            return Path(hydra_cfg.sweep.dir).name
    except ValueError:
        pass
    return None


def seed_entry(state: SeedState, metrics: dict) -> dict:
    return {
        "seed": state.seed,
        "steps": state.step,
        "wall_s": round(state.wall_s, 4),
        "prior_rows": state.prior_rows,
        "skipped_steps": state.skipped_steps,
        "diverged": state.diverged,
        "final_loss": finite_or_none(state.losses[-1] if state.losses else None),
        **metrics,
    }


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a difference is named by its config key."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_fingerprint(cfg: Config) -> dict:
    """The config keys a checkpoint must share with the run that resumes it (JSON values)."""
    trainer = {k: v for k, v in asdict(cfg.trainer).items() if k not in RESUMABLE_TRAINER_KEYS}
    tree = {"prompt": cfg.prompt, "guidance": asdict(cfg.guidance), "prior": asdict(cfg.prior),
            "representation": asdict(cfg.representation), "trainer": trainer,
            "camera": {k: v for k, v in asdict(cfg.camera).items() if k not in OUTPUT_ONLY_CAMERA_KEYS}}
    return flatten(json.loads(json.dumps(tree, default=str)))


def requeued_slurm_job() -> bool:
    """Slurm counts the times a job was requeued (preemption, submitit's requeue at the time limit)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


SUBMITIT_JOB_FILE = ".dsd-submitit-job"  # the id of the submitit job that ran in this run dir


def submitit_job_id() -> str | None:
    """The id of the submitit job this process runs in (None outside one). Requeuing keeps it:
    the Slurm job id, or the local controller's pid with hydra/launcher=submitit_local."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # set in every submitit job (submitit/core/job_environment.py)
        return None
    import submitit

    return str(submitit.JobEnvironment().job_id)


def requeued_submitit_job(run_dir: Path) -> bool:
    """Whether this submitit job ran in this run dir before: it was preempted or timed out and
    submitit requeued it (on any cluster, submitit_local too). Records the job id for next time."""
    job_id = submitit_job_id()
    if job_id is None:
        return False
    marker = run_dir / SUBMITIT_JOB_FILE
    before = marker.read_text().strip() if marker.is_file() else None
    if before != job_id:
        atomic_write_bytes(marker, job_id.encode())
    return before == job_id


def resume_mode(cfg: Config, run_dir: Path, seeds: list[int]) -> bool:
    """Whether to load the run dir's checkpoints. trainer.resume=true insists that there is
    something to resume; trainer.auto_resume (and a requeued Slurm or submitit job) takes what exists."""
    if cfg.trainer.resume and not any(has_checkpoint(run_dir, seed) for seed in seeds):
        raise UserError(
            f"trainer.resume=true but {run_dir} holds no seed_<s>/checkpoint.pt for seeds {seeds}: nothing to resume "
            "there. Point hydra.run.dir at the interrupted run's directory, or use trainer.auto_resume=true to "
            "resume whatever exists and start the rest."
        )
    requeued = requeued_submitit_job(run_dir) or requeued_slurm_job()  # first: it records the job id
    return requeued or cfg.trainer.resume or cfg.trainer.auto_resume


def run(cfg: Config, run_dir: Path) -> dict:
    """Optimize one representation per seed; returns the summary written to summary.json. Holds
    the run dir's lock throughout, so a second process cannot write the same run dir."""
    shard = shard_seeds(validate(cfg), cfg.seed_shard, cfg.num_seed_shards, shard_unit(cfg.trainer.seed_batch))
    seeds = shard.seeds
    apply_num_threads(cfg.trainer.num_threads)  # before the prior is built: it computes too
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(run_dir, err) from None
    with RunDirLock(run_dir):
        remove_orphaned_temporaries(run_dir)  # a killed run's half-written files
        resume = resume_mode(cfg, run_dir, seeds)
        return run_locked(cfg, run_dir, shard, device, resume)


def run_locked(cfg: Config, run_dir: Path, shard: SeedShard, device: torch.device, resume: bool) -> dict:
    seeds = shard.seeds
    started = time.perf_counter()

    prior = build_prior(cfg, device)
    check_prior_fits_representation(prior, cfg)
    guidance = registry.build("guidance", cfg.guidance, prior=prior)
    make_rep = lambda: registry.build("representation", cfg.representation, prior=prior, device=device)  # noqa: E731
    logger = RunLogger(
        cfg.wandb.mode,
        run_dir,
        OmegaConf.to_container(OmegaConf.structured(cfg)),
        cfg.wandb.project,
        cfg.wandb.entity,
        sweep_group(cfg),
        name=f"{cfg.guidance.name}-{cfg.prompt[:40]}",
    )
    progress = make_progress()
    total = progress.add_task("all seeds", total=len(seeds) * cfg.trainer.steps, info="")

    def on_step(states: list[SeedState], info: dict) -> None:
        progress.advance(batch_task, len(states))
        progress.advance(total, len(states))
        step = states[0].step
        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps:
            loss = sum(s.losses[-1] for s in states) / len(states)
            progress.update(batch_task, info=f"loss {loss:.4g}  t {info.get('t', float('nan')):.0f}")
            logger.log(
                {
                    "step": step,
                    **{f"seed_{s.seed}/loss": s.losses[-1] for s in states},
                    **{f"guidance/{k}": v for k, v in info.items()},
                }
            )

    trainer = Trainer(prior, guidance, cfg.prompt, cfg.trainer, run_dir, make_rep, device, on_step, cfg.camera,
                      fingerprint=run_fingerprint(cfg))
    entries, images, is_3d = [], [], False
    try:
        with progress:
            seed_batch = resolve_seed_batch(cfg, device)
            for first in range(0, len(seeds), seed_batch):
                batch_seeds = seeds[first : first + seed_batch]
                states = [trainer.load_or_new(seed, resume) for seed in batch_seeds]
                batch_task = progress.add_task(f"seeds {batch_seeds}", total=cfg.trainer.steps * len(states), info="")
                done = sum(s.step for s in states)
                progress.advance(batch_task, done)
                progress.advance(total, done)
                trainer.optimize(states)
                is_3d = states[0].representation.is_3d
                for state in states:
                    entry, views = write_seed_outputs(state, prior, cfg, run_dir / f"seed_{state.seed}")
                    entries.append(entry)
                    images.append(views)
                    console.print(seed_line(entry), markup=False)
                progress.remove_task(batch_task)
                logger.log_images(
                    {
                        f"seed_{e['seed']}/final": np.concatenate(list(im), axis=1)
                        for e, im in zip(entries[-len(states) :], images[-len(states) :])
                    }
                )
                logger.log_videos({f"seed_{s.seed}/turntable": run_dir / f"seed_{s.seed}" / "turntable.mp4" for s in states})
    except KeyboardInterrupt as err:
        raise report_interrupt(err, trainer, run_dir) from None
    return write_summary(cfg, run_dir, prior, logger, entries, images, is_3d, started, shard)


def seed_line(entry: dict) -> str:
    reached = f", ref {entry['nearest_reference']} at {entry['psnr_to_reference']:.1f} dB" if "nearest_reference" in entry else ""
    diverged = f" (diverged: {entry['skipped_steps']} non-finite steps)" if entry["diverged"] else ""
    return f"seed {entry['seed']}: {entry['steps']} steps{reached}{diverged}"


def report_interrupt(err: KeyboardInterrupt, trainer: Trainer, run_dir: Path) -> Interrupted:
    """Tell the user what is on disk and how to continue; returns the Interrupted to raise."""
    import signal

    if not isinstance(err, Interrupted):  # a Ctrl-C outside the training loop, or a second one
        err = Interrupted(signal.SIGINT, trainer.interrupted_message(signal.SIGINT))
    hint = f" Continue with trainer.resume=true hydra.run.dir={run_dir}" if trainer.saved else ""
    report_error(err.message + hint)
    err.reported = True
    return err


def write_summary(cfg: Config, run_dir: Path, prior, logger, entries: list[dict], images: list, is_3d: bool,
                  started: float, shard: SeedShard) -> dict:
    labels = [
        f"seed {e['seed']}" + (f"  ref {e['nearest_reference']}" if "nearest_reference" in e else "")
        for e in entries
    ]
    grid = save_grid(run_dir / "grid.png", images, labels)
    total_steps = sum(e["steps"] for e in entries)
    summary = {
        "prompt": cfg.prompt,
        "guidance": cfg.guidance.name,
        "prior": cfg.prior.name,
        "representation": cfg.representation.name,
        "wall_s": round(time.perf_counter() - started, 3),
        "prior_rows_per_step": sum(e["prior_rows"] for e in entries) / total_steps,
        "seeds": entries,
        "seed_shard": shard.summary(),  # this run's part of the whole seed list (dsd-eval merges shards)
        "config": {"guidance": asdict(cfg.guidance), "trainer": asdict(cfg.trainer)},
    }
    summary.update(reference_summary(prior, cfg.prompt, entries, evaluation_cameras(cfg, prior) if is_3d else None))
    if entries and "input_view_psnr" in entries[0]:
        summary["median_input_view_psnr"] = float(np.median([e["input_view_psnr"] for e in entries]))
    save_json(run_dir / "summary.json", summary)
    logger.log_images({"grid": np.asarray(grid, dtype=np.float32) / 255.0})
    logger.log_summary(summary)
    logger.finish()
    console.print(f"[green]done[/green] {len(entries)} seeds in {summary['wall_s']:.1f}s -> {run_dir}")
    if "distinct_references" in summary:
        console.print(
            f"distinct references reached {summary['distinct_references']}/{len(entries)} "
            f"(PSNR >= {summary['reach_threshold_db']:.1f} dB), median PSNR "
            f"{summary['median_psnr_to_reference']:.2f} dB, mean {summary['mean_psnr_to_reference']:.2f} dB"
        )
    return summary
