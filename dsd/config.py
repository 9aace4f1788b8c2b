"""Typed structured configs. Hydra composes dsd/conf/ on top of these, so a wrong type or an unknown
key fails at start-up with the key's full name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from dsd.errors import UserError


@dataclass
class GuidanceConfig:
    name: str = MISSING


@dataclass
class PriorConfig:
    name: str = MISSING


@dataclass
class RepresentationConfig:
    name: str = MISSING


@dataclass
class TrainerConfig:
    steps: int = 400
    # seeds optimized together; prior rows of all seeds go in one call. One default for every
    # representation: on CPU a batch of 4 made a 2D seed-step 2.4x faster and 3D Gaussians/NeRF
    # neither faster nor slower (1.01x, 0.98x; benchmarks/cpu_defaults.py). Lowered to fit
    # memory_budget_gb (dsd.trainer.resolve_seed_batch).
    seed_batch: int = 4
    # torch intra-op threads for the run (torch.set_num_threads in the Trainer); 0: torch's default
    # (one per core). 1: small-tensor steps were 6x (demo) and 16x (demo2d) faster than at 2 threads
    # on a loaded 2-core machine (benchmarks/cpu_defaults.py, docs/benchmarks.md).
    num_threads: int = 1
    # GiB a seed batch's training step may use, by the representation's estimate (NeRF:
    # dsd.representations.nerf.step_memory_bytes); seed_batch is lowered to fit, with a note.
    # null: half the machine's (or cgroup's) memory on CPU, no cap on CUDA; 0: no cap.
    memory_budget_gb: Optional[float] = None
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.03
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: only on interrupt)
    log_every: int = 10
    resume: bool = False  # continue from seed_<s>/checkpoint.pt in the run dir
    # resume the seeds that have a checkpoint in the run dir and start the others, without the error
    # trainer.resume=true gives for a run dir with nothing to resume: what a job that Slurm may
    # requeue wants (a requeued Slurm job, SLURM_RESTART_COUNT > 0, does this anyway)
    auto_resume: bool = False
    # stop a seed after this many non-finite (skipped) steps in a row; it is reported as diverged in
    # summary.json while the other seeds go on (0: never stop)
    max_nonfinite_steps: int = 20
    # Reference-view loss of image-to-3D (priors with an input view: zero123, analytic mode=image),
    # relative to the guidance term (weight 1): λ_rgb·MSE(render, input over background) +
    # λ_mask·MSE(alpha, mask) at the input camera, every step. threestudio's configs/zero123.yaml
    # (@28d9d80, :128-130) has lambda_sds 0.1, lambda_rgb 500, lambda_mask 50, i.e. ratios 5000 and
    # 500 (experiment=image_to_3d); 0 here because text-to-3D has no input view.
    lambda_rgb: float = 0.0
    lambda_mask: float = 0.0


@dataclass
class CameraConfig:
    """Random training cameras around the object (3D representations only) and evaluation views.

    Sampling is threestudio's RandomCameraIterableDataset (threestudio/data/uncond.py; see
    dsd.cameras.sample_cameras). Ranges follow threestudio's dreamfusion-sd.yaml:11-13 and DSD's
    configs/dsd.yaml:14-16 (distance 1.5..2, fovy 40..70°, elevation −10..45°); the perturbations,
    the sphere-uniform elevation and the stratified azimuth are uncond.py's defaults.

    `quantize_deg` > 0 snaps sampled elevation/azimuth to a grid, so a seed sees finitely many view
    conditions and its ODE trajectories can be cached per view (see dsd.ode). It does not touch the
    perturbations: a prior that conditions on the orbit angles only (Stable Diffusion's view
    prompts) still repeats its conditions, but the analytic prior in 3D conditions on the whole
    camera, so with perturbations every step is a new condition there. Set the three perturbations
    to 0 to keep its cache effective, as experiment=demo does.
    """

    views_per_step: int = 1  # cameras per seed per step (threestudio batch_size); a multi-view prior uses its F
    resolution: Optional[int] = None  # render size; None: the prior's image size
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: list[float] = field(default_factory=lambda: [1.5, 2.0])
    # true: distance_range is relative, distance = d / tan(fovy/2), so the object fills the same
    # share of the image at any fov (MVDream-threestudio random_multiview.py:103-105)
    relative_distance: bool = False
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    camera_perturb: float = 0.1  # position + U[−p, p]³ (threestudio uncond.py:47)
    center_perturb: float = 0.2  # look-at centre ~ N(0, σ²)³ (uncond.py:48)
    up_perturb: float = 0.02  # up = +z + N(0, σ²)³ (uncond.py:49)
    elevation_sphere_prob: float = 0.5  # per batch: sin(elevation) uniform, else degrees uniform (uncond.py:147)
    batch_uniform_azimuth: bool = True  # a batch's azimuths stratify the range (uncond.py:56)
    quantize_deg: float = 0.0
    eval_views: int = 4  # evaluation views (turntable azimuths), used for metrics and grid.png
    eval_elevation: float = 15.0
    eval_distance: float = 2.0
    eval_fovy: float = 50.0
    video_frames: int = 48  # turntable.mp4 frames (0: no video)
    video_resolution: int = 128


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "dsd"
    entity: Optional[str] = None
    group: Optional[str] = None  # defaults to the multirun sweep dir, so a sweep is one group


@dataclass
class SamplerConfig:
    """Plain DDIM sampling of the prior (dsd-sample)."""

    steps: int = 10
    cfg_scale: float = 7.5


@dataclass
class Config:
    prompt: str = "a hamburger"
    seeds: Any = field(default_factory=lambda: [0, 1, 2, 3])  # list of ints or a count
    # run only shard `seed_shard` of `num_seed_shards` of the seeds (whole seed batches, contiguous;
    # dsd.sharding): --multirun seed_shard=0,1,2,3 num_seed_shards=4 spreads the seeds over 4 jobs
    seed_shard: int = 0
    num_seed_shards: int = 1
    device: str = "auto"  # auto | cpu | cuda
    guidance: GuidanceConfig = MISSING
    prior: PriorConfig = MISSING
    representation: RepresentationConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)


def register_configs() -> None:
    from dsd import registry

    ConfigStore.instance().store(name="config_schema", node=Config)
    registry.load_all()


def _one_of(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise UserError(f"{key}={value!r} is not accepted; use one of: {', '.join(accepted)}.")


SEED_COUNT_LIMIT = 1_000_000  # seeds=N builds a list of N seeds; a sweep shards far fewer per job


def resolve_seeds(seeds: Any) -> list[int]:
    """`seeds=[0,1,2]` is used as is; `seeds=4` means [0, 1, 2, 3]."""
    from dsd.validation import check_seed_values

    bad = UserError(
        f"seeds={seeds!r} is not accepted; give a non-empty list of ints (seeds=[0,1,2,3]) "
        f"or a positive count up to {SEED_COUNT_LIMIT} (seeds=4)."
    )
    if isinstance(seeds, bool):
        raise bad
    if isinstance(seeds, int):
        if not 0 < seeds <= SEED_COUNT_LIMIT:
            raise bad
        return list(range(seeds))
    if isinstance(seeds, (list, tuple)) and seeds:
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise bad
        check_seed_values(list(seeds))
        if len(set(seeds)) != len(seeds):
            raise UserError(f"seeds={list(seeds)} repeats a seed; each seed must appear once.")
        return list(seeds)
    raise bad


def _validate_camera(cam: CameraConfig) -> None:
    """Ranges are [low, high] pairs; the values themselves are checked by dsd.validation.RULES."""
    for key in ("elevation_range", "azimuth_range", "distance_range", "fovy_range"):
        lo_hi = list(getattr(cam, key))
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise UserError(f"camera.{key}={lo_hi} is not accepted; use [low, high] with low <= high.")


def _check_wandb_key(mode: str) -> None:
    """wandb.mode=online needs an API key; W&B would fail later with its own traceback. Checked
    here, without the network (a wrong key still fails in wandb.init, see dsd.cli)."""
    from dsd.logging import resolve_wandb_mode, wandb_key_configured

    if mode == "online" and resolve_wandb_mode(mode) == "online" and not wandb_key_configured():
        raise UserError(
            "wandb.mode=online needs a W&B API key and none is configured; run `wandb login` or set "
            "WANDB_API_KEY, or use wandb.mode=offline (upload later with `wandb sync`) or wandb.mode=disabled."
        )


def validate(cfg: Config) -> list[int]:
    """Check values that types alone cannot; returns the resolved seed list."""
    from dsd.validation import check_values

    if not isinstance(cfg.prompt, str) or not cfg.prompt.strip():
        raise UserError(f'prompt={cfg.prompt!r} is empty; give a text prompt, e.g. prompt="a corgi".')
    seeds = resolve_seeds(cfg.seeds)
    _one_of("device", cfg.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.optimizer", cfg.trainer.optimizer, ("adam", "sgd"))
    _one_of("wandb.mode", cfg.wandb.mode, ("auto", "online", "offline", "disabled"))
    check_values(cfg)  # finite numbers, step counts, t ranges, CFG scales, camera angles, ...
    _validate_camera(cfg.camera)
    _check_wandb_key(cfg.wandb.mode)
    return seeds


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto.")
    return torch.device(name)
