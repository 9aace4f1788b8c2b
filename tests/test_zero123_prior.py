"""prior=zero123 on a tiny random Zero123 (tests/tiny_zero123.py): both weight layouts, ε̂ against
an independent reference forward, the reference view, bad input through the CLI, dsd-convert, and
end-to-end image-to-3D runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsd.cameras import orbit_cameras
from dsd.errors import UserError
from dsd.priors.zero123 import Zero123Config, Zero123Prior

SIZE = 16  # the tiny model's image size
BOX = (3, 11, 5, 13)  # the object's box in the written 20×20 image: 8×8 px
COLOUR = (0.0, 0.6, 1.0)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_zero123 import build_tiny_zero123, write_original_checkpoint

    root = tmp_path_factory.mktemp("tiny_zero123")
    folder = build_tiny_zero123(root / "diffusers")
    ckpt = write_original_checkpoint(folder, root / "zero123.ckpt", ema=True)
    return folder, ckpt


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """An RGBA image: an opaque 8×8 box off centre, transparent (with garbage colour) elsewhere."""
    pixels = np.zeros((20, 20, 4), dtype=np.uint8)
    pixels[..., 0] = 90
    top, bottom, left, right = BOX
    pixels[top:bottom, left:right, :3] = np.round(np.array(COLOUR) * 255).astype(np.uint8)
    pixels[top:bottom, left:right, 3] = 255
    path = tmp_path_factory.mktemp("input") / "object.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    return path


def expected_input_view(background: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred at object_fraction 0.5: the 8 px box fills [4, 12)² of 16×16 (no resampling)."""
    rgb, mask = torch.full((3, SIZE, SIZE), background), torch.zeros(1, SIZE, SIZE)
    colour = torch.tensor([round(c * 255) / 255 for c in COLOUR])
    rgb[:, 4:12, 4:12] = colour[:, None, None]
    mask[:, 4:12, 4:12] = 1.0
    return rgb, mask


def make_prior(pretrained, image, **overrides) -> Zero123Prior:
    cfg = Zero123Config(pretrained=str(pretrained), image=str(image), object_fraction=0.5, **overrides)
    return Zero123Prior(cfg)


def cameras(elevation, azimuth, distance):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return orbit_cameras(t(elevation), t(azimuth), t(distance), torch.full((len(elevation),), 20.0, dtype=torch.float64),
                         SIZE, SIZE)


def reference_eps(folder: Path, x_t, t, elevation, azimuth, distance, uncond, background=1.0):
    """ε̂ written from scratch: the folder's modules called directly on cat([x_t, c_concat]) and the
    projected [CLIP embedding, pose] token; unconditional rows: zero token, zero c_concat."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    clip = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval()
    proj = load_file(str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
    rgb, _ = expected_input_view(background)
    with torch.no_grad():
        c_concat = vae.encode(rgb[None] * 2 - 1).latent_dist.mode()  # not scaled by 0.18215
        pixels = torch.nn.functional.interpolate(rgb[None], size=(SIZE, SIZE), mode="bicubic", align_corners=True)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
        embedding = clip(pixel_values=(pixels - mean) / std).image_embeds  # (1, 32)
        rows = []
        for i in range(len(x_t)):
            # Zero123's T: Δpolar (polar = 90° − elevation), sin/cos Δazimuth, Δdistance; input view 5°, 0°, 3.8
            T = torch.tensor([math.radians((90 - elevation[i]) - (90 - 5.0)), math.sin(math.radians(azimuth[i])),
                              math.cos(math.radians(azimuth[i])), distance[i] - 3.8])
            token = torch.cat([embedding[0], T.float()]) @ proj["proj.weight"].T + proj["proj.bias"]
            latent = c_concat
            if uncond[i]:
                token, latent = torch.zeros_like(token), torch.zeros_like(c_concat)
            x = torch.cat([x_t[i : i + 1], latent], dim=1)
            rows.append(unet(x, t[i : i + 1], encoder_hidden_states=token[None, None]).sample)
    return torch.cat(rows)


POSES = ([30.0, -10.0, 60.0], [45.0, 170.0, -90.0], [3.8, 3.8, 4.2])


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([900, 400, 37])


def test_predict_eps_equals_independent_reference(tiny, image):
    folder, _ = tiny
    prior = make_prior(folder, image)
    x_t, t = inputs()
    uncond = torch.tensor([False, True, False])
    eps = prior.predict_eps(x_t, t, prior.condition("ignored", 3, cameras(*POSES)), uncond)
    expected = reference_eps(folder, x_t, t, *POSES, uncond.tolist())
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=0)
    assert prior.sample_shape == (4, 8, 8) and prior.image_shape == (3, SIZE, SIZE)


def test_unconditional_rows_ignore_pose_and_input_view(tiny, image, tmp_path):
    folder, _ = tiny
    prior = make_prior(folder, image)
    x_t, t = inputs()
    uncond = torch.ones(3, dtype=torch.bool)
    a = prior.predict_eps(x_t, t, prior.condition("", 3, cameras(*POSES)), uncond)
    b = prior.predict_eps(x_t, t, prior.condition("", 3, cameras([0.0] * 3, [0.0] * 3, [3.8] * 3)), uncond)
    other = make_prior(folder, image, background="black")  # another input view
    c = other.predict_eps(x_t, t, other.condition("", 3, cameras(*POSES)), uncond)
    assert torch.equal(a, b) and torch.equal(a, c)
    conditional = prior.predict_eps(x_t, t, prior.condition("", 3, cameras(*POSES)), ~uncond)
    assert (conditional - a).abs().max() > 1e-4  # the condition matters


@pytest.mark.parametrize("layout", ["original_ckpt", "cc_projection_folder"])
def test_other_weight_layouts_give_the_same_eps(tiny, image, tmp_path, layout):
    folder, ckpt = tiny
    if layout == "original_ckpt":  # EMA buffers hold the folder's UNet; raw weights differ
        other = make_prior(ckpt, image, image_encoder=str(folder / "image_encoder"), image_size=SIZE)
    else:  # diffusers' community Zero1to3 layout (kxic hub folders): cc_projection/projection.*
        from safetensors.torch import load_file, save_file

        alt = tmp_path / "alt"
        alt.mkdir()
        for name in ("unet", "vae", "image_encoder", "scheduler"):
            (alt / name).symlink_to(folder / name)
        (alt / "cc_projection").mkdir()
        state = load_file(str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"))
        save_file({k.replace("proj.", "projection."): v for k, v in state.items()},
                  str(alt / "cc_projection" / "diffusion_pytorch_model.safetensors"))
        other = make_prior(alt, image)
    prior = make_prior(folder, image)
    x_t, t = inputs()
    uncond = torch.tensor([False, True, False])
    cond = prior.condition("", 3, cameras(*POSES))
    torch.testing.assert_close(other.predict_eps(x_t, t, cond, uncond), prior.predict_eps(x_t, t, cond, uncond),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(other.alphas_cumprod, prior.alphas_cumprod)


def test_checkpoint_with_a_missing_key_names_it(tiny, image, tmp_path):
    folder, ckpt = tiny
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["state_dict"]["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    del checkpoint["state_dict"]["model_ema.diffusion_modeloutput_blocks30in_layers2weight"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(UserError) as err:
        make_prior(broken, image, image_encoder=str(folder / "image_encoder"), image_size=SIZE)
    assert "model_ema.diffusion_modeloutput_blocks30in_layers2weight" in str(err.value)
    assert "prior.pretrained" in str(err.value)


def test_reference_view_reproduces_the_input_image(tiny, image):
    folder, _ = tiny
    for background, value in (("white", 1.0), ("black", 0.0)):
        view = make_prior(folder, image, background=background).reference_view()
        rgb, mask = expected_input_view(value)
        torch.testing.assert_close(view.rgb, rgb, atol=1e-6, rtol=0)
        torch.testing.assert_close(view.mask, mask, atol=1e-6, rtol=0)
    camera = view.camera
    assert len(camera) == 1 and (camera.width, camera.height) == (SIZE, SIZE)
    e = math.radians(5.0)  # threestudio zero123.yaml's input view: elevation 5, azimuth 0, distance 3.8, fovy 20
    torch.testing.assert_close(camera.c2w[0, :3, 3], torch.tensor([3.8 * math.cos(e), 0.0, 3.8 * math.sin(e)]))
    assert float(camera.fovy_deg[0]) == 20.0


def test_condition_needs_cameras_and_stable_variant_uses_input_polar(tiny, image):
    folder, _ = tiny
    prior = make_prior(folder, image)
    with pytest.raises(UserError, match="3D representation"):
        prior.condition("a prompt", 2, None)
    stable = make_prior(folder, image, variant="stable_zero123", input_elevation_deg=20.0)
    pose = stable.condition("", 3, cameras(*POSES)).pose
    torch.testing.assert_close(pose[:, 3], torch.full((3,), math.radians(70.0), dtype=torch.float64))
    torch.testing.assert_close(pose[:, 0], torch.tensor([math.radians(20.0 - e) for e in POSES[0]], dtype=torch.float64))
    assert prior.needs_cameras and prior.views_per_sample == 1


def test_condition_rows_and_cache_keys(tiny, image):
    folder, _ = tiny
    prior = make_prior(folder, image)
    cond = prior.condition("", 3, cameras(*POSES))
    again = prior.condition("", 1, cameras([POSES[0][2]], [POSES[1][2]], [POSES[2][2]]))
    assert cond.rows([2]).cache_key(0) == again.cache_key(0) != cond.cache_key(0)
    assert len(type(cond).cat([cond, again])) == 4


def dsd_run(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "dsd-run"), f"hydra.run.dir={tmp_path}", "prior=zero123",
                           "representation=gaussians", "trainer.steps=1", "device=cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kind", ["missing", "text", "directory", "weights"])
def test_bad_image_or_missing_weights_exit_2_through_the_cli(tiny, image, tmp_path, kind):
    folder, _ = tiny
    bad = {"missing": tmp_path / "nope.png", "text": tmp_path / "notes.png", "directory": tmp_path}.get(kind)
    if kind == "text":
        bad.write_text("not an image")
    pretrained = tmp_path / "no_such_weights" if kind == "weights" else folder
    proc = dsd_run(tmp_path / "run", f"prior.pretrained={pretrained}", f"prior.image={bad or image}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "Traceback" not in proc.stderr
    if kind == "weights":
        assert "prior.pretrained" in error and "dsd-convert zero123" in error
    else:
        assert "prior.image" in error and str(bad) in error


def test_dsd_convert_zero123_writes_a_folder_that_loads(tiny, image, tmp_path):
    from dsd.convert import main

    folder, ckpt = tiny
    out = tmp_path / "converted"
    main(["zero123", str(ckpt), str(out), "--image-encoder", str(folder / "image_encoder"), "--image-size", str(SIZE)])
    converted, prior = make_prior(out, image), make_prior(folder, image)
    assert converted.image_shape == prior.image_shape
    x_t, t = inputs()
    uncond = torch.tensor([True, False, False])
    cond = prior.condition("", 3, cameras(*POSES))
    torch.testing.assert_close(converted.predict_eps(x_t, t, cond, uncond), prior.predict_eps(x_t, t, cond, uncond),
                               atol=1e-5, rtol=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["zero123", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------
# End to end (needs the trainer's reference-view loss and camera-conditioned priors)

FAST_3D = ("camera.video_frames=0", "camera.eval_views=2", "trainer.checkpoint_every=0")
GAUSSIANS = ("representation=gaussians", "representation.num_points=150")
NERF = ("representation=nerf", "representation.num_samples=16", "representation.resolutions=[]",
        "representation.lambda_orient=0", "representation.mesh_resolution=32", "representation.eval_resolution=16")


@pytest.mark.parametrize("representation", [GAUSSIANS, NERF], ids=["gaussians", "nerf"])
def test_image_to_3d_end_to_end(compose, tiny, image, tmp_path, representation):
    from dsd.outputs import load_result
    from dsd.run import run

    folder, _ = tiny
    cfg = compose("experiment=image_to_3d", f"prior.pretrained={folder}", f"prior.image={image}", "guidance=dsd",
                  *representation, *FAST_3D, "seeds=[0,1]", "trainer.steps=2", "camera.views_per_step=2",
                  "camera.resolution=16")
    summary = run(cfg, tmp_path)
    assert summary["prior"] == "zero123" and [e["steps"] for e in summary["seeds"]] == [2, 2]
    for seed in (0, 1):
        result = load_result(tmp_path / f"seed_{seed}/result.npz")
        assert result.shape[-1] == 3 and np.isfinite(result).all()


def test_image_representation_is_refused(compose, tiny, image, tmp_path):
    from dsd.run import run

    folder, _ = tiny
    cfg = compose("prior=zero123", f"prior.pretrained={folder}", f"prior.image={image}", "representation=image",
                  "seeds=[0]", "trainer.steps=1")
    with pytest.raises(UserError, match="3D representation"):
        run(cfg, tmp_path)
