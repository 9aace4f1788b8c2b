"""Image features (CLIP vision / DINOv2) and CLIP text-image similarity, via transformers.

Preprocessing is done in torch on float images (N, 3, H, W) in [0, 1]: resize the shortest edge
(bicubic, antialiased), centre crop, normalise. Sizes and mean/std come from the checkpoint's
preprocessor_config.json when it has one (as the hub checkpoints do), otherwise from the defaults of
the model's image processor (CLIP: image_size/image_size and OpenAI's mean/std; DINOv2: 256/224 and
ImageNet's, transformers' BitImageProcessor defaults as used by facebook/dinov2-*). No torchvision,
no PIL round trip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dsd.errors import UserError

# transformers/image_utils.py: OPENAI_CLIP_MEAN/STD and IMAGENET_DEFAULT_MEAN/STD
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("clip", "dinov2")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shortest edge to `shortest_edge` (or to exactly `size` (h, w)), centre-crop `crop`, normalise."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        x = images.float()
        h, w = x.shape[-2:]
        if self.size is not None:
            target = self.size
        elif self.shortest_edge is not None:
            scale = self.shortest_edge / min(h, w)
            target = (max(self.shortest_edge, round(h * scale)), max(self.shortest_edge, round(w * scale)))
        else:
            target = (h, w)
        if target != (h, w):
            x = F.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=True)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop
            top, left = max((h - ch) // 2, 0), max((w - cw) // 2, 0)
            x = x[..., top : top + ch, left : left + cw]
        x = x.clamp(0, 1)  # bicubic overshoots; the PIL pipeline clips to uint8
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _pair(value) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value["height"]), int(value["width"])
    return int(value), int(value)


def preprocess_from_config(config: dict, default: Preprocess) -> Preprocess:
    """A Preprocess from a preprocessor_config.json dict (transformers' image processor keys)."""
    size, shortest, target = config.get("size"), default.shortest_edge, default.size
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest, target = int(size["shortest_edge"]), None
    elif size is not None:
        shortest, target = None, _pair(size)
    crop = default.crop
    if "crop_size" in config:
        crop = _pair(config["crop_size"])
    if config.get("do_center_crop") is False:
        crop = None
    return Preprocess(shortest_edge=shortest, size=target, crop=crop,
                      mean=tuple(config.get("image_mean", default.mean)),
                      std=tuple(config.get("image_std", default.std)))


def _local_files_only() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _preprocessor_file(path_or_id: str) -> dict | None:
    """The checkpoint's preprocessor_config.json as a dict: from the folder, or from the hub cache."""
    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        file = folder / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path_or_id, "preprocessor_config.json")
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _load_error(key: str, value: str, what: str, err: Exception) -> UserError:
    return UserError(
        f"{key}={value!r} could not be loaded as {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"no weights can be downloaded here: point {key} at a local folder saved with save_pretrained "
        "(or a hub id already in the Hugging Face cache)."
    )


def _check_path(path_or_id: str, key: str, what: str) -> str:
    """Fail fast on a local-looking path that does not exist (hub ids are `org/name`)."""
    value = os.path.expanduser(path_or_id)
    looks_local = value.startswith((os.sep, ".", "~")) or value.count("/") > 1
    if not value or (looks_local and not os.path.isdir(value)):
        raise _load_error(key, path_or_id, what, FileNotFoundError(f"no directory {value}"))
    return value


class ImageEncoder:
    """Global image features: CLIP's projected image embedding or DINOv2's CLS token (after the final norm)."""

    def __init__(self, model: torch.nn.Module, kind: str, preprocess: Preprocess, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.kind, self.preprocess, self.device = kind, preprocess, device

    @classmethod
    def from_pretrained(cls, path_or_id: str, kind: Literal["clip", "dinov2"], key: str,
                        device: str = "cpu") -> ImageEncoder:
        if kind not in KINDS:
            raise UserError(f"{key} kind={kind!r} is not accepted; use one of: {', '.join(KINDS)}.")
        what = "a CLIP vision model" if kind == "clip" else "a DINOv2 model"
        value = _check_path(path_or_id, key, what)
        from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection, Dinov2Model

        try:
            config = AutoConfig.from_pretrained(value, local_files_only=_local_files_only())
            if kind == "clip":
                # A full CLIP checkpoint (openai/clip-vit-*) keeps projection_dim outside its vision
                # config, so the vision-only class would silently re-initialise the projection.
                model_cls = CLIPModel if config.model_type == "clip" else CLIPVisionModelWithProjection
            else:
                model_cls = Dinov2Model
            model = _checked_from_pretrained(model_cls, value, key, path_or_id)
            file = _preprocessor_file(value)
        except (OSError, ValueError, KeyError) as err:
            raise _load_error(key, path_or_id, what, err) from None
        if kind == "clip":
            vision = getattr(model.config, "vision_config", model.config)
            side = vision.image_size
            default = Preprocess(side, None, (side, side), CLIP_MEAN, CLIP_STD)
        else:
            default = Preprocess(256, None, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
        preprocess = default if file is None else preprocess_from_config(file, default)
        return cls(model, kind, preprocess, device)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) float32 features on the CPU."""
        pixels = self.preprocess(images.to(self.device))
        if self.kind == "clip" and hasattr(self.model, "get_image_features"):
            rows = _embedding(self.model.get_image_features(pixel_values=pixels))
        elif self.kind == "clip":
            rows = self.model(pixel_values=pixels).image_embeds
        else:
            rows = self.model(pixel_values=pixels).pooler_output
        return rows.float().cpu()

    __call__ = features  # usable as a `fid` extractor


class ClipScorer:
    """CLIP-SIM: cosine similarity of CLIP image and text embeddings.

    `similarity` returns the plain cosine, in [-1, 1]. The paper's CLIP-SIM column is 100 x cosine
    (Table 2: 27.69 ... 28.97 are typical CLIP ViT cosines of ~0.28 times 100); multiply by
    `PAPER_SCALE` to report it in the paper's units."""

    PAPER_SCALE = 100.0

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: Preprocess, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.preprocess, self.device = tokenizer, preprocess, device

    @classmethod
    def from_pretrained(cls, path_or_id: str, key: str, device: str = "cpu") -> ClipScorer:
        what = "a CLIP model (weights and tokenizer)"
        value = _check_path(path_or_id, key, what)
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        try:
            local = _local_files_only()
            model_type = AutoConfig.from_pretrained(value, local_files_only=local).model_type
            if model_type != "clip":
                raise UserError(f"{key}={path_or_id!r} is a {model_type!r} checkpoint; CLIP-SIM needs a full CLIP "
                                "model (image and text towers, e.g. a local copy of openai/clip-vit-large-patch14).")
            model = _checked_from_pretrained(CLIPModel, value, key, path_or_id)
            tokenizer = AutoTokenizer.from_pretrained(value, local_files_only=local)
            file = _preprocessor_file(value)
        except (OSError, ValueError, KeyError) as err:
            raise _load_error(key, path_or_id, what, err) from None
        side = model.config.vision_config.image_size
        default = Preprocess(side, None, (side, side), CLIP_MEAN, CLIP_STD)
        preprocess = default if file is None else preprocess_from_config(file, default)
        return cls(model, tokenizer, preprocess, device)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer([prompt], truncation=True, max_length=limit, return_tensors="pt")
        return _embedding(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device)))

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        return _embedding(self.model.get_image_features(pixel_values=self.preprocess(images.to(self.device))))

    def similarity(self, images: Tensor, prompt: str) -> Tensor:
        """(N, 3, H, W) in [0, 1] and a prompt -> (N,) cosine similarities in [-1, 1] (not x100)."""
        image = F.normalize(self.image_embeddings(images).float(), dim=-1)
        text = F.normalize(self.text_embedding(prompt).float(), dim=-1)
        return (image @ text.T).squeeze(1).cpu()


def _checked_from_pretrained(model_cls, value: str, key: str, path_or_id: str):
    """from_pretrained that refuses weights it would have to re-initialise (missing or mis-shaped keys);
    unexpected keys are fine (e.g. a full CLIP checkpoint's text tower under the vision-only class)."""
    try:
        model, info = model_cls.from_pretrained(value, local_files_only=_local_files_only(), output_loading_info=True)
    except RuntimeError as err:  # transformers raises this for mis-shaped tensors
        raise _load_error(key, path_or_id, f"{model_cls.__name__} weights", err) from None
    bad = sorted(info.get("missing_keys", [])) + sorted(str(k) for k in info.get("mismatched_keys", []))
    if bad:
        raise UserError(f"{key}={path_or_id!r} does not hold {model_cls.__name__} weights: {len(bad)} tensors would be "
                        f"randomly initialised (e.g. {bad[0]}); point {key} at a matching checkpoint folder.")
    return model


def _embedding(out) -> Tensor:
    """get_*_features returns a tensor in older transformers and a model output (pooler_output) in newer."""
    return out if isinstance(out, Tensor) else out.pooler_output
