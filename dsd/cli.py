"""Entry points dsd-run and dsd-sample: parse with Hydra, call run/sample, report errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dsd.config import register_configs
from dsd.errors import UserError

CONFIG_PATH = str(Path(__file__).resolve().parent.parent / "conf")
_task_started = False


def _call(job, cfg: DictConfig) -> None:
    """Run `job` on the typed config; user errors become one paragraph and exit code 2."""
    global _task_started
    _task_started = True
    from hydra.core.hydra_config import HydraConfig

    try:
        typed = OmegaConf.to_object(cfg)
        job(typed, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(
            "interrupted: checkpoints were saved; continue with trainer.resume=true "
            f"hydra.run.dir={HydraConfig.get().runtime.output_dir}",
            file=sys.stderr,
        )
        sys.exit(130)


def _main(job) -> None:
    register_configs()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    app = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")(
        lambda cfg: _call(job, cfg)
    )
    try:
        app()
    except SystemExit as exit_:
        # Hydra reports config errors (unknown option, bad type) itself and exits 1 before the
        # task starts; those are input errors, so exit 2 like ours.
        if exit_.code == 1 and not _task_started:
            sys.exit(2)
        raise


def run_main() -> None:
    from dsd.run import run

    _main(run)


def sample_main() -> None:
    from dsd.sample import sample

    _main(sample)
