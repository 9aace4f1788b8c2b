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
    """

    outputs_prior_space: bool = False
    is_3d: bool = False  # 3D representations are rendered from sampled Cameras

    @abc.abstractmethod
    def render(self, cameras: Cameras | None = None) -> Tensor:
        """Render the views in `cameras` (None for 2D). (V, C, H, W) with V = len(cameras)."""

    @abc.abstractmethod
    def final_image(self, prior, cameras: Cameras | None = None) -> Tensor:
        """The image for result.npz: (H, W, 3) in [0, 1], from the first evaluation camera."""

    @abc.abstractmethod
    def initialize_to(self, target: Tensor, prior, cameras: Cameras | None = None) -> None:
        """Start from prior-space images `target` (V, C, H, W) (e.g. DSD's x0(g_0)); a 3D
        representation fits its renders from `cameras` to them."""

    def regularizers(self) -> dict[str, Tensor]:
        """Weighted regularization losses, added to the guidance loss."""
        return {}

    def export(self, out_dir: Path, prior) -> list[Path]:
        """Write representation-specific files (ply, mesh, video); returns their paths."""
        return []
