"""Run-dir files. Every write goes to a temporary file first and is renamed into place, so a
crash or Ctrl-C never leaves a half-written file. Files get the mode of a plain `open(path, "w")`
(0666 minus the umask, usually 0644) so collaborators can read the results."""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new, uniquely named hidden file next to `path`: (fd, path). Created with mode 0666 so the
    kernel applies the umask, as for any ordinary file (tempfile.mkstemp would force 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
    return (np.clip(np.asarray(image), 0, 1) * 255 + 0.5).astype(np.uint8)


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_grid(path: Path, images: list[np.ndarray], labels: list[str]) -> Image.Image:
    grid = make_grid(images, labels)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return grid
