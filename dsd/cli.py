"""Entry points dsd-run and dsd-sample: parse with Hydra, call run/sample, report errors.

Each entry point composes its own primary config, stored in Hydra's ConfigStore under the app's
name: the shared dsd/conf/config.yaml plus the app's Hydra settings. That names the Hydra job after
the app (so the job log is `<run dir>/dsd-run.log`, not `cli.log` after this module) and gives
`--help` a text that lists only the groups a user picks from (not the schema groups of
dsd/registry.py).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dsd.config import register_configs
from dsd.errors import UserError

CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")  # inside the package: wheels carry it


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


class JobFailed(Exception):
    """A job of a --multirun that failed (its message is printed already). Raised instead of
    sys.exit so Hydra's launcher records the failure and goes on with the next job (SystemExit
    would end the whole sweep); picklable for launchers that run jobs in other processes."""

    def __init__(self, exit_code: int, job: int) -> None:
        super().__init__(exit_code, job)
        self.exit_code, self.job = exit_code, job

    def __str__(self) -> str:
        return f"job {self.job} failed with exit code {self.exit_code}"


@dataclass
class _Session:
    """What one entry-point call has seen (module state, reset per call so in-process calls, as in
    the tests, do not leak into each other)."""

    task_started: bool = False
    crashed: bool = False  # an unexpected exception left a single run: re-raise it as is
    jobs: int = 0
    failed: list[JobFailed] = field(default_factory=list)  # JobFailed of this process's multirun jobs


_session = _Session()


def _is_wandb_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "wandb"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _call(job, cfg: DictConfig) -> None:
    """Run `job` on the typed config; user errors become one paragraph and exit code 2."""
    _session.task_started = True
    _session.jobs += 1
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from rich.markup import escape

    from dsd.logging import console, keep_console_lines_off_terminal_handlers, log_crash, report_error
    from dsd.validation import check_composed

    keep_console_lines_off_terminal_handlers()  # Hydra has just configured logging for this job
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task)  # as typed: a prompt's ${ unresolved
    console.print(f"[bold]{hydra_cfg.job.name}[/bold] {escape(' '.join(overrides))} -> {escape(str(run_dir))}")

    def fail(exit_code: int) -> None:
        if not multirun:
            sys.exit(exit_code)
        failed = JobFailed(exit_code, int(hydra_cfg.job.num))
        _session.failed.append(failed)
        raise failed from None

    try:
        check_composed(cfg)  # unknown `+key`s, unresolvable ${...}
        typed = OmegaConf.to_object(cfg)
        job(typed, run_dir)
    except UserError as err:
        report_error(f"error: {err}")
        fail(err.exit_code)
    except KeyboardInterrupt as err:
        if not getattr(err, "reported", False):  # dsd.run reports what it saved; this is before training
            report_error("interrupted before training started: nothing was saved.")
        sys.exit(getattr(err, "exit_code", 130))
    except Exception as err:
        if _is_wandb_error(err):  # a rejected key or no connection: setup, not a bug
            report_error(
                f"error: W&B could not start with wandb.mode={cfg.wandb.mode} ({_first_line(err)}); check the "
                "API key (`wandb login` or WANDB_API_KEY) and the network, or use wandb.mode=offline or disabled."
            )
            fail(2)
        log_crash(f"crashed: {type(err).__name__}: {err}")
        if multirun:
            traceback.print_exc()
            fail(1)
        _session.crashed = True
        raise


def _one_paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _oserror(err: BaseException) -> OSError | None:
    """The OSError behind `err` (logging wraps the log file's in a ValueError), if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.filename is not None:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def input_error_message(err: Exception) -> str | None:
    """One paragraph for an error raised before the task ran (Hydra composing the config, or
    creating the run dir and its log file); None when it is not an input error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dsd.sharding import slurm_setup_message

    setup = slurm_setup_message(err)  # hydra/launcher=slurm without Slurm: a setup problem, not input
    if setup is not None:
        return setup
    os_error = _oserror(err)
    if os_error is not None:
        return (
            f"the run dir cannot be written: {os_error.strerror}: {os_error.filename}. Set hydra.run.dir "
            "(hydra.sweep.dir with --multirun) to a directory you can write, not an existing file, with no "
            "path component longer than 255 bytes."
        )
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        text = str(err)
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
            text += "\n" + str(cause)
        # Hydra's hint to add the key with + would only move the error to dsd.validation
        lines = [line for line in text.splitlines() if not _HYDRA_NOISE.match(line)]
        if any(_UNKNOWN_KEY.search(line) for line in lines):
            lines.append("(`dsd-run --cfg job` lists every accepted key.)")
        return _one_paragraph("\n".join(lines))
    return None


# lines of Hydra/OmegaConf messages that say nothing about the input
_HYDRA_NOISE = re.compile(r"\s*(Config search path:|provider=|To append to your config use|reference_type=|object_type=)")
_UNKNOWN_KEY = re.compile(r"Key '[^']*' not in '")


def _sweep_failed_message(failed: JobFailed) -> str:
    jobs = _session.failed or [failed]
    listed = ", ".join(f"job {f.job} (exit {f.exit_code})" for f in jobs)
    total = f" of {_session.jobs}" if _session.failed else ""
    return f"error: {len(jobs)}{total} jobs of the sweep failed: {listed}; each job's message is above."


def _main(job, app: App) -> None:
    global _session
    _session = _Session()
    register_configs()
    store_primary_config(app)
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=app.name)
    # Hydra prints its errors with a stack trace and a hint in a second paragraph; let them reach
    # us instead, to print input errors as one paragraph (and real crashes in full).
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main(lambda cfg: _call(job, cfg))()
    except JobFailed as failed:  # a --multirun went through all its jobs, some failed
        from dsd.logging import report_error

        report_error(_sweep_failed_message(failed))
        codes = {f.exit_code for f in (_session.failed or [failed])}
        sys.exit(codes.pop() if len(codes) == 1 else 1)  # mixed: a crash is the news
    except SystemExit as exit_:
        # Hydra reports some input errors (argparse) itself and exits before the task starts;
        # those are input errors, so exit 2 like ours.
        if exit_.code == 1 and not _session.task_started:
            sys.exit(2)
        raise
    except Exception as err:
        message = None if (user_wants_traceback or _session.crashed) else input_error_message(err)
        if message is None:
            raise
        from dsd.logging import report_error

        report_error(f"error: {message}")
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def run_main() -> None:
    from dsd.run import run

    _main(run, RUN)


def sample_main() -> None:
    from dsd.sample import sample

    _main(sample, SAMPLE)
