"""Entry points dsd-run and dsd-sample: parse with Hydra, call run/sample, report errors.

Each entry point composes its own primary config, stored in Hydra's ConfigStore under the app's
name: the shared dsd/conf/config.yaml plus the app's Hydra settings. That names the Hydra job after
the app (so the job log is `<run dir>/dsd-run.log`, not `cli.log` after this module) and gives
`--help` a text that lists only the groups a user picks from (not the schema groups of
dsd/registry.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dsd.config import register_configs
from dsd.errors import UserError

CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")  # inside the package: wheels carry it
_task_started = False


@dataclass(frozen=True)
class App:
    name: str
    summary: str
    groups: tuple[str, ...]  # config groups shown by --help, with their options
    examples: tuple[tuple[str, str], ...]  # (override, what it does) shown by --help


COMMON_EXAMPLES = (
    ('prompt="a red apple"', "the text prompt"),
    ("seeds=4  or  seeds=[0,5,7]", "how many seeds, or which"),
    ("device=cpu", "auto | cpu | cuda"),
    ("hydra.run.dir=<dir>", "where the run writes (default outputs/<date>/<time>_<guidance>)"),
    ("--cfg job", "print the composed config and exit"),
)
RUN = App(
    "dsd-run",
    "optimize one image or 3D representation per seed with score distillation (DSD or a baseline).",
    ("guidance", "prior", "representation", "experiment"),
    COMMON_EXAMPLES + (
        ("trainer.steps=1000", "optimization steps per seed"),
        ("wandb.mode=offline", "auto | online | offline | disabled"),
        ("trainer.resume=true hydra.run.dir=<run dir>", "continue an interrupted run"),
        ("--multirun guidance=dsd,sds", "a sweep: one run per combination"),
    ),
)
SAMPLE = App(
    "dsd-sample",
    "plain DDIM samples of the prior, one per seed, written like a run (to compare with dsd-run).",
    ("prior",),
    COMMON_EXAMPLES + (("sampler.steps=50", "DDIM steps"), ("sampler.cfg_scale=7.5", "classifier-free guidance")),
)


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_PATH) / group).glob("*.yaml"))


def help_template(app: App) -> str:
    """Hydra's help template for `app` (string.Template: $CONFIG is the composed config)."""
    groups = "\n".join(f"  {group}: {', '.join(group_options(group))}" for group in app.groups)
    width = max(len(override) for override, _ in app.examples)
    examples = "\n".join(f"  {override.ljust(width)}  {what}" for override, what in app.examples)
    return (
        f"{app.name}: {app.summary}\n\n"
        f"== Groups (group=option) ==\n{groups}\n\n"
        f"== Common overrides ==\n{examples}\n\n"
        "== Config: every key can be overridden (key=value) ==\n$CONFIG\n"
        "Hydra's own options: --hydra-help\n"
    )


def store_primary_config(app: App) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=app.name, node={
        "defaults": ["config", "_self_"],
        "hydra": {"job": {"name": app.name}, "help": {"app_name": app.name, "template": help_template(app)}},
    })


def _call(job, cfg: DictConfig) -> None:
    """Run `job` on the typed config; user errors become one paragraph and exit code 2."""
    global _task_started
    _task_started = True
    from hydra.core.hydra_config import HydraConfig
    from rich.markup import escape

    from dsd.logging import console, keep_console_lines_off_terminal_handlers, log_crash, report_error

    keep_console_lines_off_terminal_handlers()  # Hydra has just configured logging for this job
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    console.print(f"[bold]{hydra_cfg.job.name}[/bold] {escape(' '.join(hydra_cfg.overrides.task))} -> {escape(str(run_dir))}")
    try:
        typed = OmegaConf.to_object(cfg)
        job(typed, run_dir)
    except UserError as err:
        report_error(f"error: {err}")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        report_error(f"interrupted: checkpoints were saved; continue with trainer.resume=true hydra.run.dir={run_dir}")
        sys.exit(130)
    except Exception as err:
        log_crash(f"crashed: {type(err).__name__}: {err}")
        raise


def _main(job, app: App) -> None:
    register_configs()
    store_primary_config(app)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=app.name)
    try:
        main(lambda cfg: _call(job, cfg))()
    except SystemExit as exit_:
        # Hydra reports config errors (unknown option, bad type) itself and exits 1 before the
        # task starts; those are input errors, so exit 2 like ours.
        if exit_.code == 1 and not _task_started:
            sys.exit(2)
        raise


def run_main() -> None:
    from dsd.run import run

    _main(run, RUN)


def sample_main() -> None:
    from dsd.sample import sample

    _main(sample, SAMPLE)
