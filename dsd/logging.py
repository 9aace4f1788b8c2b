"""Console (rich) and Weights & Biases logging, in one place.

Text printed with `console.print` is shown on the terminal by rich and is also a record of the
Python logger "dsd", so Hydra's job log file (`<run dir>/<app>.log`) keeps it. Under Hydra the root
logger also has a terminal handler; `keep_console_lines_off_terminal_handlers` stops it from
printing those lines a second time. Outside Hydra (tests, notebooks) nothing handles the records
unless the caller configures logging.

wandb.mode=auto: online when an API key is configured (WANDB_API_KEY or a netrc entry for
api.wandb.ai), otherwise offline, said in one line. Offline runs can be uploaded later with
`wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("dsd")
_SHOWN = "dsd_shown_on_terminal"  # record attribute: the line is on the terminal already


def _record_shown(level: int, message: str, exc_info: bool = False) -> None:
    log.log(level, message, extra={_SHOWN: True}, exc_info=exc_info)


class _RecordingConsole(Console):
    """A rich console whose printed text is also logged (plain text, markup removed)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*objects, **kwargs)
        # only text: progress bars and other renderables refresh through print() too
        if objects and all(isinstance(o, str) for o in objects):
            text = kwargs.get("sep", " ").join(objects)
            if kwargs.get("markup") is not False:  # None: the console's default, markup on
                text = Text.from_markup(text).plain
            _record_shown(logging.INFO, text)


console = _RecordingConsole(stderr=True)


def report_error(message: str) -> None:
    """An error for the person at the terminal: `message` verbatim on stderr (no markup, no wrapping,
    so it reads the same in a terminal and a log) and an ERROR record for the job log."""
    print(message, file=sys.stderr)
    _record_shown(logging.ERROR, message)


def log_crash(message: str) -> None:
    """An unexpected exception, with its traceback, into the job log only (Hydra prints it)."""
    _record_shown(logging.ERROR, message, exc_info=True)


class _NotShownYet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _SHOWN, False)


def keep_console_lines_off_terminal_handlers() -> None:
    """Hydra's job logging gives the root logger a terminal (stream) handler and a file handler.
    Call after it is configured: lines the console printed then only go to the file."""
    for handler in logging.getLogger().handlers:
        terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if terminal and not any(isinstance(f, _NotShownYet) for f in handler.filters):
            handler.addFilter(_NotShownYet())


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_mode_and_reason(mode: str) -> tuple[str, str]:
    forced = os.environ.get("WANDB_MODE")
    if forced in ("disabled", "offline") and mode in ("auto", "online"):
        return forced, f"WANDB_MODE={forced}"  # the environment (tests, CI) can force it off
    if mode != "auto":
        return mode, f"wandb.mode={mode}"
    if wandb_key_configured():
        return "online", "API key configured"
    return "offline", "no API key configured"


def resolve_wandb_mode(mode: str) -> str:
    return _wandb_mode_and_reason(mode)[0]


class RunLogger:
    """Logs scalars and images to W&B (when enabled); a no-op object when disabled."""

    def __init__(
        self,
        mode: str,
        run_dir: Path,
        config: dict,
        project: str,
        entity: str | None,
        group: str | None,
        name: str,
        job_type: str = "run",
    ) -> None:
        self.mode, reason = _wandb_mode_and_reason(mode)
        line = f"W&B: {self.mode} ({reason})"
        if self.mode == "offline":
            line += f", upload later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*`"
        console.print(line, style="dim", markup=False, highlight=False)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        wandb_dir = Path(run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            job_type=job_type,
            config=config,
            dir=str(wandb_dir),
            mode=self.mode,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def log_images(self, images: dict[str, np.ndarray]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(np.clip(image, 0, 1)) for key, image in images.items()})

    def log_videos(self, videos: dict[str, Path]) -> None:
        """mp4 files (e.g. turntables) as W&B videos."""
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Video(str(path), format="mp4") for key, path in videos.items() if Path(path).exists()})

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
