"""Run-dir files. Every write goes to a temporary file first and is renamed into place, so a
crash or Ctrl-C never leaves a half-written file. Files get the mode of a plain `open(path, "w")`
(0666 minus the umask, usually 0644) so collaborators can read the results."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from dsd.errors import UserError


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new, uniquely named hidden file next to `path`: (fd, path). Created with mode 0666 so the
    kernel applies the umask, as for any ordinary file (tempfile.mkstemp would force 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def unwritable(path: Path, err: OSError) -> UserError:
    """A failed write (disk full, read-only or missing directory, name too long) as one sentence
    naming the file; the CLI shows it without a traceback."""
    return UserError(f"could not write {path}: {err.strerror or err}. Free disk space or fix the permissions "
                     "of the run dir (hydra.run.dir), then continue with trainer.resume=true.")


def atomic_write_bytes(path: Path, data: bytes, previous: Path | None = None) -> None:
    """Write `path` through a temporary file renamed into place; with `previous`, the file being
    replaced is first renamed to `previous` (a fallback if the new one is ever damaged)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise unwritable(path, err) from None
        raise


def remove_orphaned_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed process left behind (only the names this module
    creates: .<name>.<8 hex>.tmp and .<stem>.tmp<suffix>). Call it only while holding the run
    dir's lock, so no live writer owns them."""
    removed = []
    for tmp in Path(run_dir).rglob(".*.tmp*"):
        if tmp.is_file() and TEMPORARY_NAME.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp|\..+\.tmp\.mp4")


def json_safe(obj: Any) -> Any:
    """JSON has no NaN or inf (a diverged seed's metrics): they are written as null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def save_torch(path: Path, obj: Any, previous: Path | None = None) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), previous)


def save_result(path: Path, image: np.ndarray) -> None:
    """result.npz with `image`: float32 (H, W, 3) in [0, 1]."""
    buffer = io.BytesIO()
    np.savez(buffer, image=np.asarray(image, dtype=np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def save_views(path: Path, views: np.ndarray) -> None:
    """views.npz with `views`: float32 (V, H, W, 3) in [0, 1], the seed's evaluation views in the
    order of the run's evaluation cameras (2D: V = 1, the result itself). dsd-eval reads it."""
    buffer = io.BytesIO()
    np.savez(buffer, views=np.asarray(views, dtype=np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def load_views(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["views"]


def load_result(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["image"]


def to_uint8(image: np.ndarray) -> np.ndarray:
    # NaN (a diverged seed) shows as black instead of an undefined cast
    return (np.nan_to_num(np.clip(np.asarray(image), 0, 1), nan=0.0) * 255 + 0.5).astype(np.uint8)


def upscale(image: np.ndarray, min_size: int = 256) -> Image.Image:
    """Nearest-neighbour upscale so small (32 px) images are visible; pixels stay pixels."""
    pil = Image.fromarray(to_uint8(image))
    factor = max(1, -(-min_size // max(pil.size)))
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)


def save_png(path: Path, image: np.ndarray, min_size: int = 256) -> None:
    buffer = io.BytesIO()
    upscale(image, min_size).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def make_grid(images: list[np.ndarray], labels: list[str], tile: int = 160) -> Image.Image:
    """All seeds at a glance. Each item is one image (H, W, 3) or a seed's views (V, H, W, 3):
    single images go side by side in one row; views make one row per seed (same views for all)."""
    rows = [np.asarray(im)[None] if np.asarray(im).ndim == 3 else np.asarray(im) for im in images]
    per_tile_labels = all(len(r) == 1 for r in rows)
    if per_tile_labels:
        rows = [np.concatenate(rows)]
    pad, text_h = 6, 16
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (tile + pad) + pad, len(rows) * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, views in enumerate(rows):
        y = pad + r * (tile + text_h + pad)
        for c, image in enumerate(views):
            x = pad + c * (tile + pad)
            grid.paste(Image.fromarray(to_uint8(image)).resize((tile, tile), Image.NEAREST), (x, y))
            if per_tile_labels:
                draw.text((x + 2, y + tile + 2), labels[c], fill="black")
        if not per_tile_labels:
            draw.text((pad + 2, y + tile + 2), labels[r], fill="black")
    return grid


def save_video(path: Path, frames: np.ndarray, fps: int = 24) -> None:
    """frames (N, H, W, 3) in [0, 1] -> H.264 mp4 (imageio-ffmpeg), written atomically. The index
    (moov box) goes first (`+faststart`) so browsers and W&B can play it while it downloads."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        # macro_block_size=1: small renders (e.g. 64 px) are not padded up to multiples of 16
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                                output_params=["-movflags", "+faststart"]) as writer:
            for frame in frames:
                writer.append_data(to_uint8(frame))
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise unwritable(path, err) from None
        raise


def save_grid(path: Path, images: list[np.ndarray], labels: list[str]) -> Image.Image:
    grid = make_grid(images, labels)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return grid


class RunDirLock:
    """An exclusive lock on a run dir (`.dsd-run.lock`), so two processes never interleave their
    checkpoints. A POSIX record lock (fcntl.lockf, which NFS supports) dies with its process, so a
    killed run leaves no stale lock: the file stays, the lock does not."""

    NAME = ".dsd-run.lock"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl
        import socket

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise unwritable(self.path, err) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another dsd-run ({holder}); wait for it to finish or "
                "give this run another hydra.run.dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
