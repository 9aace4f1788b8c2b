"""The real entry points as a user runs them (subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def dsd(tool, *args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(BIN / tool), f"hydra.run.dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def job_log(run_dir: Path, app: str) -> str:
    """Hydra's job log: named after the app, the only log file in the run dir."""
    assert [p.name for p in run_dir.glob("*.log")] == [f"{app}.log"]
    return (run_dir / f"{app}.log").read_text()


def test_dsd_run_end_to_end(tmp_path):
    proc = dsd("dsd-run", "seeds=[0,5]", "trainer.steps=5", "prior.image_size=8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["seed"] for e in summary["seeds"]] == [0, 5] and summary["guidance"] == "dsd"
    log = job_log(tmp_path, "dsd-run")
    for line in ("dsd-run seeds=[0,5] trainer.steps=5", "W&B: disabled", f"done 2 seeds in {summary['wall_s']:.1f}s"):
        assert line in log, (line, log)
        assert (proc.stdout + proc.stderr).count(line) == 1, line  # on the terminal once, not twice


def test_dsd_sample_end_to_end(tmp_path):
    proc = dsd("dsd-sample", "seeds=3", "sampler.steps=4", "prior.image_size=8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seed_2" / "result.npz").exists() and (tmp_path / "grid.png").exists()
    assert "sampled 3 seeds" in job_log(tmp_path, "dsd-sample")


def test_user_errors_go_to_the_job_log(tmp_path):
    proc = dsd("dsd-run", "trainer.steps=0", "prior.image_size=8", tmp_path=tmp_path)
    assert proc.returncode == 2
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "trainer.steps" in error and error in job_log(tmp_path, "dsd-run")


def test_help_lists_the_user_groups_not_the_schema(tmp_path):
    proc = dsd("dsd-run", "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "schema" not in proc.stdout.lower()
    conf = Path(__file__).resolve().parent.parent / "dsd" / "conf"
    for group in ("guidance", "prior", "representation", "experiment"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in proc.stdout, group
    assert "dsd-run" in proc.stdout and "cli" not in proc.stdout.split()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prompt="], "prompt"),
        (["prompt=   "], "prompt"),
        (["seeds=[]"], "seeds"),
        (["seeds=0"], "seeds"),
        (["seeds=[1,x]"], "seeds"),
        (["seeds=[1,1]"], "seeds"),
        (["trainer.steps=0"], "trainer.steps"),
        (["trainer.steps=-3"], "trainer.steps"),
        (["guidance=nope"], "sds"),  # the list of accepted options is shown
        (["prior=nope"], "analytic"),
        (["guidance.not_a_key=1"], "not_a_key"),
        (["trainer.steps=abc"], "trainer.steps"),
        (["device=tpu"], "device"),
        (["guidance.ode=bogus"], "interp"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, args, needle):
    proc = dsd("dsd-run", *args, tmp_path=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_an_experiment_preset_sets_prompt_and_seeds(tmp_path):
    """A preset's top-level values win over config.yaml's defaults (config.yaml lists _self_ first)."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nprompt: a teapot\nseeds: [5, 6]\n")
    proc = subprocess.run([str(BIN / "dsd-run"), f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine",
                           "--cfg", "job"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    composed = yaml.safe_load(proc.stdout)
    assert composed["prompt"] == "a teapot" and composed["seeds"] == [5, 6]
