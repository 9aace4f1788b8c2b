"""Random-weight networks of the real architectures that dsd-eval's metrics load, saved the way
their real weights are laid out (pytorch-fid's Inception file, hub folders, torchvision/lpips state
dicts), shared by tests/test_eval_metrics.py and tests/test_evaluate.py."""

from __future__ import annotations

from pathlib import Path

import torch

from dsd.metrics.fid import InceptionFeatures


def random_inception_file(tmp_path, seed=0):
    """A random-weight FID Inception saved like pytorch-fid's weights file. Variance-preserving conv init
    and non-trivial BN statistics, so the 2048-D features are O(1) and every loaded buffer matters."""
    torch.manual_seed(seed)
    net = InceptionFeatures()
    for name, tensor in net.state_dict().items():
        if name.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(tensor, nonlinearity="relu")
        elif name.endswith("bn.running_var"):
            tensor.uniform_(0.5, 1.5)
        elif name.endswith("bn.running_mean") or name.endswith("bn.bias"):
            tensor.normal_(0, 0.1)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    return path, state


def tiny_clip_folder(tmp_path, seed=0):
    """A seeded random CLIPModel (32 px, patch 8, 16-d projection) + word-level tokenizer + PIL image
    processor config, saved the way hub checkpoints are laid out (one folder, save_pretrained)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tests.tiny_sd import WORDS, build_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


ALEX_CONVS = {0: (64, 3, 11, 4, 2), 3: (192, 64, 5, 1, 2), 6: (384, 192, 3, 1, 1), 8: (256, 384, 3, 1, 1),
              10: (256, 256, 3, 1, 1)}  # torchvision AlexNet.features index: (out, in, kernel, stride, pad)


def random_alex_files(tmp_path, seed=0):
    """torchvision-keyed AlexNet weights (with its classifier keys) and lpips-keyed nonnegative heads."""
    gen = torch.Generator().manual_seed(seed)
    backbone = {}
    for i, (cout, cin, k, _, _) in ALEX_CONVS.items():
        backbone[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5
        backbone[f"features.{i}.bias"] = torch.randn(cout, generator=gen) * 0.1
    backbone["classifier.1.weight"] = torch.randn(8, 9216, generator=gen)  # ignored, as in the real file
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
             for k, c in enumerate([64, 192, 384, 256, 256])}
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex_lin.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex_lin.pth", backbone, heads


def tiny_dinov2_folder(tmp_path: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    folder = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2,
                             image_size=16, patch_size=4)).save_pretrained(folder)
    return folder
