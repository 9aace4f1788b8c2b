"""Console (rich) and Weights & Biases logging, in one place.

wandb.mode=auto: online when an API key is configured (WANDB_API_KEY or a netrc entry for
api.wandb.ai), otherwise offline, said in one line. Offline runs can be uploaded later with
`wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import netrc
import os
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

console = Console(stderr=True)


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if os.environ.get("WANDB_MODE") in ("disabled", "offline") and mode in ("auto", "online"):
        return os.environ["WANDB_MODE"]  # the environment (tests, CI) can force it off
    if mode != "auto":
        return mode
    if wandb_key_configured():
        return "online"
    console.print("[dim]W&B: no API key configured, logging offline (upload later with `wandb sync`).[/dim]")
    return "offline"


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
        self.mode = resolve_wandb_mode(mode)
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
