"""LPIPS (Zhang et al. 2018) with our own backbone definition, so it needs no torchvision.

distance(a, b) = sum over tapped layers l of mean over pixels of  w_l . (f_l(a) - f_l(b))^2,
where f_l are the backbone's ReLU activations with each pixel's channel vector scaled to unit
length and w_l >= 0 are the learned 1x1 "linear" heads. Images go in as [0, 1], are mapped to
[-1, 1] and then through LPIPS' fixed scaling layer (lpips/lpips.py ScalingLayer, v0.1).

Weights come from two local files:
- backbone: torchvision's ImageNet state dict (alexnet-owt-7be5be79.pth / vgg16-397923af.pth;
  keys features.<i>.weight/bias; the classifier.* keys in that file are ignored);
- linear: the lpips package's v0.1 heads (lpips/weights/v0.1/alex.pth or vgg.pth inside the `lpips`
  wheel on PyPI; keys lin<k>.model.1.weight of shape (1, C_k, 1, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsd.errors import UserError
from dsd.metrics.fid import _load_state_dict, _load_strict

# lpips/lpips.py ScalingLayer: per-channel shift and scale applied after mapping to [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips/__init__.py normalize_tensor


@dataclass(frozen=True)
class Backbone:
    """A torchvision `features` stack: ("conv", cin, cout, kernel, stride, padding) | ("relu",) | ("pool",)."""

    layers: tuple[tuple, ...]
    taps: tuple[int, ...]  # indices of the ReLUs whose outputs LPIPS compares
    files: str  # what to download, for error messages


def _vgg16_layers() -> tuple[tuple, ...]:
    layers, cin = [], 3
    for width in (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool"):
        if width == "pool":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", cin, width, 3, 1, 1), ("relu",)]
            cin = width
    return tuple(layers)


# torchvision/models/alexnet.py AlexNet.features and vgg.py cfg "D"; taps from lpips/pretrained_networks.py
# (alexnet slices end at 2, 5, 8, 10, 12; vgg16 at 4, 9, 16, 23, 30).
BACKBONES = {
    "alex": Backbone(
        layers=(("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2), ("conv", 64, 192, 5, 1, 2), ("relu",),
                ("pool", 3, 2), ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
                ("conv", 256, 256, 3, 1, 1), ("relu",), ("pool", 3, 2)),
        taps=(1, 4, 7, 9, 11),
        files="torchvision's alexnet-owt-7be5be79.pth and lpips' weights/v0.1/alex.pth",
    ),
    "vgg": Backbone(layers=_vgg16_layers(), taps=(3, 8, 15, 22, 29),
                    files="torchvision's vgg16-397923af.pth and lpips' weights/v0.1/vgg.pth"),
}


def _build(layer: tuple) -> nn.Module:
    if layer[0] == "conv":
        _, cin, cout, kernel, stride, padding = layer
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    if layer[0] == "relu":
        return nn.ReLU()
    return nn.MaxPool2d(layer[1], stride=layer[2])


class _LinearHead(nn.Module):
    """1x1 conv to one channel, no bias; a parameter-free slot first so keys read `model.1.weight` as in lpips."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance; forward(a, b) with images (N, 3, H, W) in [0, 1] -> (N,) distances."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in BACKBONES:
            raise UserError(f"LPIPS net={net!r} is not accepted; use one of: {', '.join(BACKBONES)}.")
        self.net, spec = net, BACKBONES[net]
        self.features = nn.Sequential(*[_build(layer) for layer in spec.layers[: max(spec.taps) + 1]])
        self.taps = spec.taps
        for k, width in enumerate(self._tap_widths(spec)):
            self.add_module(f"lin{k}", _LinearHead(width))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @staticmethod
    def _tap_widths(spec: Backbone) -> list[int]:
        widths, width = [], 3
        for i, layer in enumerate(spec.layers):
            width = layer[2] if layer[0] == "conv" else width
            if i in spec.taps:
                widths.append(width)
        return widths

    @classmethod
    def from_files(cls, backbone: str, linear: str, net: str = "alex", key: str = "--lpips") -> LPIPS:
        """Backbone from torchvision's state dict file, heads from the lpips package's linear weights file."""
        model = cls(net)
        what = BACKBONES[net].files
        state = _load_state_dict(backbone, f"{key} backbone", what)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        others = [k for k in state if not k.startswith(("features.", "classifier."))]
        if others:
            raise UserError(f"{key} backbone={backbone!r} is not a torchvision {net} state dict "
                            f"(unexpected keys such as {others[:3]}); expected {what}.")
        # torchvision's file also holds the layers after the last tap (a final max pool has no weights).
        _load_strict(model.features, features, backbone, f"{key} backbone")
        heads = _load_state_dict(linear, f"{key} linear", what)
        _load_strict(nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(len(model.taps))}),
                     heads, linear, f"{key} linear")
        return model

    def unit_features(self, images: Tensor) -> list[Tensor]:
        """The tapped activations of images in [0, 1], each pixel's channel vector scaled to unit length."""
        x = (2 * images.to(self.shift.device).float() - 1 - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                taps.append(x / (x.square().sum(1, keepdim=True).sqrt() + NORM_EPS))
        return taps

    def distance(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> Tensor:
        """LPIPS between two lists of unit features (broadcasting over the batch) -> (N,)."""
        total = 0
        for k, (fa, fb) in enumerate(zip(feats_a, feats_b)):
            total = total + getattr(self, f"lin{k}")((fa - fb).square()).mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.distance(self.unit_features(a), self.unit_features(b))


@torch.no_grad()
def pairwise_lpips(images: Tensor, lpips: LPIPS) -> Tensor:
    """(N, N) LPIPS between all pairs of images (N, 3, H, W) in [0, 1]: symmetric, zero diagonal.

    Each image goes through the backbone once; each unordered pair is compared once."""
    n = len(images)
    feats = lpips.unit_features(images)
    out = torch.zeros(n, n)
    for i in range(n - 1):
        d = lpips.distance([f[i : i + 1] for f in feats], [f[i + 1 :] for f in feats]).cpu()
        out[i, i + 1 :] = d
        out[i + 1 :, i] = d
    return out
