"""representation=image: one optimizable image per seed, in the prior's space or in pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsd.config import RepresentationConfig
from dsd.errors import UserError
from dsd.registry import register
from dsd.representations.base import Representation


@dataclass
class ImageConfig(RepresentationConfig):
    name: str = "image"
    space: str = "latent"  # latent: the prior's space (pixels in [−1, 1] for pixel priors) | pixel
    init: str = "zeros"  # zeros (prior-space 0: mid-gray for pixel priors) | gray (pixels 0.5)


@register("representation", "image", ImageConfig)
class ImageRepresentation(Representation):
    """The same init for every seed, so any diversity comes from the guidance, not the init."""

    def __init__(self, cfg: ImageConfig, prior, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.space not in ("latent", "pixel"):
            raise UserError(f"representation.space={cfg.space!r} is not accepted; use latent or pixel.")
        if cfg.init not in ("zeros", "gray"):
            raise UserError(f"representation.init={cfg.init!r} is not accepted; use zeros or gray.")
        self.cfg = cfg
        self.outputs_prior_space = cfg.space == "latent"
        if self.outputs_prior_space:
            shape = prior.sample_shape
            init = (
                torch.zeros(1, *shape)
                if cfg.init == "zeros"
                else prior.encode(torch.full((1, 3, *prior.image_shape[1:]), 0.5))
            )
        else:
            shape = prior.image_shape
            init = (
                torch.full((1, *shape), 0.5)
                if cfg.init == "gray"
                else prior.decode(torch.zeros(1, *prior.sample_shape))
            )
        self.image = torch.nn.Parameter(init.to(device=device, dtype=torch.float32).detach().clone())

    def render(self, cameras=None) -> Tensor:
        return self.image

    @torch.no_grad()
    def initialize_to(self, target: Tensor, prior, cameras=None) -> None:
        self.image.copy_(target if self.outputs_prior_space else prior.decode(target))

    @torch.no_grad()
    def final_image(self, prior, cameras=None) -> Tensor:
        pixels = prior.decode(self.image) if self.outputs_prior_space else self.image.clamp(0, 1)
        return pixels[0].permute(1, 2, 0).float().cpu()
