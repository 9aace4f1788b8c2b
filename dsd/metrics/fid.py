"""Fréchet distance between image sets, with any feature extractor (Inception, CLIP, DINOv2).

The distance of two Gaussians fitted to the feature sets is
    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)).
With A, B the centred features scaled by 1/sqrt(n - 1) (S_a = A^T A, S_b = B^T B), the nonzero
eigenvalues of S_a S_b are those of (A B^T)(A B^T)^T, so Tr((S_a S_b)^(1/2)) is the sum of the singular
values of the small n_a x n_b matrix A B^T. That is exact, needs no D x D matrix square root, and stays
real when the covariances are singular (100 samples of 2048-D Inception features always are).
torchmetrics' FrechetInceptionDistance (which takes a custom feature module and installs without
torchvision) takes the eigenvalues of the D x D product instead; tests/test_eval_metrics.py checks
that both agree, and against scipy.linalg.sqrtm.

`InceptionFeatures` is our own definition of the FID Inception network (TensorFlow's 2015-12-05
graph as ported by pytorch-fid), with the state-dict layout of pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, so that file loads with torch.load + load_state_dict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsd.errors import UserError

Extractor = Callable[[Tensor], Tensor]
INCEPTION_SIZE = 299  # the FID network's input size (pytorch-fid src/pytorch_fid/inception.py, resize_input)
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------- Fréchet distance


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two (n, D) feature sets."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"need two (n, D) feature sets, got {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 items in each set (a covariance)")
    a, b = features_a.detach().cpu().double(), features_b.detach().cpu().double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a) / (len(a) - 1) ** 0.5
    cb = (b - mu_b) / (len(b) - 1) ** 0.5
    cross = torch.linalg.svdvals(ca @ cb.T).sum()
    value = (mu_a - mu_b).square().sum() + ca.square().sum() + cb.square().sum() - 2 * cross
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


@torch.no_grad()
def extract_features(images: Tensor, extractor: Extractor, batch_size: int = 32) -> Tensor:
    """Features (N, D) of images (N, 3, H, W) in [0, 1], computed `batch_size` images at a time."""
    rows = [extractor(images[i : i + batch_size]).reshape(min(batch_size, len(images) - i), -1)
            for i in range(0, len(images), batch_size)]
    return torch.cat(rows).detach().cpu()


def fid(images_a: Tensor, images_b: Tensor, extractor: Extractor, batch_size: int = 32) -> float:
    """Fréchet distance of two image sets (N, 3, H, W) in [0, 1] in the feature space of `extractor`.

    With `InceptionFeatures` this is the usual FID; with CLIP/DINOv2 features it is FD_CLIP/FD_DINOv2."""
    return frechet_distance(extract_features(images_a, extractor, batch_size),
                            extract_features(images_b, extractor, batch_size))


# ---------------------------------------------------------------- the FID Inception network
# Layer names, widths and kernel shapes follow torchvision's Inception3 (torchvision/models/inception.py),
# with pytorch-fid's FID patches (src/pytorch_fid/inception.py: FIDInceptionA/C/E_1/E_2): the average
# pools exclude the zero padding, and the last block's pool branch is a max pool.


class _ConvBN(nn.Sequential):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; children named `conv` and `bn` as in the weights."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu = nn.ReLU()


def _avg_pool_same(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_same(x)),
        ], 1)


class _ReduceB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 inner channels)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for i in range(1, 6):
            d7 = getattr(self, f"branch7x7dbl_{i}")(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_same(x))], 1)


class _ReduceD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `max_pool` marks the FID graph's last block."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.pool = _max_pool_same if max_pool else _avg_pool_same
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(s), self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(self.pool(x)),
        ], 1)


class InceptionFeatures(nn.Module):
    """FID InceptionV3: images (N, 3, H, W) in [0, 1] -> (N, 2048) pool features (resized to 299 inside)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        # Unused for features; present because the weights file holds the 1008-way classifier.
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str, key: str = "--inception") -> InceptionFeatures:
        """Load pytorch-fid's FID Inception weights (a torch.save'd state dict) from a local file."""
        state = _load_state_dict(path, key, f"pytorch-fid's {INCEPTION_FILE}")
        net = cls()
        _load_strict(net, state, path, key)
        return net

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.to(self.fc.weight.device).float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1  # the network expects [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------- loading helpers (shared with lpips.py)


def _load_state_dict(path: str, key: str, what: str) -> dict[str, Tensor]:
    """torch.load a state dict from a local file; UserError naming `key` when it is missing or unreadable."""
    hint = f"download {what} on a machine with network access and pass its local path as {key}=/path/to/file"
    if not path or not Path(path).is_file():
        raise UserError(f"{key}={path!r} is not a file; no weights can be downloaded here: {hint}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of every kind
        raise UserError(f"{key}={path!r} could not be read as a torch state dict ({err}); {hint}.") from err
    if not isinstance(state, dict):
        raise UserError(f"{key}={path!r} holds a {type(state).__name__}, not a state dict; {hint}.")
    return state


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: str, key: str) -> None:
    """load_state_dict that turns missing/unexpected/mis-shaped keys into a UserError naming `key`.

    BatchNorm's `num_batches_tracked` counters may be absent (converted checkpoints omit them)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label}: {names[:3]}{' ...' if len(names) > 3 else ''}"
                           for label, names in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", shapes)) if names)
        raise UserError(f"{key}={path!r} does not hold the expected {type(module).__name__} weights ({detail}).")
    module.load_state_dict(state, strict=False)
