"""The input view of an image-conditioned prior (prior.image): load, mask, re-centre, resize.

Re-centring follows the rgba preprocessing used with threestudio's zero123 configs (dreamgaussian
process.py, `--border_ratio 0.2`): the object's bounding box is scaled so its longer side is
(1 − border_ratio) = 0.8 of the frame and placed in the middle. threestudio then only resizes the
rgba and composites it on white (threestudio/models/guidance/zero123_guidance.py
`prepare_embeddings`: rgb·α + (1 − α)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dsd.errors import UserError

BACKGROUNDS = {"white": 1.0, "black": 0.0}
OBJECT_FRACTION = 0.8  # longer bbox side / frame side (dreamgaussian process.py border_ratio 0.2)
# RGB images carry no alpha: a pixel whose every channel is within this of the background colour
# counts as background (renders and product shots on a plain white/black backdrop).
BACKGROUND_TOLERANCE = 4.0 / 255.0


def _error(path, why: str) -> UserError:
    return UserError(f"prior.image={str(path)!r} {why}; accepted: an existing PNG/JPEG/WebP image, "
                     "ideally RGBA with the object's alpha mask.")


def _read_rgba(path: Path, background: float) -> tuple[Tensor, Tensor]:
    """-> (rgb (3, H, W) in [0, 1], not yet composited; mask (1, H, W) in [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise _error(path, "does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _error(path, f"could not be read as an image ({type(err).__name__})") from None
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
    rgb = pixels[:3]
    if has_alpha:
        mask = pixels[3:]
    else:
        mask = ((rgb - background).abs() > BACKGROUND_TOLERANCE).any(dim=0, keepdim=True).float()
    if not (mask > 0.5).any():
        raise _error(path, "has no object: every pixel is transparent or background-coloured")
    return rgb, mask


def _bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """Inclusive-exclusive (top, bottom, left, right) of mask > 0.5."""
    rows = torch.nonzero((mask[0] > 0.5).any(dim=1)).flatten()
    cols = torch.nonzero((mask[0] > 0.5).any(dim=0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def _place(premultiplied: Tensor, mask: Tensor, size: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Resize (premultiplied rgb, mask) to height×width and paste it in the middle of a size×size
    empty frame."""
    top, left = (size - height) // 2, (size - width) // 2
    rgb_out, mask_out = torch.zeros(3, size, size), torch.zeros(1, size, size)
    rgb_out[:, top:top + height, left:left + width] = _resize(premultiplied, height, width)
    mask_out[:, top:top + height, left:left + width] = _resize(mask, height, width)
    return rgb_out, mask_out


def load_input_image(
    path: str | Path,
    size: int = 256,
    background: str = "white",
    recenter: bool = True,
    object_fraction: float = OBJECT_FRACTION,
) -> tuple[Tensor, Tensor]:
    """-> (rgb (3, size, size) in [0, 1] composited on `background`, mask (1, size, size) in [0, 1]).

    The mask is the alpha channel of an RGBA image (soft; threshold at 0.5 for a binary one, as
    threestudio/data/image.py does). An RGB image gets a binary mask of the pixels that differ from
    the background colour by more than BACKGROUND_TOLERANCE. recenter: the mask's bounding box is
    scaled so its longer side is `object_fraction`·size and centred; otherwise the whole image is
    padded to a square (with empty pixels) and resized, keeping its aspect ratio."""
    if background not in BACKGROUNDS:
        raise UserError(f"prior.background={background!r} is not accepted; use one of: {', '.join(BACKGROUNDS)}.")
    if not 0.0 < object_fraction <= 1.0:
        raise UserError(f"prior.object_fraction={object_fraction!r} is not accepted; use a value in (0, 1].")
    bg = BACKGROUNDS[background]
    path = Path(path)
    rgb, mask = _read_rgba(path, bg)
    premultiplied = rgb * mask  # resize (rgb·α, α), which keeps the composite exact at soft edges
    if recenter:
        top, bottom, left, right = _bbox(mask)
        premultiplied, mask = premultiplied[:, top:bottom, left:right], mask[:, top:bottom, left:right]
    h, w = mask.shape[-2:]
    scale = (object_fraction * size if recenter else size) / max(h, w)
    height, width = max(1, round(h * scale)), max(1, round(w * scale))
    premultiplied, mask = _place(premultiplied, mask, size, height, width)
    mask = mask.clamp(0.0, 1.0)
    return (premultiplied + bg * (1.0 - mask)).clamp(0.0, 1.0), mask
