"""The analytic prior: the exact denoiser of a finite mixture of reference images.

Data distribution per prompt: uniform over K procedural references x_k (prior space [−1, 1]).
For a mixture of points the posterior mean is exact (Tweedie):
    E[x0 | x_t] = Σ_k softmax_k(−‖x_t − √ᾱ x_k‖² / 2(1−ᾱ)) x_k,   ε̂ = (x_t − √ᾱ E[x0|x_t]) / √(1−ᾱ).
Conditional = the prompt's K references; unconditional = the references of every prompt in the
pool plus the prompts conditioned on in this process, so classifier-free guidance is real.

In 3D (conditions built with cameras) the K references of a prompt are procedural 3D shapes
(dsd.priors.shapes) and the mixture is over their renders from each row's camera: the exact
denoiser of "a render of one of the K shapes from this view". `prior.mode` picks what one sample is:

- `text`: one view (SD-like); each view has its own posterior over the K shapes.
- `multiview` (MVDream-like): the F renders of one object at a step are ONE sample, so the
  posterior over k uses all F views together: its logits are the sum of the views' logits
  (Π_f N(x_t^f; √ᾱ·R_k^f, (1−ᾱ)I)), and every view's ε̂ is taken under that joint posterior.
- `image` (Zero-1-to-3-like): the condition is also an input view y of reference
  `image_reference`, observed with Gaussian noise σ = `image_noise` from the input camera: shape
  k's prior weight is ∝ exp(−‖y − R_k(input)‖² / 2σ²), so shapes that look the same from the input
  view stay equally likely (use `prior.data=backs`, whose shapes differ only behind the body).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from dsd.config import PriorConfig
from dsd.errors import UserError
from dsd.priors.base import (
    Condition,
    Prior,
    ReferenceView,
    eps_from_x0,
    resize_pixels,
    scaled_linear_alphas_cumprod,
)
from dsd.priors.procedural import DATA_SETS, reference_images
from dsd.priors.shapes import SHAPE_SETS, reference_shapes, render_shapes, view_params
from dsd.registry import register

MODES = ("text", "multiview", "image")
RENDER_CACHE_VIEWS = 256  # views whose reference renders are kept (the demo's 15° grid has 72)
DEFAULT_POOL = [
    "a hamburger",
    "a red apple",
    "a teapot",
    "a corgi",
    "a space shuttle",
    "an astronaut riding a horse",
    "a blue sports car",
    "a medieval castle",
]


@dataclass
class AnalyticPriorConfig(PriorConfig):
    name: str = "analytic"
    mode: str = "text"  # text (one view, SD-like) | multiview (MVDream-like) | image (Zero123-like)
    num_views: int = 4  # multiview: F views per sample (MVDream's 4)
    image_reference: int = 0  # image: the reference the input view shows
    image_noise: float = 0.05  # image: σ of the input-view observation, in prior space [−1, 1]
    # image: the input view's camera (the same keys as prior=zero123); azimuth 0 is the front, so
    # with data=backs the input view cannot see what the shapes differ in
    input_elevation_deg: float = 0.0
    input_azimuth_deg: float = 0.0
    input_distance: float = 2.0
    input_fovy_deg: float = 50.0
    data: str = "colourways"  # references (2D images, 3D shapes): colourways (decide gradually) | separated
    num_references: int = 8  # K references per prompt
    image_size: int = 32
    pool: list[str] = field(default_factory=lambda: list(DEFAULT_POOL))
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # Stable Diffusion's scaled_linear schedule
    beta_end: float = 0.012
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # of 3D reference renders


@dataclass
class AnalyticCondition(Condition):
    prompt_index: Tensor  # (B,) index into AnalyticPrior.prompts
    view: Optional[Tensor] = None  # (B, 13) camera (3x4 c2w + fovy, shapes.view_params); None: 2D


@register("prior", "analytic", AnalyticPriorConfig)
class AnalyticPrior(Prior):
    name = "analytic"

    def __init__(self, cfg: AnalyticPriorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.mode not in MODES:
            raise UserError(f"prior.mode={cfg.mode!r} is not accepted; use one of: {', '.join(MODES)}.")
        if cfg.data not in SHAPE_SETS:
            raise UserError(f"prior.data={cfg.data!r} is not accepted; use one of: {', '.join(SHAPE_SETS)}.")
        if cfg.data not in DATA_SETS and cfg.mode == "text":
            raise UserError(f"prior.data={cfg.data!r} is 3D only; use prior.mode=multiview or image, or "
                            f"prior.data one of: {', '.join(DATA_SETS)}.")
        if cfg.mode == "multiview" and cfg.num_views < 1:
            raise UserError(f"prior.num_views={cfg.num_views} must be >= 1.")
        if cfg.mode == "image" and not (0 <= cfg.image_reference < cfg.num_references and cfg.image_noise > 0):
            raise UserError(f"prior.image_reference={cfg.image_reference} must be in [0, prior.num_references) "
                            f"and prior.image_noise={cfg.image_noise} > 0.")
        if cfg.num_references < 1 or cfg.image_size < 4:
            raise UserError(
                f"prior.num_references={cfg.num_references} and prior.image_size={cfg.image_size} "
                "must be >= 1 and >= 4."
            )
        self.cfg = cfg
        self.device = torch.device(device)
        self.views_per_sample = cfg.num_views if cfg.mode == "multiview" else 1
        self.needs_cameras = cfg.mode != "text"
        self.alphas_cumprod = scaled_linear_alphas_cumprod(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end
        )
        self.prompts: list[str] = []
        self._shapes: list = []  # per prompt: K GaussianShape (3D references)
        # (view, #prompts) -> (P·K, D) prior space, least recently used dropped first: with
        # continuous cameras every step is a new view (~1.8 MB each at 32 px)
        self._render_cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._input_view: ReferenceView | None = None  # mode=image, set by the first condition()
        self._refs = torch.zeros(0, cfg.num_references, 3 * cfg.image_size**2, dtype=torch.float64)
        for prompt in cfg.pool:
            self._index_of(prompt)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.cfg.image_size, self.cfg.image_size)

    def _index_of(self, prompt: str) -> int:
        key = prompt.strip().lower()
        if key not in self.prompts:
            if self.cfg.data in DATA_SETS:
                images = reference_images(key, self.cfg.num_references, self.cfg.image_size, self.cfg.data)
            else:  # 3D-only data: no 2D references (2D runs are refused in __init__)
                images = torch.zeros(self.cfg.num_references, *self.sample_shape)
            flat = self.encode(images.double()).reshape(1, self.cfg.num_references, -1)
            self._refs = torch.cat([self._refs, flat.to(self._refs)])
            self.prompts.append(key)
            self._shapes.append(reference_shapes(key, self.cfg.num_references, self.cfg.data))
        return self.prompts.index(key)

    def encode(self, images: Tensor) -> Tensor:
        """Pixels -> [−1, 1] at the prior's size (renders at another resolution are resized)."""
        return super().encode(resize_pixels(images, self.sample_shape[1:]))

    def _view_references(self, view: Tensor) -> Tensor:
        """Prior-space renders (P·K, D) of every prompt's shapes from one view (13,), cached (LRU)."""
        key = (tuple(view.tolist()), len(self.prompts))
        if key in self._render_cache:
            self._render_cache.move_to_end(key)
        else:
            background = torch.tensor(self.cfg.background, dtype=torch.float32)
            renders = [render_shapes(shapes, view, self.cfg.image_size, background) for shapes in self._shapes]
            self._render_cache[key] = self.encode(torch.cat(renders)).double().reshape(len(self.prompts) * self.cfg.num_references, -1)
            while len(self._render_cache) > RENDER_CACHE_VIEWS:
                self._render_cache.popitem(last=False)
        return self._render_cache[key]

    def reference_renders(self, prompt: str, cameras) -> Tensor:
        """Renders of the prompt's K shapes from `cameras` in [0, 1], (K, V, 3, S, S)."""
        index, k = self._index_of(prompt), self.cfg.num_references
        views = view_params(cameras)
        refs = torch.stack([self._view_references(v)[index * k : (index + 1) * k] for v in views], dim=1)
        return self.decode(refs.reshape(k, len(views), *self.sample_shape)).float()

    def references(self, prompt: str) -> Tensor:
        """The prompt's K reference images in [0, 1], (K, 3, S, S)."""
        refs = self._refs[self._index_of(prompt)].reshape(-1, *self.sample_shape)
        return self.decode(refs).float()

    def condition(self, prompt: str, batch: int, cameras=None) -> AnalyticCondition:
        index = self._index_of(prompt)
        if self.needs_cameras and cameras is None:
            raise UserError(f"prior.mode={self.cfg.mode} of the analytic prior conditions on cameras; use a 3D "
                            "representation (representation=gaussians or nerf) or prior.mode=text.")
        if self.cfg.mode == "image":
            self._set_input_view(index)
        view = None if cameras is None else view_params(cameras)
        return AnalyticCondition(prompt_index=torch.full((batch,), index, dtype=torch.long), view=view)

    def _references_of_rows(self, cond: AnalyticCondition, device) -> Tensor:
        """(1, P·K, D) shared references in 2D, or (B, P·K, D) renders from each row's view in 3D."""
        if cond.view is None:
            return self._refs.reshape(1, -1, self._refs.shape[-1]).to(device)
        return torch.stack([self._view_references(v) for v in cond.view.cpu()]).to(device)

    def posterior(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, unconditional: Tensor) -> Tensor:
        """p(k | x_t) over all references of all prompts (B, P·K), zero outside each row's set."""
        refs = self._references_of_rows(cond, x_t.device)  # (1 or B, P·K, D)
        return self._posterior(x_t, t, cond, unconditional, refs)

    def input_camera(self):
        """The camera of the input view (mode=image)."""
        from dsd.cameras import orbit_cameras

        one = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
        size = self.cfg.image_size
        return orbit_cameras(one(self.cfg.input_elevation_deg), one(self.cfg.input_azimuth_deg),
                             one(self.cfg.input_distance), one(self.cfg.input_fovy_deg), size, size)

    def reference_view(self) -> ReferenceView | None:
        """mode=image: reference `image_reference` of the first prompt conditioned on, rendered from
        the input camera (rgb over the background, and its opacity as the mask)."""
        if self.cfg.mode != "image":
            return None
        if self._input_view is None:
            raise RuntimeError("reference_view() before any condition(): the prompt is not known yet")
        return self._input_view

    def _set_input_view(self, index: int) -> None:
        if self._input_view is not None:
            return
        camera = self.input_camera()
        background = torch.tensor(self.cfg.background, dtype=torch.float32)
        shape = self._shapes[index][self.cfg.image_reference]
        rgba = render_shapes([shape], view_params(camera)[0], self.cfg.image_size, background, with_alpha=True)[0]
        self._input_view = ReferenceView(camera=camera, rgb=rgba[:3], mask=rgba[3:])

    def _log_input_weights(self, prompt_index: Tensor) -> Tensor:
        """mode=image: log p(y | k) − const for every reference of every prompt, (B, P·K): the
        likelihood of the input view y under shape k's render from the input camera."""
        y = self.encode(self._input_view.rgb[None].double()).reshape(1, -1)
        renders = self._view_references(view_params(self.input_camera())[0])  # (P·K, D)
        log_w = -((renders - y) ** 2).sum(-1) / (2 * self.cfg.image_noise**2)
        return log_w[None].expand(len(prompt_index), -1)

    def _posterior(self, x_t, t, cond, unconditional, refs) -> Tensor:
        x = x_t.reshape(len(x_t), -1).double()
        a = self.alpha(t.cpu()).to(x.device)[:, None]  # (B, 1)
        # ‖x − √a·x_k‖², expanded so it is one (batched) matmul; float64 keeps the cancellation harmless.
        cross = torch.einsum("bd,rnd->bn", x, refs) if len(refs) == 1 else torch.einsum("bd,bnd->bn", x, refs)
        d2 = (x**2).sum(1, keepdim=True) - 2 * a.sqrt() * cross + a * (refs**2).sum(-1)
        logits = -d2 / (2 * (1 - a))
        owner = torch.arange(len(self.prompts), device=x.device).repeat_interleave(self.cfg.num_references)
        allowed = unconditional[:, None].to(x.device) | (
            owner[None] == cond.prompt_index.to(x.device)[:, None]
        )
        if self.cfg.mode == "image":  # the input view weighs the conditional rows' shapes
            log_w = self._log_input_weights(cond.prompt_index).to(x.device)
            logits = logits + torch.where(unconditional[:, None].to(x.device), torch.zeros_like(log_w), log_w)
        logits = logits.masked_fill(~allowed, float("-inf"))
        f = self.views_per_sample
        if f > 1:  # one object's F views are one sample: joint likelihood, one posterior
            if len(x) % f:
                raise ValueError(f"{len(x)} rows are not whole objects of {f} views")
            joint = torch.softmax(logits.reshape(-1, f, logits.shape[-1]).sum(1), dim=1)
            return joint.repeat_interleave(f, dim=0)
        return torch.softmax(logits, dim=1)

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, unconditional: Tensor) -> Tensor:
        refs = self._references_of_rows(cond, x_t.device)
        weights = self._posterior(x_t, t, cond, unconditional, refs)  # (B, P·K)
        mean = torch.einsum("bn,rnd->bd", weights, refs) if len(refs) == 1 else torch.einsum("bn,bnd->bd", weights, refs)
        x0 = mean.reshape(x_t.shape)  # E[x0 | x_t]
        return eps_from_x0(x_t.double(), x0, self.alpha(t.cpu()).to(x_t.device)).to(x_t.dtype)
