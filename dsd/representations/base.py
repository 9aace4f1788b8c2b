"""The Representation interface: one instance per seed."""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from torch import Tensor

from dsd.cameras import Cameras


class Representation(torch.nn.Module, abc.ABC):
    """Something that renders images to be scored by the prior.

    `render` returns (V, C, H, W): pixels in [0, 1], or prior-space tensors when
    `outputs_prior_space` is True (an image optimized directly in the prior's latent space).
    The trainer's order per step: render -> prior/guidance -> backward -> optimizer.step() ->
    `after_step` (densification, pruning, schedules).
    """

    outputs_prior_space: bool = False
    is_3d: bool = False  # 3D representations are rendered from sampled Cameras

    @abc.abstractmethod
    def render(self, cameras: Cameras | None = None) -> Tensor:
        """Render the views in `cameras` (None for 2D). (V, C, H, W) with V = len(cameras).
        3D representations also take `with_alpha=True`: (V, 4, H, W), the opacity last."""

    @abc.abstractmethod
    def final_image(self, prior, cameras: Cameras | None = None) -> Tensor:
        """The image for result.npz: (H, W, 3) in [0, 1], from the first evaluation camera."""

    @abc.abstractmethod
    def initialize_to(self, target: Tensor, prior, cameras: Cameras | None = None) -> None:
        """Start from prior-space images `target` (V, C, H, W) (e.g. DSD's x0(g_0)); a 3D
        representation fits its renders from `cameras` to them (see `fit_renders`)."""

    def make_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        """The optimizer of this representation. `lr` is trainer.lr (or the guidance's override);
        3D representations may scale it per parameter group."""
        from dsd.trainer import make_optimizer

        return make_optimizer(self.parameters(), name, lr)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027
        """Called after optimizer.step() (gradients still present): densify/prune, schedules."""

    def regularizers(self) -> dict[str, Tensor]:
        """Weighted regularization losses of the last render, added to the guidance loss."""
        return {}

    def export(self, out_dir: Path, prior) -> list[Path]:
        """Write representation-specific files (ply, mesh); returns their paths."""
        return []


def fit_renders(representation: Representation, pixels: Tensor, cameras: Cameras, steps: int = 100,
                lr: float = 0.01) -> float:
    """Fit `representation`'s renders from `cameras` to `pixels` (V, 3, H, W) in [0, 1] by Adam on
    the MSE (the 3D analogue of starting a 2D image at a target). Returns the final MSE."""
    optimizer = representation.make_optimizer("adam", lr)
    loss = torch.zeros(())
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(representation.render(cameras), pixels)
        loss.backward()
        optimizer.step()  # no after_step: densification thresholds are tuned for the guidance loss
    return float(loss.detach())
