"""Sweeps on a cluster: seed shards (one job each, merged back by dsd-eval), a preempted submitit job
requeued into its own run dir, and a Slurm launcher on a machine without Slurm."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dsd.errors import UserError
from dsd.evaluate import main as dsd_eval
from dsd.outputs import load_result, load_views
from dsd.run import run
from dsd.sharding import shard_seeds

BIN = Path(sys.executable).parent
TINY = ("prior.image_size=16", "prior.num_references=5", "trainer.checkpoint_every=0", "camera.video_frames=0")


def reference_shards(seeds: list[int], count: int, seed_batch: int) -> list[list[int]]:
    """Independent reference: cut the seed list into batches, deal the batch indices out with
    numpy's array_split (contiguous, the first shards one longer), flatten."""
    batch_of = [i // seed_batch for i in range(len(seeds))]
    parts = np.array_split(np.arange(max(batch_of) + 1), count)
    return [[s for s, b in zip(seeds, batch_of) if b in set(part.tolist())] for part in parts]


@pytest.mark.parametrize("n, count, seed_batch", [(40, 4, 4), (40, 3, 4), (10, 4, 1), (7, 2, 3), (9, 9, 1), (5, 1, 4)])
def test_shards_are_contiguous_whole_batches_and_hold_every_seed_once(n, count, seed_batch):
    seeds = [3 * s + 1 for s in range(n)]  # not 0..n-1, so positions and values differ
    shards = [shard_seeds(seeds, k, count, seed_batch) for k in range(count)]
    assert [s.seeds for s in shards] == reference_shards(seeds, count, seed_batch)
    assert sum((s.seeds for s in shards), []) == seeds  # every seed once, in order
    assert all(s.seeds and s.all_seeds == seeds and s.count == count for s in shards)
    unsharded_batches = [seeds[i : i + seed_batch] for i in range(0, n, seed_batch)]
    shard_batches = [s.seeds[i : i + seed_batch] for s in shards for i in range(0, len(s.seeds), seed_batch)]
    assert shard_batches == unsharded_batches  # a seed's batch mates are those of the unsharded run


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("seed_shard=4", "num_seed_shards=4"), "seed_shard=4"),
        (("seed_shard=-1", "num_seed_shards=4"), "seed_shard=-1"),
        (("seed_shard=0", "num_seed_shards=0"), "num_seed_shards=0"),
        (("seed_shard=0", "num_seed_shards=-2"), "num_seed_shards=-2"),
        (("seed_shard=0", "num_seed_shards=5", "seeds=8", "trainer.seed_batch=2"), "num_seed_shards=5"),
    ],
)
def test_bad_shard_values_are_user_errors_naming_the_key_and_write_nothing(compose, tmp_path, overrides, key):
    with pytest.raises(UserError, match=key):
        run(compose(*TINY, "trainer.steps=1", *overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def write_job(root: Path, name: str, overrides: tuple[str, ...], compose) -> Path:
    """One sweep job as `dsd-run --multirun` leaves it: the run plus Hydra's .hydra/ files."""
    cfg = compose(*overrides)
    run_dir = root / name
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_sharded_sweep_gives_the_table_of_one_unsharded_run(compose, tmp_path):
    # dsd_sampling with as many ODE steps as optimization steps follows its seed's DDIM path, so
    # seeds reach different references and the set-level numbers depend on every shard
    method = ("guidance=dsd_sampling", "guidance.ode_steps=3", "trainer.steps=3", "sampler.steps=3")
    prompts = ("a teapot", "a red apple")
    common = (*TINY, *method, "seeds=[5,1,8,3,9,2]", "trainer.seed_batch=2")
    for i, prompt in enumerate(prompts):
        write_job(tmp_path / "whole", str(i), (*common, f"prompt={prompt}"), compose)
        for k in range(3):
            write_job(tmp_path / "sharded", f"{i}{k}", (*common, f"prompt={prompt}", f"seed_shard={k}",
                                                        "num_seed_shards=3"), compose)
    shard_summary = json.loads((tmp_path / "sharded/01/summary.json").read_text())
    assert [e["seed"] for e in shard_summary["seeds"]] == [8, 3]
    assert shard_summary["seed_shard"] == {"index": 1, "count": 3, "all_seeds": [5, 1, 8, 3, 9, 2]}

    for sweep in ("whole", "sharded"):
        dsd_eval([str(tmp_path / sweep), "--wandb-mode", "disabled", "--cache", str(tmp_path / "cache"), "--no-report"])
    whole, sharded = read_csv(tmp_path / "whole/metrics.csv"), read_csv(tmp_path / "sharded/metrics.csv")
    assert len(whole) == 3 and [row["seeds"] for row in whole] == ["6", "6", "12"]  # 2 prompts + the mean row
    assert sharded == whole
    assert float(whole[0]["distinct_references"]) >= 2  # a set-level number that no single shard gives
    merged = json.loads((tmp_path / "sharded/12/metrics.json").read_text())
    assert merged["seeds"] == [5, 1, 8, 3, 9, 2] and len(merged["shard_dirs"]) == 3
    assert merged["metrics"] == json.loads((tmp_path / "whole/1/metrics.json").read_text())["metrics"]


# ---------------------------------------------------------------- requeue through submitit

REQUEUED_JOB = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path

    LOG, AT = Path(os.environ["STEP_LOG"]), int(os.environ["SIGNAL_AT"])

    def job(cfg, run_dir):
        # runs inside the submitit job process (cloudpickle carries this __main__ function by value)
        from dsd import trainer
        from dsd.run import run

        step = trainer.Trainer.step

        def logged(self, states, k):
            with LOG.open("a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": k, "run_dir": str(run_dir)}) + "\\n")
            if k == AT and not (LOG.parent / "signalled").exists():
                (LOG.parent / "signalled").touch()
                os.kill(os.getpid(), signal.SIGUSR2)  # what submitit's controller sends before the time limit
            return step(self, states, k)

        trainer.Trainer.step = logged
        run(cfg, run_dir)

    from dsd.cli import RUN, _main
    _main(job, RUN)
""")


def test_a_preempted_submitit_job_is_requeued_into_its_run_dir_and_resumes(compose, tmp_path):
    overrides = (*TINY, "prompt=a teapot", "seeds=[0,1]", "trainer.steps=6")
    script = tmp_path / "requeued_job.py"
    script.write_text(REQUEUED_JOB)
    env = {**os.environ, "STEP_LOG": str(tmp_path / "steps.jsonl"), "SIGNAL_AT": "2", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    # microseconds in the sweep dir: a requeued job that re-resolved ${now:...} would land elsewhere
    proc = subprocess.run([sys.executable, str(script), "--multirun", "hydra/launcher=submitit_local",
                           f"hydra.sweep.dir={tmp_path}/sweep_${{now:%H%M%S%f}}", "device=cpu", *overrides],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    attempts = list(dict.fromkeys(entry["pid"] for entry in log))
    assert len(attempts) == 2  # the job ran, was signalled, and ran again
    assert [e["step"] for e in log if e["pid"] == attempts[0]] == [0, 1, 2]
    assert [e["step"] for e in log if e["pid"] == attempts[1]] == [3, 4, 5]  # resumed, not restarted
    run_dirs = {e["run_dir"] for e in log}
    assert len(run_dirs) == 1 and len(list(tmp_path.glob("sweep_*"))) == 1
    run_dir = Path(run_dirs.pop())
    assert (run_dir / ".dsd-submitit-job").is_file()  # how the second attempt knew it was the same job
    submitit_logs = "".join(p.read_text() for p in run_dir.parent.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in submitit_logs
    run(compose(*overrides), tmp_path / "straight")
    for seed in (0, 1):
        assert np.array_equal(load_result(run_dir / f"seed_{seed}/result.npz"),
                              load_result(tmp_path / f"straight/seed_{seed}/result.npz"))
        assert np.array_equal(load_views(run_dir / f"seed_{seed}/views.npz"),
                              load_views(tmp_path / f"straight/seed_{seed}/views.npz"))


def test_only_the_same_submitit_job_resumes_a_run_dir(compose, tmp_path, monkeypatch):
    from dsd.run import resume_mode

    cfg = compose(*TINY)
    tmp_path.joinpath("run").mkdir()
    assert not resume_mode(cfg, tmp_path / "run", [0])  # not a submitit job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    assert not resume_mode(cfg, tmp_path / "run", [0])  # the job's first attempt
    assert resume_mode(cfg, tmp_path / "run", [0])  # requeued: same job id, same run dir
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4243")
    assert not resume_mode(cfg, tmp_path / "run", [0])  # another job reusing the dir starts afresh


def test_submitits_no_srun_error_becomes_the_setup_message(tmp_path, monkeypatch):
    import submitit

    from dsd.sharding import slurm_setup_message

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    assert "Slurm not found" in slurm_setup_message(raised.value)
    assert "sbatch and no srun" in slurm_setup_message(raised.value)
    assert slurm_setup_message(RuntimeError("something else")) is None
    assert slurm_setup_message(FileNotFoundError(2, "No such file or directory", "sbatch")) is not None


def test_the_slurm_launcher_without_slurm_is_a_setup_message_not_a_traceback(tmp_path):
    no_tools = tmp_path / "bin"  # a PATH with no sbatch/srun, even on a Slurm login node
    no_tools.mkdir()
    env = {**os.environ, "PATH": str(no_tools), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "dsd-run"), "--multirun", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep",
                           "seeds=1", "trainer.steps=1", "prior.image_size=8"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Slurm not found" in proc.stderr and "setup problem" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("sweep/*/summary.json"))
