"""W&B mode resolution (never online in tests), multirun sweeps, the Slurm launcher config."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dsd.logging import resolve_wandb_mode

BIN = Path(sys.executable).parent


def test_auto_mode_is_offline_without_a_key_and_online_with_one(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment can force it off
    assert resolve_wandb_mode("auto") == "disabled"


def test_offline_wandb_run_logs_into_the_run_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            str(BIN / "dsd-run"),
            f"hydra.run.dir={tmp_path}/run",
            "seeds=1",
            "trainer.steps=3",
            "prior.image_size=8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "offline" in proc.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_multirun_sweeps_methods_into_separate_run_dirs(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            str(BIN / "dsd-run"),
            "--multirun",
            f"hydra.sweep.dir={tmp_path}",
            "guidance=dsd,sds",
            "seeds=1",
            "trainer.steps=2",
            "prior.image_size=8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    methods = sorted(json.loads(p.read_text())["guidance"] for p in tmp_path.glob("*/summary.json"))
    assert methods == ["dsd", "sds"]


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from dsd.cli import CONFIG_PATH
    from dsd.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
