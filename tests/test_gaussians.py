"""representation=gaussians and its renderer: camera conventions, the splat and compositing math
against closed forms, gradients, fitting, densification, ply and checkpoint round trips."""

import io
import math

import pytest
import torch

from dsd.cameras import orbit_cameras
from dsd.export_ply import SH_C0
from dsd.render.gaussians import project_gaussians, render_gaussians, viewmats_opencv
from dsd.representations.base import fit_renders
from dsd.representations.gaussians import PARAMS, GaussiansConfig, GaussiansRepresentation

SIZE, FOVY, DIST = 64, 60.0, 3.0
FOCAL = 0.5 * SIZE / math.tan(math.radians(FOVY / 2))
WHITE = torch.ones(3)


def camera(elevation=0.0, azimuth=0.0, distance=DIST, size=SIZE):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return orbit_cameras(t(elevation), t(azimuth), t(distance), t(FOVY), size, size)


def project(points, cams):
    """Pixel coordinates (N, 2) with an independent pinhole: w2c, then K, then divide by depth."""
    w2c, K = viewmats_opencv(cams)[0], cams.intrinsics()[0]
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:], cam[:, 2]


def gaussians(means, scale=0.05, opacity=0.8, colors=None):
    n = len(means)
    quats = torch.tensor([1.0, 0, 0, 0]).repeat(n, 1)
    colors = torch.rand(n, 3) if colors is None else colors
    return means, quats, torch.full((n, 3), scale), torch.full((n,), opacity), colors


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small; on a shared, oversubscribed CPU OpenMP's spinning threads turn
    10 ms steps into seconds, so this module runs single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PixelPrior:
    """Stand-in prior: pixel space in [−1, 1], like the analytic prior."""

    image_shape = (3, 32, 32)

    def decode(self, x):
        return (x + 1) / 2


def test_projection_conventions():
    cams = camera()
    points = torch.tensor([[0.0, 0, 0], [0, 0, 0.5], [0, 0.5, 0], [2.0 * DIST, 0, 0]])
    uv, depth = project(points, cams)
    half = SIZE / 2
    assert torch.allclose(uv[0], torch.tensor([half, half]), atol=1e-4)  # origin: image centre
    # +z (world up) is above the centre (rows grow downwards) by f·0.5/d
    assert torch.allclose(uv[1], torch.tensor([half, half - FOCAL * 0.5 / DIST]), atol=1e-3)
    # azimuth 0 looks from +x towards −x: camera right is world +y
    assert torch.allclose(uv[2], torch.tensor([half + FOCAL * 0.5 / DIST, half]), atol=1e-3)
    assert depth[0] == pytest.approx(DIST) and depth[3] < 0  # behind the camera
    # azimuth 90 looks from +y: camera right is world −x
    uv90, _ = project(torch.tensor([[0.5, 0.0, 0.0]]), camera(azimuth=90))
    assert uv90[0, 0] < half - 5
    # the renderer's own projection agrees, and culls the point behind the camera
    means, quats, scales, _, _ = gaussians(points)
    viewmats, Ks = viewmats_opencv(cams), cams.intrinsics()
    means2d, _, _, visible, _ = project_gaussians(means, quats, scales, viewmats, Ks, SIZE, SIZE)
    assert torch.allclose(means2d[0, :3], uv[:3], atol=1e-3)
    assert visible[0].tolist() == [True, True, True, False]


def test_rendered_blob_lands_on_the_projected_pixel():
    rgb, alpha = render_gaussians(*gaussians(torch.tensor([[0.0, 0.6, 0.4]]), scale=0.02), camera(), WHITE)
    row, col = divmod(int(alpha[0, 0].argmax()), SIZE)
    (u, v), _ = project(torch.tensor([[0.0, 0.6, 0.4]]), camera())[0][0], None
    assert abs(col + 0.5 - u) <= 1 and abs(row + 0.5 - v) <= 1
    assert col > SIZE / 2 and row < SIZE / 2  # right (+y) and up (+z)


def test_single_isotropic_gaussian_is_the_expected_2d_gaussian():
    scale, opacity = 0.05, 0.8
    rgb, alpha = render_gaussians(*gaussians(torch.zeros(1, 3), scale, opacity, torch.tensor([[1.0, 0, 0]])),
                                  camera(), WHITE)
    var = (FOCAL * scale / DIST) ** 2 + 0.3  # EWA: f·s/z px, plus the 0.3 px² low-pass
    centres = torch.arange(SIZE) + 0.5 - SIZE / 2
    r2 = centres[:, None] ** 2 + centres[None, :] ** 2
    expected = opacity * torch.exp(-0.5 * r2 / var)
    expected = torch.where(expected < 1 / 255, torch.zeros(()), expected)
    assert torch.allclose(alpha[0, 0], expected, atol=1e-4)
    # red over white: g = b = 1 − α, r = 1
    assert torch.allclose(rgb[0, 1], 1 - alpha[0, 0], atol=1e-5)
    assert torch.allclose(rgb[0, 0], torch.ones(SIZE, SIZE), atol=1e-5)


def test_empty_view_is_background():
    bg = torch.tensor([0.2, 0.4, 0.6])
    for means in (torch.zeros(0, 3), torch.tensor([[2.0 * DIST, 0.0, 0.0], [0.0, 0.0, 50.0]])):
        rgb, alpha = render_gaussians(*gaussians(means), camera(), bg)
        assert rgb.shape == (1, 3, SIZE, SIZE) and alpha.shape == (1, 1, SIZE, SIZE)
        assert torch.allclose(rgb, bg.reshape(1, 3, 1, 1).expand_as(rgb)) and (alpha == 0).all()


def test_overlapping_gaussians_composite_front_to_back():
    near_far = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])  # camera at +x: index 0 is nearer
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    opac = torch.tensor([0.7, 0.9])
    args = lambda order: (near_far[order], torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.2),  # noqa: E731
                          opac[order], colors[order])
    rgb, alpha = render_gaussians(*args([0, 1]), camera(), WHITE)
    rgb_swapped, _ = render_gaussians(*args([1, 0]), camera(), WHITE)
    assert torch.allclose(rgb, rgb_swapped, atol=1e-6)
    c = SIZE // 2  # pixel centre 0.5 px from the projected centres: alphas ≈ opacities
    pixel = rgb[0, :, c, c]
    a_near = opac[0] * math.exp(-0.5 * 0.5 / ((FOCAL * 0.2 / (DIST - 0.5)) ** 2 + 0.3))
    a_far = opac[1] * math.exp(-0.5 * 0.5 / ((FOCAL * 0.2 / (DIST + 0.5)) ** 2 + 0.3))
    expected = a_near * colors[0] + (1 - a_near) * a_far * colors[1] + (1 - a_near) * (1 - a_far) * WHITE
    assert torch.allclose(pixel, expected, atol=1e-4)
    assert pixel[0] > pixel[2]  # the nearer red dominates
    assert float(alpha[0, 0, c, c]) == pytest.approx(float(1 - (1 - a_near) * (1 - a_far)), abs=1e-4)


def test_gradients_flow_to_every_input():
    g = torch.Generator().manual_seed(0)
    n = 50
    inputs = [0.4 * torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g),
              0.05 + 0.05 * torch.rand(n, 3, generator=g), 0.2 + 0.6 * torch.rand(n, generator=g),
              torch.rand(n, 3, generator=g)]
    inputs = [x.requires_grad_() for x in inputs]
    cams = orbit_cameras(torch.tensor([0.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([2.5, 2.5]),
                         torch.tensor([FOVY, FOVY]), 32, 32)
    rgb, alpha = render_gaussians(*inputs, cams, WHITE)
    ((rgb * torch.rand(rgb.shape, generator=g)).sum() + alpha.sum()).backward()
    for name, x in zip(("means", "quats", "scales", "opacities", "colors"), inputs):
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


def test_fits_a_target_image_from_one_camera():
    rep = GaussiansRepresentation(GaussiansConfig(num_points=500, densify_until=0), PixelPrior())
    cams = rep.default_cameras()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = ((xs - 16) ** 2 + (ys - 14) ** 2 < 60).float()
    target = torch.ones(1, 3, 32, 32)
    target[0, :, disk > 0] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(rep.render(cams), target).item()
    after = fit_renders(rep, target, cams, steps=100)
    assert after < 0.05 * before, (before, after)


def _densified(**overrides) -> tuple[GaussiansRepresentation, torch.optim.Optimizer]:
    cfg = GaussiansConfig(num_points=200, densify_from=0, densify_every=2, densify_until=100,
                          grad_threshold=0.0, **overrides)
    rep = GaussiansRepresentation(cfg, PixelPrior())
    with torch.no_grad():
        rep.log_scales[:100] = math.log(0.05)  # large: split; the rest (0.03 > 0.01) too unless raised
        rep.opacity_logits[-10:] = -10.0  # transparent: pruned
    optimizer = rep.make_optimizer("adam", 0.03)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        rep.render().mean().backward()
        optimizer.step()
        rep.after_step(step, optimizer)
    return rep, optimizer


def test_densification_changes_count_and_keeps_the_optimizer_consistent():
    rep, optimizer = _densified(split_scale=0.04, max_points=10_000)
    n = rep.num_points
    # 100 split into 200, 90 cloned into 180 → 380 (the 10 transparent ones are pruned)
    assert n == 100 * 2 + 90 * 2, n
    for group in optimizer.param_groups:
        param = group["params"][0]
        assert param is getattr(rep, group["name"]) and len(param) == n
        assert all(v.shape == param.shape for v in optimizer.state[param].values() if v.dim() > 0)
    optimizer.zero_grad(set_to_none=True)
    rep.render().mean().backward()
    optimizer.step()
    assert all(torch.isfinite(getattr(rep, name)).all() for name in PARAMS)
    capped, _ = _densified(max_points=250)
    assert capped.num_points <= 250


def test_ply_round_trip(tmp_path):
    rep, _ = _densified(max_points=300)
    path = rep.export(tmp_path, PixelPrior())[0]
    assert path.name == "gaussians.ply"
    from plyfile import PlyData

    names = [p.name for p in PlyData.read(str(path))["vertex"].properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)]  # SH degree 3, as 3DGS's load_ply expects
    assert names[54] == "opacity"
    f_dc = torch.tensor(PlyData.read(str(path))["vertex"]["f_dc_0"])
    assert torch.allclose(f_dc, (rep.color_logits[:, 0].sigmoid().detach() - 0.5) / SH_C0, atol=1e-5)
    other = GaussiansRepresentation(GaussiansConfig(num_points=10), PixelPrior())
    other.load_ply(path)
    assert other.num_points == rep.num_points
    for name in ("means", "log_scales", "opacity_logits"):
        assert torch.allclose(getattr(other, name), getattr(rep, name), atol=1e-6), name
    assert torch.allclose(other.quats, torch.nn.functional.normalize(rep.quats, dim=-1), atol=1e-6)
    assert torch.allclose(other.color_logits.sigmoid(), rep.color_logits.sigmoid(), atol=1e-5)
    assert torch.allclose(other.render(), rep.render(), atol=1e-4)


def test_checkpoint_round_trip_after_densification():
    rep, optimizer = _densified(max_points=300)
    buffer = io.BytesIO()
    torch.save({"rep": rep.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    fresh = GaussiansRepresentation(rep.cfg, PixelPrior())
    fresh.load_state_dict(ckpt["rep"])
    fresh_opt = fresh.make_optimizer("adam", 0.03)  # built after loading, as the trainer does
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh.num_points == rep.num_points
    for r, o in ((rep, optimizer), (fresh, fresh_opt)):  # one more identical step on both
        o.zero_grad(set_to_none=True)
        r.render().mean().backward()
        o.step()
    for name in PARAMS:
        assert torch.equal(getattr(fresh, name), getattr(rep, name)), name


def test_config_composes_and_final_image(compose):
    cfg = compose("representation=gaussians", "representation.num_points=64", "prior.image_size=16")
    assert cfg.representation.name == "gaussians" and cfg.representation.background == [1.0, 1.0, 1.0]
    from dsd import registry

    class Prior16(PixelPrior):
        image_shape = (3, 16, 16)

    rep = registry.build("representation", cfg.representation, prior=Prior16(), device="cpu")
    assert rep.is_3d and rep.num_points == 64
    image = rep.final_image(Prior16())
    assert image.shape == (16, 16, 3) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's rasterizer needs CUDA; CPU fallback tested above")
def test_torch_backend_matches_gsplat_cuda():
    g = torch.Generator().manual_seed(0)
    n = 300
    inputs = [0.4 * torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g),
              0.02 + 0.05 * torch.rand(n, 3, generator=g), 0.1 + 0.8 * torch.rand(n, generator=g),
              torch.rand(n, 3, generator=g)]
    cams = orbit_cameras(torch.tensor([10.0, 40.0]), torch.tensor([0.0, -70.0]), torch.tensor([2.5, 2.5]),
                         torch.tensor([FOVY, FOVY]), 48, 40)
    cpu = [x.clone().requires_grad_() for x in inputs]
    gpu = [x.cuda().requires_grad_() for x in inputs]
    bg = torch.tensor([0.3, 0.5, 0.7])
    rgb_cpu, alpha_cpu = render_gaussians(*cpu, cams, bg, backend="torch")
    rgb_gpu, alpha_gpu = render_gaussians(*gpu, cams, bg.cuda(), backend="gsplat")
    assert rgb_gpu.shape == rgb_cpu.shape == (2, 3, 40, 48)
    assert (rgb_gpu.cpu() - rgb_cpu).abs().max() < 2e-3
    assert (alpha_gpu.cpu() - alpha_cpu).abs().max() < 2e-3
    weights = torch.rand(rgb_cpu.shape, generator=g)
    (rgb_cpu * weights).sum().backward()
    (rgb_gpu * weights.cuda()).sum().backward()
    for a, b in zip(cpu, gpu):
        assert torch.allclose(b.grad.cpu(), a.grad, rtol=2e-2, atol=2e-3 * a.grad.abs().max())


def test_a_learning_rate_the_gaussians_do_not_use_is_said_once(capsys, monkeypatch):
    import dsd.representations.gaussians as module
    from dsd.config import TrainerConfig

    monkeypatch.setattr(module, "_said_lr_ignored", False)
    rep = GaussiansRepresentation(GaussiansConfig(num_points=10), PixelPrior())
    optimizer = rep.make_optimizer("adam", TrainerConfig.lr)  # the default: nothing to say
    assert "not used" not in capsys.readouterr().err
    assert sorted(g["lr"] for g in optimizer.param_groups) == sorted(
        [rep.cfg.lr_means, rep.cfg.lr_scales, rep.cfg.lr_quats, rep.cfg.lr_opacities, rep.cfg.lr_colors])
    rep.make_optimizer("adam", 0.5)
    rep.make_optimizer("adam", 0.5)
    err = capsys.readouterr().err
    assert err.count("is not used by representation=gaussians") == 1 and "representation.lr_means" in err
