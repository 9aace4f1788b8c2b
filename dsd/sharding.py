"""Spreading a sweep over cluster jobs: seed shards, requeue of preempted jobs, Slurm setup errors.

Seed shards: `seeds=40 num_seed_shards=4 seed_shard=0,1,2,3` under --multirun makes one job per
shard. A shard is a contiguous run of whole seed batches (trainer.seed_batch seeds each), the
batches dealt out as evenly as possible (the first shards get one more when they do not divide).
Whole batches, because a batch is the unit the trainer optimizes together: a seed's batch mates
are then the same as in the unsharded run, so the sharded sweep computes exactly what one
unsharded run computes (bit for bit, even where seeds of a batch share state, as VSD's shared
particles do). Contiguous, so a shard is a readable range of the seed list, and dsd-eval merges
the shards of a (method, prompt) back into one row (summary.json records the shard and the full
seed list).

Requeue (hydra/launcher=slurm or submitit_local): on preemption or at the time limit dsd-run
checkpoints every seed, then submitit's handler requeues the job: hydra-submitit-launcher's
`checkpoint` resubmits the same launcher call (submitit_launcher.py, BaseSubmititLauncher.checkpoint).
The requeued job keeps its run dir: the pickled launcher carries the resolver cache of the config
it was submitted with, and Hydra's load_sweep_config copies that cache into the job's config
(hydra/_internal/config_loader_impl.py), so `${now:...}` in hydra.sweep.dir keeps its submission-
time value (tests/test_slurm.py puts microseconds in it to check). The job then resumes its
checkpoints by itself (dsd.run.resume_mode). A machine without Slurm gets `slurm_setup_message`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsd.errors import UserError


@dataclass(frozen=True)
class SeedShard:
    index: int
    count: int
    seeds: list[int]  # this shard's seeds
    all_seeds: list[int]  # the resolved seed list of the whole sweep

    def summary(self) -> dict:
        return {"index": self.index, "count": self.count, "all_seeds": self.all_seeds}


def shard_unit(trainer_seed_batch: int | None) -> int:
    """Seeds per shard unit: trainer.seed_batch, or when null the trainer's default batch. Not the
    batch the trainer resolves on the machine (it depends on the machine's memory): every job of
    a sweep must cut the same shards wherever it runs."""
    from dsd.trainer import DEFAULT_SEED_BATCH

    return trainer_seed_batch or DEFAULT_SEED_BATCH


def shard_seeds(seeds: list[int], index: Any, count: Any, seed_batch: int) -> SeedShard:
    """Shard `index` of `count` of `seeds`: a contiguous run of whole seed batches (see the module doc)."""
    check_shard_keys(index, count)
    batches = [seeds[i : i + seed_batch] for i in range(0, len(seeds), seed_batch)]
    if count > len(batches):
        raise UserError(
            f"num_seed_shards={count} is more shards than the {len(seeds)} seeds make seed batches "
            f"({len(batches)} of {seed_batch}, trainer.seed_batch or its default); a shard holds whole batches, so use "
            f"num_seed_shards <= {len(batches)}, more seeds, or a smaller trainer.seed_batch."
        )
    per_shard, extra = divmod(len(batches), count)
    first = index * per_shard + min(index, extra)  # the first `extra` shards take one batch more
    mine = batches[first : first + per_shard + (index < extra)]
    return SeedShard(index, count, [seed for batch in mine for seed in batch], list(seeds))


def check_shard_keys(index: Any, count: Any) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(count) or count < 1:
        raise UserError(f"num_seed_shards={count!r} is not accepted; use a positive integer (1: no sharding).")
    if not is_int(index) or not 0 <= index < count:
        raise UserError(
            f"seed_shard={index!r} is not accepted; with num_seed_shards={count} use an integer in [0, {count - 1}]"
            f" (under --multirun: seed_shard={','.join(map(str, range(min(count, 4))))}{',...' if count > 4 else ''})."
        )


# ---------------------------------------------------------------- Slurm setup


def slurm_setup_message(err: BaseException) -> str | None:
    """One paragraph for hydra/launcher=slurm on a machine without Slurm: submitit raises a
    RuntimeError when `srun` is not on the PATH (submitit/slurm/slurm.py, SlurmExecutor.__init__)
    and a FileNotFoundError when `sbatch` is not; None for any other error."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    from_submitit = (isinstance(err, RuntimeError) and '"srun"' in str(err)) or (
        isinstance(err, FileNotFoundError) and Path(str(err.filename or "")).name in ("sbatch", "srun"))
    if not (missing and from_submitit):
        return None
    return (
        f"Slurm not found: hydra/launcher=slurm submits with sbatch and srun, and this machine has no "
        f"{' and no '.join(missing)} on its PATH. This is a setup problem, not a wrong setting: start the sweep "
        "on a Slurm login node (or load its Slurm module), or leave out hydra/launcher=slurm to run the jobs "
        "here one after another (hydra/launcher=submitit_local runs them as local submitit jobs)."
    )
