"""Metrics of dsd-eval on random-weight networks: Vendi/pairwise diversity, Fréchet distance, FID
Inception, CLIP/DINOv2 features, CLIP-SIM, LPIPS. References are written out here independently
(scipy / numpy / closed forms / the raw transformers models), never through the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from dsd.errors import UserError
from dsd.metrics.fid import InceptionFeatures, extract_features, fid, frechet_distance
from dsd.metrics.vendi import mean_pairwise_distance, vendi_score
from tests.eval_networks import ALEX_CONVS, random_alex_files, random_inception_file, tiny_clip_folder

# ---------------------------------------------------------------- Vendi score, pairwise distance


def test_vendi_identical_items_score_one():
    row = torch.randn(1, 16)
    assert vendi_score(row.repeat(7, 1)) == pytest.approx(1.0, abs=1e-9)
    # scale does not matter under the cosine kernel
    assert vendi_score(row.repeat(7, 1) * torch.arange(1, 8).unsqueeze(1)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n, dim", [(5, 5), (4, 32)])
def test_vendi_orthogonal_items_score_n(n, dim):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    rows = q[:n] * torch.rand(n, 1, dtype=torch.float64).add(0.5)  # orthogonal, arbitrary lengths
    assert vendi_score(rows) == pytest.approx(n, rel=1e-9)


def test_vendi_two_items_closed_form():
    # Two unit vectors at cosine c: K/2 has eigenvalues (1 +- c)/2, the score is exp of their entropy.
    c = 0.3
    rows = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)]], dtype=torch.float64)
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    assert vendi_score(rows) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()), rel=1e-9)


def test_vendi_permutation_invariant_and_duplicates_add_nothing():
    rows = torch.randn(6, 10)
    score = vendi_score(rows)
    assert 1.0 < score < 6.0
    assert vendi_score(rows[torch.randperm(6)]) == pytest.approx(score, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert vendi_score(torch.cat([q[:3], q[:3], q[:3]])) == pytest.approx(3.0, rel=1e-9)


def test_mean_pairwise_distance_matches_loop():
    rows = torch.randn(5, 7)
    expected = np.mean([1 - F.cosine_similarity(rows[i], rows[j], dim=0).item()
                        for i in range(5) for j in range(i + 1, 5)])
    assert mean_pairwise_distance(rows) == pytest.approx(expected, rel=1e-6)
    assert mean_pairwise_distance(rows[:1].repeat(4, 1)) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_distance(rows[:1]) == 0.0


# ---------------------------------------------------------------- Fréchet distance


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID: np.cov and scipy's matrix square root of the covariance product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def _eig_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID through the eigenvalues of the covariance product (valid when the covariances are singular)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def test_frechet_distance_matches_scipy_sqrtm():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(30, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                              dtype=torch.float64) + 0.7
    expected = _scipy_frechet(a.numpy(), b.numpy())
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariances():
    # Fewer items than dimensions, as with 100 renders of 2048-D Inception features.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(7, 12, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    assert frechet_distance(a, b) == pytest.approx(_eig_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_agrees_with_torchmetrics():
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Rows(torch.nn.Module):  # torchmetrics' custom "feature network": the rows already are features
        num_features = 9

        def forward(self, x):
            return x

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(25, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(20, 9, generator=gen, dtype=torch.float64) * 0.8 + 0.3
    metric = fid_module.FrechetInceptionDistance(feature=Rows())
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fid_generic_extractor_zero_on_itself_and_grows_with_shift():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(12, 3, 16, 16, generator=gen) * 0.5 + 0.25
    proj = torch.randn(3 * 4 * 4, 8, generator=gen)

    def extractor(x):  # a fixed nonlinear feature map of 4x4-pooled pixels
        return torch.tanh(F.avg_pool2d(x, 4).flatten(1) @ proj)

    assert fid(images, images, extractor) == pytest.approx(0.0, abs=1e-9)
    values = [fid(images, (images + s).clamp(0, 1), extractor, batch_size=5) for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(v1 < v2 for v1, v2 in zip(values, values[1:])), values
    assert extract_features(images, extractor, batch_size=5).shape == (12, 8)


# ---------------------------------------------------------------- FID Inception network


def test_inception_layout_matches_the_fid_weights():
    net = InceptionFeatures()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # Names/shapes from torchvision's Inception3 (+ pytorch-fid's 1008-way fc), written out here.
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
    assert shapes["fc.weight"] == (1008, 2048)
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head and 1000 classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux + 8 * (2048 + 1)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_inception_from_file_features_and_fid(tmp_path):
    path, state = random_inception_file(tmp_path)
    net = InceptionFeatures.from_file(str(path), key="--inception")
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(2, 3, 48, 48, generator=gen) * 0.6 + 0.2
    feats = net(torch.cat([base, base + 0.05, base + 0.2]))  # resized to 299 inside
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all()
    assert feats.std() > 1e-3
    a, near, far = feats[:2], feats[2:4], feats[4:]
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * float(a.square().sum()))
    assert 0 < frechet_distance(a, near) < frechet_distance(a, far)


def test_inception_from_file_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"--inception='/nope\.pth'.*local path"):
        InceptionFeatures.from_file("/nope.pth", key="--inception")
    bad = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match=r"--inception=.*other\.pth.*missing"):
        InceptionFeatures.from_file(str(bad), key="--inception")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"--inception=.*junk\.pth.*could not be read"):
        InceptionFeatures.from_file(str(junk), key="--inception")


# ---------------------------------------------------------------- CLIP / DINOv2 features, CLIP-SIM


def _uint8_images(n, side, seed):
    """Images on the 1/255 grid, so the PIL reference pipeline sees exactly the same pixels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=gen).float() / 255


def _pil_pixels(processor_cls, folder, images):
    """Reference pixel_values from transformers' own PIL image processor, read from the folder."""
    from PIL import Image

    processor = processor_cls.from_pretrained(folder)
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def test_clip_similarity_matches_raw_transformers_model(tmp_path):
    from transformers import CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dsd.metrics.image_features import ClipScorer

    folder = tiny_clip_folder(tmp_path)
    images = _uint8_images(3, 32, seed=5)
    prompt = "a photo of a red apple"
    scorer = ClipScorer.from_pretrained(str(folder), key="--clip")
    sim = scorer.similarity(images, prompt)
    assert sim.shape == (3,) and sim.dtype == torch.float32
    assert (sim.abs() <= 1).all()

    # Independent path: PIL preprocessing + the raw model's projections + the cosine written out.
    model = CLIPModel.from_pretrained(folder).eval()
    ids = PreTrainedTokenizerFast.from_pretrained(folder)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_pil_pixels(CLIPImageProcessorPil, folder, images)).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    expected = (img @ txt.T).squeeze(1) / (img.norm(dim=1) * txt.norm())
    torch.testing.assert_close(sim, expected, rtol=0, atol=1e-5)
    assert expected.std() > 1e-3  # the images are told apart: not a constant
    # a different prompt changes the score (the text side is used)
    assert not torch.allclose(scorer.similarity(images, "a dog on a table"), sim, atol=1e-4)


def test_clip_image_encoder_from_full_clip_checkpoint(tmp_path):
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dsd.metrics.image_features import ImageEncoder

    folder = tiny_clip_folder(tmp_path, seed=1)
    images = _uint8_images(4, 32, seed=6)
    encoder = ImageEncoder.from_pretrained(str(folder), kind="clip", key="--features")
    feats = encoder.features(images)
    assert feats.shape == (4, 16)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(folder).eval().get_image_features(
            pixel_values=_pil_pixels(CLIPImageProcessorPil, folder, images)).pooler_output
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)
    # larger, non-square renders are resized and centre-cropped to the model's 32 px
    assert encoder.features(torch.rand(2, 3, 40, 56)).shape == (2, 16)


def test_preprocess_resizes_crops_and_normalises_constant_image():
    from dsd.metrics.image_features import Preprocess

    prep = Preprocess(shortest_edge=32, size=None, crop=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = prep(torch.full((1, 3, 40, 56), 0.7))
    assert out.shape == (1, 3, 32, 32)
    expected = torch.tensor([(0.7 - 0.5) / 0.2, (0.7 - 0.4) / 0.25, (0.7 - 0.3) / 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-5)


def test_dinov2_encoder_is_the_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from dsd.metrics.image_features import ImageEncoder

    torch.manual_seed(2)
    folder = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                             image_size=16, patch_size=4)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    images = _uint8_images(3, 16, seed=7)
    feats = ImageEncoder.from_pretrained(str(folder), kind="dinov2", key="--features").features(images)
    with torch.no_grad():
        out = Dinov2Model.from_pretrained(folder).eval()(pixel_values=_pil_pixels(BitImageProcessorPil, folder, images))
    torch.testing.assert_close(feats, out.last_hidden_state[:, 0], rtol=0, atol=1e-5)


def test_image_feature_loaders_name_the_key(tmp_path):
    from dsd.metrics.image_features import ClipScorer, ImageEncoder

    with pytest.raises(UserError, match=r"--clip='/no/such/clip'.*local folder"):
        ClipScorer.from_pretrained("/no/such/clip", key="--clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"--features=.*empty.*save_pretrained"):
        ImageEncoder.from_pretrained(str(empty), kind="dinov2", key="--features")
    with pytest.raises(UserError, match=r"--features kind='vgg'"):
        ImageEncoder.from_pretrained(str(empty), kind="vgg", key="--features")


def test_clip_loader_refuses_wrong_or_incomplete_checkpoints(tmp_path):
    from transformers import CLIPModel, Dinov2Config, Dinov2Model

    from dsd.metrics.image_features import ClipScorer

    clip = tiny_clip_folder(tmp_path, seed=3)
    model = CLIPModel.from_pretrained(clip)
    partial = tmp_path / "partial"
    state = {k: v for k, v in model.state_dict().items() if k != "text_projection.weight"}
    model.save_pretrained(partial, state_dict=state)
    with pytest.raises(UserError, match=r"--clip=.*partial.*randomly initialised.*text_projection"):
        ClipScorer.from_pretrained(str(partial), key="--clip")
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                             patch_size=4)).save_pretrained(dino)
    with pytest.raises(UserError, match=r"--clip=.*dino.*'dinov2' checkpoint"):
        ClipScorer.from_pretrained(str(dino), key="--clip")


# ---------------------------------------------------------------- LPIPS


def _reference_lpips(a, b, backbone, heads):
    """LPIPS written out from the raw tensors: scale, AlexNet convs/ReLUs/pools, unit-normalise channels,
    squared difference, 1x1 head, spatial mean, sum over the five ReLU outputs."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def relus(x):
        x = ((2 * x - 1) - shift) / scale
        out = []
        for i, (_, _, _, stride, pad) in ALEX_CONVS.items():
            if i in (3, 6):  # max pools sit before the second and third convolutions
                x = F.max_pool2d(x, 3, 2)
            w, bias = backbone[f"features.{i}.weight"].double(), backbone[f"features.{i}.bias"].double()
            x = F.relu(F.conv2d(x, w, bias, stride, pad))
            out.append(x)
        return out

    total = torch.zeros(len(a), dtype=torch.float64)
    for k, (fa, fb) in enumerate(zip(relus(a.double()), relus(b.double()))):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_reference_and_is_a_distance(tmp_path):
    from dsd.metrics.lpips import LPIPS

    bpath, lpath, backbone, heads = random_alex_files(tmp_path)
    model = LPIPS.from_files(str(bpath), str(lpath), net="alex", key="--lpips")
    gen = torch.Generator().manual_seed(8)
    a, b = torch.rand(3, 3, 64, 64, generator=gen), torch.rand(3, 3, 64, 64, generator=gen)
    d = model(a, b)
    assert d.shape == (3,)
    torch.testing.assert_close(d.double(), _reference_lpips(a, b, backbone, heads), rtol=1e-4, atol=1e-6)
    assert (d > 0).all()
    torch.testing.assert_close(model(b, a), d)
    assert torch.equal(model(a, a), torch.zeros(3))


def test_pairwise_lpips_symmetric_zero_diagonal(tmp_path):
    from dsd.metrics.lpips import LPIPS, pairwise_lpips

    bpath, lpath, _, _ = random_alex_files(tmp_path, seed=1)
    model = LPIPS.from_files(str(bpath), str(lpath))
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    images[3] = images[0]  # a duplicate shape
    m = pairwise_lpips(images, model)
    assert m.shape == (4, 4)
    torch.testing.assert_close(m, m.T)
    assert torch.equal(m.diagonal(), torch.zeros(4))
    assert m[0, 3] == 0 and (m[torch.triu_indices(3, 3, 1).unbind()] > 0).all()
    torch.testing.assert_close(m[1, 2], model(images[1:2], images[2:3])[0])


def test_lpips_loader_errors_name_the_key(tmp_path):
    from dsd.metrics.lpips import LPIPS

    bpath, lpath, backbone, heads = random_alex_files(tmp_path)
    with pytest.raises(UserError, match=r"--lpips backbone='/no/alexnet\.pth' is not a file.*local path"):
        LPIPS.from_files("/no/alexnet.pth", str(lpath))
    torch.save({k: v for k, v in heads.items() if k != "lin4.model.1.weight"}, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"--lpips linear=.*short\.pth.*missing.*lin4"):
        LPIPS.from_files(str(bpath), str(tmp_path / "short.pth"))
    with pytest.raises(UserError, match=r"--lpips linear=.*alexnet\.pth"):
        LPIPS.from_files(str(bpath), str(bpath))  # the two files swapped


def _official_linear_file(net):
    """The lpips wheel's v0.1 heads, if present on disk (never downloaded): $DSD_LPIPS_WEIGHTS_DIR or an
    installed lpips package's data folder."""
    import importlib.util
    import os
    from pathlib import Path

    roots = [os.environ.get("DSD_LPIPS_WEIGHTS_DIR", "")]
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        roots.append(str(Path(spec.origin).parent / "weights" / "v0.1"))
    for root in roots:
        if root and (Path(root) / f"{net}.pth").is_file():
            return Path(root) / f"{net}.pth"
    return None


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_official_lpips_heads_load_without_missing_keys(tmp_path, net):
    from dsd.metrics.lpips import LPIPS

    linear = _official_linear_file(net)
    if linear is None:
        pytest.skip("the lpips v0.1 linear weights are not on disk (set DSD_LPIPS_WEIGHTS_DIR)")
    model = LPIPS(net)
    backbone = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save(backbone, tmp_path / "backbone.pth")
    loaded = LPIPS.from_files(str(tmp_path / "backbone.pth"), str(linear), net=net)
    official = torch.load(linear, map_location="cpu", weights_only=True)
    for k, v in official.items():
        assert torch.equal(loaded.state_dict()[k], v), k
