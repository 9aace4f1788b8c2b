"""representation=gaussians: 3D Gaussian splatting (Kerbl et al. 2023) rendered by dsd.render.gaussians.

Parameters are stored raw, as in 3DGS: means, log-scales, quaternions (wxyz), opacity logits and
color logits (colors = sigmoid, view-independent). Densification is 3DGS's adaptive density control
(clone small / split large gaussians with a large mean screen-space gradient, prune transparent
ones), written for one optimizer with one parameter group per tensor.

Per-gaussian noise (`point_noise`, for CFD's noise attached to the 3D representation): a fixed
N(0, I) vector per gaussian, kept as a buffer so checkpoints carry it. It follows its gaussian
through densification; clone copies and split children are new gaussians with fresh vectors (a
copy sharing its parent's noise would correlate the two, and the blended noise would no longer
have unit variance), drawn from the same stream, whose generator state is a buffer as well: a
resumed run draws exactly what the uninterrupted one draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dsd.cameras import Cameras, orbit_cameras
from dsd.config import RepresentationConfig
from dsd.errors import UserError
from dsd.export_ply import read_gaussians_ply, write_gaussians_ply
from dsd.registry import register
from dsd.render.gaussians import blend_features, rasterize_gaussians
from dsd.representations.base import Representation, fit_renders

_said_lr_ignored = False  # the note below is printed once per process

PARAMS = ("means", "log_scales", "quats", "opacity_logits", "color_logits")


@dataclass
class GaussiansConfig(RepresentationConfig):
    name: str = "gaussians"
    backend: str = "auto"  # auto (gsplat on CUDA, else torch) | gsplat | torch
    num_points: int = 2000
    init_radius: float = 0.5  # points uniform in a ball of this radius around the origin
    init_scale: float = 0.03  # about the mean spacing of 2000 points in that ball, halved
    init_opacity: float = 0.1
    init_seed: int = 0  # the same init for every seed: diversity must come from the guidance
    # White, as DreamGaussian/GaussianDreamer render for SDS: empty space reads as "no object".
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # Adam learning rates per group (absolute; trainer.lr is ignored). DreamGaussian's values
    # (position 1e-3, opacity 0.05, scaling 5e-3, rotation 5e-3), raised for runs of a few hundred steps.
    lr_means: float = 0.005
    lr_scales: float = 0.01
    lr_quats: float = 0.005
    lr_opacities: float = 0.05
    lr_colors: float = 0.05
    # 3DGS adaptive density control (its defaults: from 500, until 15k, every 100, grad 2e-4,
    # prune opacity 0.005, percent_dense 0.01), shortened for runs of a few hundred steps.
    densify_from: int = 100
    densify_until: int = 300
    densify_every: int = 50
    grad_threshold: float = 0.0002  # mean |∂L/∂means2d| in NDC units (gsplat's normalization)
    split_scale: float = 0.01  # max scale above which a gaussian is split, not cloned (× unit scene)
    prune_opacity: float = 0.005
    max_points: int = 5000
    # regularizer weights (0: off): mean opacity (sparsity) and mean of the largest scale
    opacity_reg: float = 0.0
    scale_reg: float = 0.0
    init_fit_steps: int = 100  # Adam steps fitting the renders to a guidance's initial target
    # the view of render(None) / final_image(None): front, slightly above
    view_elevation: float = 15.0
    view_distance: float = 2.5
    view_fovy: float = 40.0


def _random_unit_ball(n: int, generator: torch.Generator) -> Tensor:
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    return direction * torch.rand(n, 1, generator=generator) ** (1 / 3)  # uniform in volume


@register("representation", "gaussians", GaussiansConfig)
class GaussiansRepresentation(Representation):
    is_3d = True

    def __init__(self, cfg: GaussiansConfig, prior, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.backend not in ("auto", "gsplat", "torch"):
            raise UserError(f"representation.backend={cfg.backend!r} is not accepted; use auto, gsplat or torch.")
        if len(cfg.background) != 3:
            raise UserError(f"representation.background={list(cfg.background)} must be 3 floats (RGB in [0, 1]).")
        if cfg.num_points <= 0 or cfg.init_scale <= 0 or not 0 < cfg.init_opacity < 1:
            raise UserError("representation.num_points and init_scale must be positive and init_opacity in (0, 1); "
                            f"got {cfg.num_points}, {cfg.init_scale}, {cfg.init_opacity}.")
        self.cfg = cfg
        self.height, self.width = prior.image_shape[1:]
        n, g = cfg.num_points, torch.Generator().manual_seed(cfg.init_seed)
        init = {
            "means": cfg.init_radius * _random_unit_ball(n, g),
            "log_scales": torch.full((n, 3), float(cfg.init_scale)).log(),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "opacity_logits": torch.full((n,), float(cfg.init_opacity)).logit(),
            "color_logits": torch.zeros(n, 3),  # gray 0.5
        }
        for name in PARAMS:
            setattr(self, name, torch.nn.Parameter(init[name].to(device)))
        # running sums of the screen-space gradient norm and of visibility, for densification
        self.register_buffer("grad_sum", torch.zeros(n, device=device))
        self.register_buffer("grad_count", torch.zeros(n, device=device))
        background = torch.tensor(list(cfg.background), dtype=torch.float32, device=device)
        self.register_buffer("background", background, persistent=False)  # the config decides, not a checkpoint
        # per-gaussian noise and its stream's generator state: None until `point_noise` is first asked
        self.register_buffer("noise", None)
        self.register_buffer("noise_stream", None)
        self._info = None  # RasterInfo of the last differentiable render

    # ---- activations -------------------------------------------------------------------------
    @property
    def num_points(self) -> int:
        return len(self.means)

    def activated(self) -> dict[str, Tensor]:
        return {"means": self.means, "quats": self.quats, "scales": self.log_scales.exp(),
                "opacities": self.opacity_logits.sigmoid(), "colors": self.color_logits.sigmoid()}

    def default_cameras(self) -> Cameras:
        full = lambda v: torch.tensor([float(v)])  # noqa: E731
        return orbit_cameras(full(self.cfg.view_elevation), full(0.0), full(self.cfg.view_distance),
                             full(self.cfg.view_fovy), self.width, self.height)

    # ---- Representation ----------------------------------------------------------------------
    def render(self, cameras: Cameras | None = None, with_alpha: bool = False) -> Tensor:
        """(V, 3, H, W) in [0, 1] (with alpha: (V, 4, H, W)); None renders the default front view."""
        cameras = self.default_cameras() if cameras is None else cameras
        p = self.activated()
        rgb, alpha, info = rasterize_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], p["colors"],
                                               cameras, self.background, self.cfg.backend)
        if torch.is_grad_enabled() and info.means2d.requires_grad:
            self._info = info
        return torch.cat([rgb, alpha], dim=1) if with_alpha else rgb

    def render_features(self, features: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
        """Per-gaussian features (N, K) blended with the colour's geometry and weights w_i at the
        cameras' own size: Σ w_i f_i (V, K, H, W), Σ w_i² (V, 1, H, W), alpha (V, 1, H, W)."""
        p = self.activated()
        return blend_features(p["means"], p["quats"], p["scales"], p["opacities"], features.to(p["means"]), cameras)

    def point_noise(self, stream_seed: int, channels: int) -> Tensor:
        """The fixed N(0, I) vector of every gaussian (N, channels), drawn from the generator seeded by
        `stream_seed` on first use; gaussians added later draw the stream's next values."""
        if self.noise is None:
            generator = torch.Generator().manual_seed(stream_seed)
            self.noise = torch.randn(self.num_points, channels, generator=generator).to(self.means.device)
            self.noise_stream = generator.get_state()
        if self.noise.shape[1] != channels:
            raise ValueError(f"the gaussians carry {self.noise.shape[1]}-channel noise; {channels} were asked")
        return self.noise

    def _draw_noise(self, count: int) -> Tensor:
        """`count` fresh vectors from the noise stream, which advances (its state is a buffer)."""
        generator = torch.Generator()
        generator.set_state(self.noise_stream.cpu())
        fresh = torch.randn(count, self.noise.shape[1], generator=generator).to(self.noise)
        self.noise_stream = generator.get_state().to(self.noise_stream.device)
        return fresh

    @torch.no_grad()
    def final_image(self, prior, cameras: Cameras | None = None) -> Tensor:
        cameras = self.default_cameras() if cameras is None else cameras.rows([0])
        return self.render(cameras)[0].clamp(0, 1).permute(1, 2, 0).float().cpu()

    def initialize_to(self, target: Tensor, prior, cameras: Cameras | None = None) -> None:
        cameras = self.default_cameras() if cameras is None else cameras
        pixels = prior.decode(target).to(self.means.device).float().clamp(0, 1)
        fit_renders(self, pixels, cameras, steps=self.cfg.init_fit_steps)

    def make_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        """Adam (or SGD) with one group per tensor and the config's learning rates; `lr` is ignored
        because the groups differ by orders of magnitude (3DGS)."""
        from dsd.config import TrainerConfig
        from dsd.trainer import make_optimizer

        global _said_lr_ignored
        if lr != TrainerConfig.lr and not _said_lr_ignored:  # a user's lr must not vanish silently
            from dsd.logging import console

            console.print(f"note: learning rate {lr:g} (trainer.lr or guidance.lr) is not used by "
                          "representation=gaussians; set representation.lr_means/lr_scales/lr_quats/"
                          "lr_opacities/lr_colors instead.", markup=False, soft_wrap=True)
            _said_lr_ignored = True
        c = self.cfg
        lrs = dict(zip(PARAMS, (c.lr_means, c.lr_scales, c.lr_quats, c.lr_opacities, c.lr_colors)))
        return make_optimizer([{"params": [getattr(self, n)], "lr": lrs[n], "name": n} for n in PARAMS], name, lr)

    def regularizers(self) -> dict[str, Tensor]:
        losses = {}
        if self.cfg.opacity_reg:
            losses["opacity"] = self.cfg.opacity_reg * self.opacity_logits.sigmoid().mean()
        if self.cfg.scale_reg:
            losses["scale"] = self.cfg.scale_reg * self.log_scales.exp().amax(dim=-1).mean()
        return losses

    def export(self, out_dir: Path, prior) -> list[Path]:
        return [self.save_ply(Path(out_dir) / "gaussians.ply")]

    def save_ply(self, path: Path) -> Path:
        return write_gaussians_ply(path, self.means, self.log_scales, torch.nn.functional.normalize(self.quats, dim=-1),
                                   self.opacity_logits, self.color_logits.sigmoid())

    @torch.no_grad()
    def load_ply(self, path: Path) -> None:
        """Replace the gaussians by those of a 3DGS-layout ply (see dsd.export_ply). Build the
        optimizer afterwards: the number of gaussians changes."""
        data = read_gaussians_ply(path)
        data["color_logits"] = data.pop("colors").clamp(1e-6, 1 - 1e-6).logit()
        self._resize(len(data["means"]))
        for name in PARAMS:
            getattr(self, name).copy_(data[name])
        self.noise = self.noise_stream = None  # other gaussians: their noise is drawn afresh when asked

    # ---- checkpoints: the number of gaussians changes during a run ---------------------------------
    def _resize(self, n: int) -> None:
        # New Parameter objects: resizing .data in place leaves autograd's cached gradient
        # accumulator with the old shape. Build the optimizer after this (the trainer does).
        self._info = None
        for name in PARAMS:
            old = getattr(self, name)
            setattr(self, name, torch.nn.Parameter(old.new_zeros((n, *old.shape[1:]))))
        for name in ("grad_sum", "grad_count"):
            setattr(self, name, getattr(self, name).new_zeros(n))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._resize(len(state_dict["means"]))
        for name in ("noise", "noise_stream"):  # present once a guidance asked for point noise
            if name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[name], device=self.means.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- densification (3DGS Sec. 5.2) ---------------------------------------------------------
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        c, info = self.cfg, self._info
        self._info = None
        if step >= c.densify_until or info is None or info.means2d.grad is None:
            return
        with torch.no_grad():
            grad = info.means2d.grad.clone()  # (V, N, 2); ×(W/2, H/2)·V as gsplat: NDC units, mean loss over views
            grad[..., 0] *= self.width / 2 * len(grad)
            grad[..., 1] *= self.height / 2 * len(grad)
            visible = info.visible.float()
            self.grad_sum += (grad.norm(dim=-1) * visible).sum(0)
            self.grad_count += visible.sum(0)
            if step >= c.densify_from and (step + 1) % c.densify_every == 0:
                self.densify_and_prune(optimizer, torch.Generator().manual_seed(c.init_seed + step))

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        c = self.cfg
        mean_grad = self.grad_sum / self.grad_count.clamp(min=1)
        candidates = mean_grad > c.grad_threshold
        budget = max(0, c.max_points - self.num_points)
        if candidates.sum() > budget:  # keep the largest gradients within the cap
            order = mean_grad.argsort(descending=True)[:budget]
            candidates = torch.zeros_like(candidates)
            candidates[order] = True
        large = self.log_scales.exp().amax(dim=-1) > c.split_scale
        opaque = self.opacity_logits.sigmoid() >= c.prune_opacity
        clone, split = candidates & ~large & opaque, candidates & large & opaque
        # a split gaussian becomes two, sampled from itself, with scales / 1.6 (3DGS)
        new = {n: getattr(self, n)[split].repeat(2, *[1] * (getattr(self, n).dim() - 1)) for n in PARAMS}
        scales = self.log_scales[split].exp().repeat(2, 1)
        offsets = torch.randn(scales.shape, generator=generator).to(scales) * scales
        from gsplat.cuda._torch_impl import _quat_to_rotmat

        rotations = _quat_to_rotmat(new["quats"])
        new["means"] = new["means"] + (rotations @ offsets[..., None])[..., 0]
        new["log_scales"] = (scales / 1.6).log()
        keep = ~split & opaque
        if not keep.any() and not len(new["means"]):
            keep[self.opacity_logits.argmax()] = True  # never prune everything
        index = torch.cat([keep.nonzero()[:, 0], clone.nonzero()[:, 0]])
        self._reindex(optimizer, index, new)

    def _reindex(self, optimizer: torch.optim.Optimizer, index: Tensor, new: dict[str, Tensor]) -> None:
        """Keep rows `index` (in that order; repeats are clones) and append `new`. Adam's moments
        follow their rows (clones copy them, as gsplat) and start at zero for split children; the
        Parameters are replaced by new ones and the optimizer's groups and state follow them."""
        for name in PARAMS:
            old = getattr(self, name)
            param = torch.nn.Parameter(torch.cat([old.data[index], new[name]]))
            setattr(self, name, param)  # a new Parameter: see _resize
            state = optimizer.state.pop(old, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:  # moments (N, ...); Adam's step is a scalar
                    state[key] = torch.cat([value[index], value.new_zeros((len(new[name]), *value.shape[1:]))])
            optimizer.state[param] = state
            for group in optimizer.param_groups:
                group["params"] = [param if p is old else p for p in group["params"]]
        n = len(self.means)
        self.grad_sum = self.grad_sum.new_zeros(n)
        self.grad_count = self.grad_count.new_zeros(n)
        if self.noise is not None:
            self.noise = self._follow(self.noise, index, len(new["means"]))

    def _follow(self, noise: Tensor, index: Tensor, added: int) -> Tensor:
        """The per-gaussian noise after keeping rows `index` and appending `added` gaussians: a kept
        gaussian keeps its vector; a repeat of a row (a clone) and an appended one get fresh ones."""
        position = torch.arange(len(index), device=index.device)
        first = torch.full((len(noise),), len(index), device=index.device).scatter_reduce(0, index, position, "amin")
        repeat = first[index] != position
        kept = noise[index]
        kept[repeat] = self._draw_noise(int(repeat.sum()))
        return torch.cat([kept, self._draw_noise(added)])
