"""3D through the real pipeline: analytic prior and tiny Stable Diffusion with nerf and gaussians."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from dsd.outputs import load_result, load_views
from dsd.run import run

FAST_3D = (
    "camera.video_frames=3",
    "camera.video_resolution=16",
    "camera.eval_views=2",
    "trainer.checkpoint_every=0",
)
GAUSSIANS = ("representation=gaussians", "representation.num_points=150")
NERF = ("representation=nerf", "representation.num_samples=16", "representation.resolutions=[]",
        "representation.lambda_orient=0", "representation.mesh_resolution=32", "representation.eval_resolution=16")


def test_analytic_gaussians_writes_the_3d_output_contract(compose, tmp_path):
    cfg = compose(*GAUSSIANS, *FAST_3D, "prior.image_size=16", "seeds=2", "trainer.steps=4",
                  "guidance.init=ode_x0", "representation.init_fit_steps=5", "camera.quantize_deg=30")
    summary = run(cfg, tmp_path)
    assert summary["representation"] == "gaussians"
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == json.loads(json.dumps(summary["seeds"]))
    for entry in summary["seeds"]:
        seed_dir = tmp_path / f"seed_{entry['seed']}"
        assert isinstance(entry["nearest_reference"], int) and entry["psnr_to_reference"] > 5
        image = load_result(seed_dir / "result.npz")
        assert image.shape == (16, 16, 3) and image.dtype == np.float32
        views = load_views(seed_dir / "views.npz")
        assert views.shape == (cfg.camera.eval_views, 16, 16, 3) and np.array_equal(views[0], image)
        frames = imageio.mimread(seed_dir / "turntable.mp4")
        assert len(frames) == 3 and frames[0].shape == (16, 16, 3)
        assert (seed_dir / "gaussians.ply").stat().st_size > 0 and (seed_dir / "checkpoint.pt").exists()
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height > 1.5 * 160 and grid.width > 1.5 * 160  # one row per seed, one column per view
    assert 3.0 <= summary["prior_rows_per_step"]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_3d_seed_results_are_reproducible_and_differ_between_seeds(compose, tmp_path):
    overrides = (*GAUSSIANS, *FAST_3D, "camera.video_frames=0", "prior.image_size=16", "seeds=[0,1]",
                 "trainer.steps=3", "camera.quantize_deg=30")
    for name in ("a", "b"):
        run(compose(*overrides), tmp_path / name)
    r = {(n, s): load_result(tmp_path / n / f"seed_{s}/result.npz") for n in "ab" for s in (0, 1)}
    assert np.array_equal(r["a", 0], r["b", 0]) and np.array_equal(r["a", 1], r["b", 1])
    assert np.abs(r["a", 0] - r["a", 1]).max() > 1e-3


@pytest.mark.parametrize("representation", [GAUSSIANS, NERF], ids=["gaussians", "nerf"])
def test_tiny_stable_diffusion_text_to_3d_end_to_end(compose, tmp_path, tiny_sd, representation):
    cfg = compose("prior=sd21", f"prior.pretrained={tiny_sd}", *representation, *FAST_3D, "seeds=[0,1]",
                  "trainer.steps=2", "guidance=dsd", "camera.views_per_step=2")
    summary = run(cfg, tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [2, 2]
    export = "gaussians.ply" if representation is GAUSSIANS else "mesh.obj"
    for seed in (0, 1):
        assert load_result(tmp_path / f"seed_{seed}/result.npz").shape == (16, 16, 3)
        assert (tmp_path / f"seed_{seed}/turntable.mp4").exists()
        assert (tmp_path / f"seed_{seed}" / export).stat().st_size > 0
    # DSD: 2 views x (x̂(t) with CFG: 2 rows, perp-neg negatives, x̂(t+δ): 1 row) + ODE rows per seed
    assert summary["prior_rows_per_step"] > 2 * 3


def test_interrupted_3d_run_with_densification_resumes_to_the_same_result(compose, tmp_path, interrupt_at_step):
    overrides = (*GAUSSIANS, *FAST_3D, "camera.video_frames=0", "prior.image_size=16", "seeds=[0,1]",
                 "trainer.steps=6", "trainer.checkpoint_every=2", "camera.quantize_deg=30",
                 "representation.densify_from=1", "representation.densify_every=2",
                 "representation.grad_threshold=0", "representation.max_points=400")
    run(compose(*overrides), tmp_path / "straight")
    interrupt_at_step(5)
    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "resumed")
    interrupt_at_step(None)
    import torch

    ckpt = torch.load(tmp_path / "resumed/seed_0/checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5 and len(ckpt["representation"]["means"]) > 150  # densified before the crash
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    for seed in (0, 1):
        straight = load_result(tmp_path / f"straight/seed_{seed}/result.npz")
        np.testing.assert_allclose(load_result(tmp_path / f"resumed/seed_{seed}/result.npz"), straight, atol=1e-5)


def test_continuous_cameras_keep_the_ode_cache_and_checkpoints_bounded(compose, tmp_path):
    """With the default continuous cameras every step is a new ODE condition: the per-seed cache
    bound holds over many steps, so the trajectories in a checkpoint stop growing with the steps."""
    import torch

    cfg = compose(*GAUSSIANS, *FAST_3D, "prior.image_size=16", "seeds=1", "trainer.steps=24",
                  "trainer.checkpoint_every=8", "guidance.ode_target=grid", "guidance.ode_cache_per_seed=4",
                  "camera.quantize_deg=0")
    sizes = []
    from dsd.trainer import Trainer

    original = Trainer.save

    def save_and_measure(self, state):
        original(self, state)
        checkpoint = torch.load(self.checkpoint_path(state.seed), weights_only=False)
        sizes.append((state.step, len(checkpoint["guidance"]["trajectories"]),
                      self.checkpoint_path(state.seed).stat().st_size))

    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save", save_and_measure)
        run(cfg, tmp_path)
    assert [s for s, _, _ in sizes] == [8, 16, 24]
    assert all(n == 4 for _, n, _ in sizes)  # a new camera every step, 4 trajectories kept
    sizes.clear()
    with pytest.MonkeyPatch.context() as mp:  # the control: the same 8 steps unbounded keep all 8
        mp.setattr(Trainer, "save", save_and_measure)
        run(compose(*GAUSSIANS, *FAST_3D, "prior.image_size=16", "seeds=1", "trainer.steps=8",
                    "guidance.ode_target=grid", "camera.quantize_deg=0", "camera.video_frames=0"), tmp_path / "control")
    assert sizes[-1][1] == 8
