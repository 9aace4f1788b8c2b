"""dsd-eval on small analytic sweeps: metrics.json / csv / md and report.html, checked against values
recomputed here independently; bad input exits 2 naming it."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dsd.compose import compose_config
from dsd.evaluate import main
from dsd.outputs import load_views, save_views
from dsd.run import run
from dsd.sample import sample
from tests.eval_networks import random_alex_files, random_inception_file, tiny_clip_folder, tiny_dinov2_folder

TINY_2D = ("prior.image_size=16", "prior.num_references=5", "seeds=2", "trainer.checkpoint_every=0")
# dsd_sampling with as many steps as DDIM steps is DDIM itself (tests/test_run.py): it reaches
# references and agrees with its seeds' ODE, where 4 steps of SDS reach none
METHODS_2D = {"dsd_sampling": ("guidance=dsd_sampling", "guidance.ode_steps=4", "trainer.steps=4", "sampler.steps=4"),
              "sds": ("guidance=sds", "trainer.steps=4", "sampler.steps=4")}
PROMPTS = ("a teapot", "a red apple")
TINY_3D = ("prior.image_size=16", "seeds=2", "trainer.steps=1", "trainer.checkpoint_every=0",
           "representation=gaussians", "representation.num_points=50", "representation.init_fit_steps=1",
           "camera.video_frames=3", "camera.video_resolution=16", "camera.eval_views=2", "camera.quantize_deg=30")


def write_run(root: Path, index: int, overrides: tuple[str, ...]) -> Path:
    """One job of a sweep as `dsd-run --multirun` leaves it: the run's files plus Hydra's
    .hydra/config.yaml (the composed config) and .hydra/overrides.yaml."""
    cfg = compose_config(["wandb.mode=disabled", "device=cpu", *overrides])
    run_dir = root / f"{index}_{','.join(o for o in overrides if o.startswith(('guidance=', 'prompt=')))}"
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    return run_dir


def make_2d_sweep(root: Path) -> Path:
    jobs = [(*TINY_2D, *m, f"prompt={p}") for m in METHODS_2D.values() for p in PROMPTS]
    for i, overrides in enumerate(jobs):
        write_run(root, i, overrides)
    return root


def make_3d_sweep(root: Path) -> Path:
    for i, guidance in enumerate(("dsd", "sds")):
        write_run(root, i, (*TINY_3D, f"guidance={guidance}", "prompt=a teapot"))
    return root


@pytest.fixture(scope="module")
def sweep_2d(tmp_path_factory) -> Path:
    return make_2d_sweep(tmp_path_factory.mktemp("sweep2d"))


@pytest.fixture(scope="module")
def sweep_3d(tmp_path_factory) -> Path:
    return make_3d_sweep(tmp_path_factory.mktemp("sweep3d"))


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/summary.json"))


def ref_vendi_and_pairwise(views: np.ndarray) -> tuple[float, float]:
    """Independent reference: per view, cosine kernel of the seeds' pixels in [-1, 1], Vendi score from
    the eigenvalues of K/n and mean 1 - cos over pairs; averaged over the views. views (S, V, H, W, 3)."""
    vendis, pairs = [], []
    for v in range(views.shape[1]):
        x = (views[:, v].reshape(len(views), -1).astype(np.float64) * 2 - 1)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        k = x @ x.T
        eig = np.linalg.eigvalsh(k / len(k))
        eig = eig[eig > 1e-12]
        vendis.append(float(np.exp(-(eig * np.log(eig)).sum())))
        pairs.append(float(np.mean([1 - k[i, j] for i in range(len(k)) for j in range(i + 1, len(k))])))
    return float(np.mean(vendis)), float(np.mean(pairs))


def all_views(run_dir: Path) -> np.ndarray:
    seeds = [e["seed"] for e in json.loads((run_dir / "summary.json").read_text())["seeds"]]
    return np.stack([load_views(run_dir / f"seed_{s}" / "views.npz") for s in seeds])


def evaluate(*args: str) -> None:
    main([*map(str, args), "--wandb-mode", "disabled"])


def test_eval_writes_per_run_metrics_and_the_sweep_table(sweep_2d, tmp_path):
    evaluate(sweep_2d, "--cache", tmp_path / "cache")
    table = list(csv.DictReader((sweep_2d / "metrics.csv").open()))
    runs = run_dirs(sweep_2d)
    assert len(table) == len(runs) + len(METHODS_2D)  # one row per method x prompt, one mean row per method
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = compose_config([*OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"), "device=cpu", "wandb.mode=disabled"])
        saved = json.loads((run_dir / "metrics.json").read_text())
        m = saved["metrics"]
        assert saved["method"] == summary["guidance"] and saved["prompt"] == summary["prompt"]
        assert m["distinct_references"] == summary["distinct_references"]
        assert m["median_psnr_db"] == pytest.approx(summary["median_psnr_to_reference"])
        assert m["coverage"] == pytest.approx(summary["distinct_references"] / 5)  # prior.num_references=5
        assert summary["num_references"] == 5  # summary.json carries K itself (runs without .hydra too)
        # ODE agreement: the DDIM sample of each seed, sampled here
        ddim = sample(cfg, tmp_path / "ddim" / run_dir.name)["seeds"]
        agree = np.mean([e["nearest_reference"] == d["nearest_reference"] for e, d in zip(summary["seeds"], ddim)])
        assert m["ode_agreement"] == pytest.approx(agree)
        vendi, pairwise = ref_vendi_and_pairwise(all_views(run_dir))
        assert m["pixel_vendi"] == pytest.approx(vendi, rel=1e-6)
        assert m["pixel_pairwise"] == pytest.approx(pairwise, rel=1e-6)
        row = next(r for r in table if r["method"] == saved["method"] and r["prompt"] == saved["prompt"])
        for key in ("coverage", "ode_agreement", "pixel_vendi", "median_psnr_db"):
            assert float(row[key]) == pytest.approx(m[key])
    by_method = {}
    for run_dir in runs:
        saved = json.loads((run_dir / "metrics.json").read_text())
        by_method.setdefault(saved["method"], []).append(saved["metrics"])
    assert by_method["dsd_sampling"][0]["distinct_references"] > 0  # the coverage check above is not 0 == 0
    for method, metrics in by_method.items():
        mean_row = next(r for r in table if r["method"] == method and r["prompt"].startswith("mean"))
        assert float(mean_row["pixel_vendi"]) == pytest.approx(np.mean([m["pixel_vendi"] for m in metrics]))
        assert float(mean_row["coverage"]) == pytest.approx(np.mean([m["coverage"] for m in metrics]))
    markdown = (sweep_2d / "metrics.md").read_text().splitlines()
    assert markdown[0].startswith("| method | prompt |") and len(markdown) == 2 + len(table)
    assert all(any(p in line for line in markdown) for p in PROMPTS)
    # the reference samples are cached: a second evaluation samples nothing new
    cached = sorted((tmp_path / "cache").iterdir())
    evaluate(sweep_2d, "--cache", tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == cached


def test_identical_seeds_have_vendi_one_and_distinct_seeds_more(sweep_2d, tmp_path):
    source = run_dirs(sweep_2d)[0]
    copy = tmp_path / "identical"
    shutil.copytree(source, copy)
    views = load_views(copy / "seed_0" / "views.npz")
    save_views(copy / "seed_1" / "views.npz", views)
    evaluate(copy, "--cache", tmp_path / "cache")
    m = json.loads((copy / "metrics.json").read_text())["metrics"]
    assert m["pixel_vendi"] == pytest.approx(1.0, abs=1e-6) and m["pixel_pairwise"] == pytest.approx(0.0, abs=1e-6)
    evaluate(source, "--cache", tmp_path / "cache", "--out", tmp_path / "one")
    assert json.loads((source / "metrics.json").read_text())["metrics"]["pixel_vendi"] > 1.001


def test_report_shows_every_seed_and_method_with_views_and_turntables(sweep_3d, tmp_path):
    evaluate(sweep_3d, "--cache", tmp_path / "cache")
    html = (sweep_3d / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    videos = re.findall(r'<video src="([^"]+)"', html)
    assert len(images) == 2 * 2 * 2  # methods x seeds x evaluation views
    assert len(videos) == 2 * 2
    for src in images + videos:  # relative paths that resolve from the page's dir
        assert not src.startswith(("/", "file:", "http")) and (sweep_3d / src).is_file()
    assert sorted(videos) == sorted(
        str(p.relative_to(sweep_3d)) for p in sweep_3d.glob("*/seed_*/turntable.mp4"))
    header = re.search(r"<table class=\"metrics\"><thead><tr>(.*?)</tr>", html).group(1)
    assert "method" in header and "Vendi (pixels)" in header
    assert all(f">{m}<" in html for m in ("dsd", "sds"))
    # --inline: one file, nothing outside it
    evaluate(sweep_3d, "--cache", tmp_path / "cache", "--inline", "--out", tmp_path / "inline")
    inline = (tmp_path / "inline" / "report.html").read_text()
    sources = re.findall(r'<(?:img|video) src="([^"]+)"', inline)
    assert len(sources) == len(images) + len(videos) and all(s.startswith("data:") for s in sources)


def expect_exit_2(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        evaluate(*args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_dirs_and_runs_without_results_exit_2_naming_them(capsys, sweep_2d, tmp_path):
    missing = tmp_path / "no_such_dir"
    assert str(missing) in expect_exit_2(capsys, missing)
    empty = tmp_path / "empty_sweep"
    (empty / "0_job").mkdir(parents=True)
    assert str(empty) in expect_exit_2(capsys, empty)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dirs(sweep_2d)[0], unfinished)
    (unfinished / "metrics.json").unlink(missing_ok=True)
    for name in ("views.npz", "result.npz"):
        (unfinished / "seed_1" / name).unlink()
    assert str(unfinished / "seed_1") in expect_exit_2(capsys, unfinished)
    assert not (unfinished / "metrics.json").exists()


def test_a_metric_asked_for_without_weights_exits_2_naming_the_flag(capsys, sweep_2d, tmp_path):
    for metric, flag in (("fid", "--inception"), ("clip_sim", "--clip"), ("dinov2_diversity", "--dinov2"),
                         ("lpips", "--lpips-backbone")):
        assert flag in expect_exit_2(capsys, sweep_2d, "--metrics", metric)
    assert "--lpips-backbone" in expect_exit_2(capsys, sweep_2d, "--lpips-linear", tmp_path / "alex.pth")
    assert "--metrics" in expect_exit_2(capsys, sweep_2d, "--metrics", "nonsense")


def test_the_table_is_logged_to_wandb(monkeypatch, sweep_2d, tmp_path):
    logged = {}

    class FakeRun:
        def log(self, data):
            logged.update(data)

    class FakeLogger:
        def __init__(self, mode, run_dir, config, project, entity, group, name, job_type="run"):
            self.run = FakeRun()
            logged["job_type"] = job_type

        def finish(self):
            logged["finished"] = True

    import dsd.logging

    monkeypatch.setattr(dsd.logging, "RunLogger", FakeLogger)
    evaluate(sweep_2d, "--cache", tmp_path / "cache", "--no-report")
    table = logged["metrics"]
    rows = list(csv.reader((sweep_2d / "metrics.csv").open()))
    assert list(table.columns) == rows[0] and len(table.data) == len(rows) - 1
    assert logged["job_type"] == "eval" and logged["finished"]


def test_network_metrics_with_random_weight_models(sweep_2d, tmp_path):
    """Every weight-based metric on random-weight networks of the real architectures, wired as the
    protocol says: CLIP-SIM x100 over every render, Vendi / LPIPS over the seeds from one camera, FID
    against --fid-samples prior samples of other seeds than the run's."""
    import torch

    from dsd.metrics.fid import InceptionFeatures
    from dsd.metrics.image_features import ClipScorer, ImageEncoder
    from dsd.metrics.lpips import LPIPS

    clip = tiny_clip_folder(tmp_path)
    dinov2 = tiny_dinov2_folder(tmp_path)
    inception, _ = random_inception_file(tmp_path)
    backbone, linear, _, _ = random_alex_files(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(run_dirs(sweep_2d)[0], run_dir)
    evaluate(run_dir, "--cache", tmp_path / "cache", "--clip", clip, "--dinov2", dinov2, "--inception", inception,
             "--lpips-backbone", backbone, "--lpips-linear", linear, "--fid-samples", "3")
    m = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    views = all_views(run_dir)  # (2 seeds, 1 view, H, W, 3)
    images = torch.from_numpy(views[:, 0]).permute(0, 3, 1, 2)
    prompt = json.loads((run_dir / "summary.json").read_text())["prompt"]
    assert m["clip_sim"] == pytest.approx(100 * float(ClipScorer.from_pretrained(str(clip), "k").similarity(
        images, prompt).mean()), rel=1e-5)
    for name, folder in (("clip", clip), ("dinov2", dinov2)):
        feats = ImageEncoder.from_pretrained(str(folder), kind=name, key="k").features(images).double().numpy()
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        eig = np.linalg.eigvalsh(unit @ unit.T / 2)
        eig = eig[eig > 1e-12]
        assert m[f"{name}_vendi"] == pytest.approx(float(np.exp(-(eig * np.log(eig)).sum())), rel=1e-5)
        assert m[f"{name}_pairwise"] == pytest.approx(1 - float(unit[0] @ unit[1]), rel=1e-4, abs=1e-7)
    lpips = LPIPS.from_files(str(backbone), str(linear))
    big = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear")  # 16 px renders, upsampled
    assert m["lpips_pairwise"] == pytest.approx(float(lpips(big[:1], big[1:])[0]), rel=1e-5)
    # FID: the cached reference samples are 3 prior samples of seeds the run does not use
    ref_dir = Path(m["fid_reference_dir"])
    ref_seeds = [e["seed"] for e in json.loads((ref_dir / "summary.json").read_text())["seeds"]]
    assert m["fid_reference_samples"] == 3 and len(ref_seeds) == 3
    assert not set(ref_seeds) & set(json.loads((run_dir / "metrics.json").read_text())["seeds"])
    ref = np.stack([np.load(ref_dir / f"seed_{s}" / "result.npz")["image"] for s in ref_seeds])
    net = InceptionFeatures.from_file(str(inception))
    with torch.no_grad():
        a = net(images).double().numpy()
        b = net(torch.from_numpy(ref).permute(0, 3, 1, 2)).double().numpy()
    # tr sqrt(Ca Cb) from the eigenvalues of the small (n_a x n_a) matrix X_a Cb X_a^T, with
    # Ca = X_a^T X_a (X: centred rows / sqrt(n - 1)): scipy's sqrtm of 2048 x 2048 would take a minute
    xa = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    xb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    small = np.linalg.eigvals(xa @ xb.T @ xb @ xa.T).real.clip(min=0)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + (xa**2).sum() + (xb**2).sum() - 2 * np.sqrt(small).sum()
    assert m["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    table = (run_dir / "metrics.md").read_text()
    assert "CLIP-SIM (x100)" in table and "FID" in table and "pairwise LPIPS" in table


def test_paper_preset_sweeps_15_prompts_10_seeds_and_the_table_2_methods():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dsd.cli import CONFIG_PATH
    from dsd.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=paper_text_to_3d"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    sweeps = {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
              for o in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])}
    prompts = [getattr(p, "text", p) for p in sweeps["prompt"]]  # quoted values parse as QuotedString
    assert len(set(prompts)) == 15 and "A DSLR photo of a Space Shuttle" in prompts
    assert any("," in p for p in prompts)  # prompts with commas stay whole
    assert sweeps["seeds"] == [list(range(10))]
    assert set(sweeps["guidance"]) == {"sds", "hifa", "sdi", "consistent3d", "vsd", "dsd"}
    assert cfg.camera.eval_views == 10  # 10 shapes x 10 views = the paper's 100 renders per prompt


def test_fid_of_a_one_seed_run_exits_2_naming_the_run(capsys, tmp_path):
    run_dir = write_run(tmp_path / "sweep", 0, ("guidance=sds", "seeds=1", "trainer.steps=2", "prior.image_size=16"))
    inception, _ = random_inception_file(tmp_path)
    err = expect_exit_2(capsys, run_dir, "--cache", tmp_path / "cache", "--inception", inception, "--fid-samples", "2")
    assert "FID needs at least 2 renders" in err and str(run_dir) in err.replace("\n", "")
