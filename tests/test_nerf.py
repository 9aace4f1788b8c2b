"""representation=nerf: ray convention, init blob, gradients, fitting, regularizers, mesh, state."""

from __future__ import annotations

import math

import pytest
import torch

from dsd.cameras import camera_rays, orbit_cameras
from dsd.representations.nerf import (
    NerfConfig,
    NerfRepresentation,
    convexity_loss,
    depth_variance,
    ramp_at,
)

NO_ORIENT = dict(lambda_orient=0.0)


class PixelPrior:
    """Stand-in for a pixel prior: prior space is [−1, 1]."""

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1)


def cams(res: int, elevation=(15.0,), azimuth=(0.0,), distance=2.0, fovy=60.0):
    n = len(elevation)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return orbit_cameras(torch.tensor(elevation), torch.tensor(azimuth), full(distance), full(fovy), res, res)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Intra-op threads spin and thrash when the few CPU cores are shared; one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nerf(**overrides) -> NerfRepresentation:
    torch.manual_seed(0)
    return NerfRepresentation(NerfConfig(**{**NO_ORIENT, **overrides}))


def test_centre_ray_hits_origin_and_corner_rays_follow_intrinsics():
    cameras = cams(33, elevation=(0.0, 30.0, -10.0, 80.0), azimuth=(0.0, 90.0, -135.0, 45.0), fovy=50.0)
    origins, directions = camera_rays(cameras)  # (V, H, W, 3)
    position = cameras.c2w[:, :3, 3]
    torch.testing.assert_close(origins[:, 16, 16], position)
    torch.testing.assert_close(directions[:, 16, 16], -position / position.norm(dim=-1, keepdim=True))
    # corners in the camera frame: ((j + ½ − cx)/f, −(i + ½ − cy)/f, −1), row 0 = top (camera +y)
    K = cameras.intrinsics()
    f, c = K[0, 0, 0], K[0, 0, 2]
    d_cam = torch.einsum("vba,vhwb->vhwa", cameras.c2w[:, :3, :3], directions)  # world -> camera
    for i, j in [(0, 0), (0, 32), (32, 0), (32, 32)]:
        expect = torch.tensor([(j + 0.5 - c) / f, -(i + 0.5 - c) / f, -1.0])
        torch.testing.assert_close(d_cam[:, i, j], (expect / expect.norm()).expand(4, 3))
    # the top-left pixel sees the world above (z) and left of the view direction
    assert (directions[0, 0, 0, 2] > 0) and (directions[0, 0, 0, 1] < 0)  # front camera looks along −x


def test_rays_match_nerfstudio_cameras():
    from nerfstudio.cameras.cameras import Cameras as NSCameras

    cameras = cams(16, elevation=(20.0, -5.0), azimuth=(30.0, 170.0), fovy=40.0)
    K = cameras.intrinsics()
    ns = NSCameras(camera_to_worlds=cameras.c2w[:, :3, :4], fx=K[:, 0, 0:1], fy=K[:, 1, 1:2], cx=K[:, 0, 2:3],
                   cy=K[:, 1, 2:3], width=16, height=16)
    origins, directions = camera_rays(cameras)
    for v in range(2):
        bundle = ns.generate_rays(camera_indices=v)  # (H, W)
        torch.testing.assert_close(bundle.origins, origins[v])
        torch.testing.assert_close(bundle.directions, directions[v], atol=1e-5, rtol=1e-5)


def test_init_blob_renders_an_opaque_disc_on_the_background():
    rep = nerf()
    rep.eval()
    with torch.no_grad():
        image = rep.render(cams(32))[0]
    opacity = rep._last["opacity"].reshape(32, 32)
    assert opacity[14:18, 14:18].min() > 0.95
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert opacity[i, j] < 0.01
        torch.testing.assert_close(image[:, i, j], torch.ones(3), atol=0.01, rtol=0)
    assert (image[:, 16, 16] - 1).abs().max() > 0.2  # the centre is the blob's colour, not the background
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1


def test_gradients_reach_every_parameter_group():
    rep = nerf(background="mlp", lambda_orient=1.0, lambda_opaque=0.1)
    image = rep.render(cams(12, fovy=70.0))
    loss = (image - 0.3).square().mean() + sum(rep.regularizers().values())
    loss.backward()
    groups = rep.field.param_groups()
    assert set(groups) == {"encoding", "network", "background"}
    for name, params in groups.items():
        grads = [p.grad for p in params]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    optimizer = rep.make_optimizer("adam", 0.03)  # trainer.lr is ignored by default
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"encoding": 0.01, "network": 0.001, "background": 0.001}
    scaled = nerf(use_trainer_lr=True).make_optimizer("sgd", 0.02)
    assert {g["name"]: g["lr"] for g in scaled.param_groups} == pytest.approx({"encoding": 0.02, "network": 0.002})


def test_fitting_one_view_reduces_mse():
    rep = nerf(lambda_sparsity=0.0, num_samples=32)
    cameras = cams(20)
    target = torch.ones(1, 3, 20, 20)
    target[:, :, 5:15, 5:15] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red square on white
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(rep.render(cameras), target).item()
    optimizer = rep.make_optimizer("adam", 0.0)
    for step in range(60):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(rep.render(cameras), target).backward()
        optimizer.step()
        rep.after_step(step, optimizer)
    rep.eval()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(rep.render(cameras), target).item()
    print(f"fit: mse {before:.4f} -> {after:.4f}")
    assert after < 0.25 * before, (before, after)


def test_regularizers_are_finite_differentiable_and_zero_weight_skips_them():
    rep = nerf(lambda_orient=[0, 10.0, 1000.0, 100], lambda_sparsity=1.0, lambda_opaque=0.5, lambda_z_variance=0.1,
               lambda_convex=1.0)
    rep.render(cams(10))
    losses = rep.regularizers()
    assert set(losses) == {"orient", "sparsity", "opaque", "z_variance", "convex"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value) and value.requires_grad, name
        (grad,) = torch.autograd.grad(value, rep.field.density_mlp.parameters().__next__(), retain_graph=True,
                                      allow_unused=True)
        assert grad is not None and torch.isfinite(grad).all(), name
    assert rep.weights_at(50)["orient"] == pytest.approx(505.0)

    off = nerf(lambda_sparsity=0.0, lambda_opaque=0.0, lambda_z_variance=0.0)
    image = off.render(cams(10))
    assert off.regularizers() == {}
    assert set(off._last) == {"opacity"}  # no normals, depth or z-variance were computed
    assert image.requires_grad
    with torch.no_grad():  # no autograd: normals are never computed, even with a weight
        rep.render(cams(10))
    assert "orient" not in rep._last and "normal_map" not in rep._last


def test_weights_follow_threestudios_ramp_and_are_read_at_the_current_step():
    # [start_step, start_value, end_value, end_step]: DSD's sparsity ramp and a delayed one
    sparsity = [0, 0.15, 0.0, 3000]
    assert ramp_at(sparsity, 0) == pytest.approx(0.15)
    assert ramp_at(sparsity, 1000) == pytest.approx(0.15 * (1 - 1000 / 3000))
    assert ramp_at(sparsity, 3000) == 0.0 and ramp_at(sparsity, 9000) == 0.0
    delayed = [100, 2.0, 4.0, 300]
    assert ramp_at(delayed, 0) == 2.0 and ramp_at(delayed, 100) == 2.0 and ramp_at(delayed, 350) == 4.0
    assert ramp_at(delayed, 150) == pytest.approx(2.0 + 2.0 * 50 / 200)
    assert ramp_at([0, 1.0, 1.0, 5000], 2500) == 1.0 and ramp_at(0.1, 123) == 0.1

    rep = nerf(lambda_sparsity=[0, 0.15, 0.0, 3000], stratified=False)  # no jitter: equal renders
    optimizer = rep.make_optimizer("adam", 0.0)
    rep.render(cams(6))
    at_start = rep.regularizers()["sparsity"]
    for step in range(1500):  # the step counter the ramps read (checkpointed with the state)
        rep.after_step(step, optimizer)
    rep.render(cams(6))
    torch.testing.assert_close(rep.regularizers()["sparsity"], 0.5 * at_start)
    rep.after_step(2999, optimizer)
    rep.render(cams(6))
    assert "sparsity" not in rep.regularizers()  # weight 0 from step 3000 on


def test_depth_variance_is_the_spread_of_the_normalized_weights():
    depths = torch.tensor([1.0, 1.5, 2.0, 2.5])[None, :, None].repeat(3, 1, 1)  # (N=3, S=4, 1)
    weights = torch.tensor([[0.0, 0.6, 0.0, 0.0],  # one surface: no spread, whatever the opacity
                            [0.3, 0.0, 0.0, 0.3],  # two equal peaks 1.5 apart, opacity 0.6
                            [0.0, 0.45, 0.45, 0.0]])[..., None]  # two equal peaks 0.5 apart, opacity 0.9
    opacity = weights.sum(1)
    variance = depth_variance(weights, depths, opacity)[:, 0]
    # two equal point masses d apart have variance (d/2)², independent of the ray's opacity
    torch.testing.assert_close(variance, torch.tensor([0.0, 0.75**2, 0.25**2]))


def sphere_normal_map(res: int, mirror: bool = False) -> torch.Tensor:
    """The encoded normal map (1, res, res, 3) of the unit sphere seen from the front camera (on +x,
    image right = world +y, image up = +z), or of its mirror image (normals turning the other way)."""
    v = (torch.arange(res) + 0.5) / res * 2 - 1  # pixel centres in [−1, 1]
    z, y = torch.meshgrid(-v, v, indexing="ij")  # row 0 is the top
    inside = (y**2 + z**2 < 1).float()
    x = (1 - y**2 - z**2).clamp_min(0).sqrt()
    normal = torch.stack([x, -y if mirror else y, z], dim=-1)
    return ((normal + 1) / 2 * inside[..., None])[None]


def test_convexity_loss_is_zero_when_flat_rewards_convex_and_penalizes_concave():
    flat = torch.tensor([0.9, 0.3, 0.5]).expand(1, 16, 16, 3)
    assert convexity_loss(flat, 8) == 0
    assert convexity_loss(sphere_normal_map(32), 8) < -0.01
    assert convexity_loss(sphere_normal_map(32, mirror=True), 8) > 0.01
    # the definition on a random 4×4 map (no resize at res 4), pair by pair
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(1, 4, 4, 3, generator=gen)
    h = [float(m[0, i, j, 0] * m[0, i, j + 1, 1] - m[0, i, j, 1] * m[0, i, j + 1, 0])
         for i in range(4) for j in range(3)]  # left × right, z component
    v = [float(m[0, i + 1, j, 0] * m[0, i, j, 1] - m[0, i + 1, j, 1] * m[0, i, j, 0])
         for i in range(3) for j in range(4)]  # lower × upper, z component
    expected = -(sum(h) / len(h) + sum(v) / len(v))
    assert float(convexity_loss(m, 4)) == pytest.approx(expected, abs=1e-6)


def test_mesh_export_of_the_blob(tmp_path):
    import trimesh

    rep = nerf(mesh_resolution=40)
    paths = rep.export(tmp_path, None)
    assert [p.name for p in paths] == ["mesh.obj", "mesh.glb"] and all(p.stat().st_size > 0 for p in paths)
    mesh = trimesh.load(paths[0], force="mesh", process=False)
    assert len(mesh.faces) > 100
    welded = trimesh.Trimesh(mesh.vertices, mesh.faces)  # merge duplicate vertices before the topology check
    assert welded.is_watertight
    assert welded.volume > 0  # faces point outwards
    # softplus(10·(1 − r/0.5) + raw) = 1 with raw ≈ 0 at init: r = 0.5·(1 − ln(e − 1)/10)
    expected = 0.5 * (1 - math.log(math.e - 1) / 10)
    radii = torch.from_numpy(mesh.vertices).norm(dim=-1)
    assert (radii - expected).abs().max() < 0.015, (radii.min(), radii.max(), expected)
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    glb = trimesh.load(paths[1], force="mesh")
    assert len(glb.faces) == len(mesh.faces)


def test_state_dict_round_trip_reproduces_renders():
    rep = nerf(background="mlp")
    optimizer = rep.make_optimizer("adam", 0.0)
    for step in range(3):  # move away from the init so the check is not trivial
        optimizer.zero_grad()
        rep.render(cams(8)).mean().backward()
        optimizer.step()
        rep.after_step(step, optimizer)
    copy = nerf(background="mlp", sample_seed=1)
    copy.load_state_dict(rep.state_dict())
    assert int(copy.step) == 3
    rep.eval(), copy.eval()
    with torch.no_grad():
        assert torch.equal(rep.render(cams(8, azimuth=(40.0,))), copy.render(cams(8, azimuth=(40.0,))))
        assert not torch.equal(rep.render(cams(8)), nerf(background="mlp").render(cams(8)))
    rep.train(), copy.train()  # the jitter stream continues where the checkpoint left it
    with torch.no_grad():
        assert torch.equal(rep.render(cams(8)), copy.render(cams(8)))


def test_no_grad_renders_chunk_and_skip_empty_space_without_changing_the_image():
    full = nerf(background="mlp", eval_occupancy_res=0)
    full.eval()
    image = full.render(cams(16)).detach()  # with autograd: one chunk, every sample evaluated
    fast = nerf(background="mlp", eval_chunk_rays=50, eval_occupancy_res=8)  # 8³·4 < 16²·64 samples
    fast.load_state_dict(full.state_dict())
    fast.eval()
    occupied = fast.occupancy()
    assert 0.05 < occupied.float().mean() < 0.7  # the blob and a margin, not the whole cube
    with torch.no_grad():
        torch.testing.assert_close(fast.render(cams(16)), image, atol=1e-3, rtol=0)


def test_resolution_schedule_final_image_and_initialize():
    rep = nerf(resolutions=[16, 32, 64], resolution_milestones=[10, 20], eval_resolution=12, init_fit_steps=3)
    assert [rep.resolution_at(s) for s in (0, 9, 10, 19, 20, 1000)] == [16, 16, 32, 32, 64, 64]
    assert nerf(resolutions=[], resolution_milestones=[]).resolution_at(7) is None
    image = rep.final_image(None)
    assert image.shape == (12, 12, 3) and image.dtype == torch.float32 and rep.training
    target = torch.full((1, 3, 12, 12), -1.0)  # prior space: black
    before = rep.final_image(None).mean()
    rep.initialize_to(target, PixelPrior())
    assert rep.final_image(None).mean() < before
    assert rep.is_3d


def test_bad_config_values_are_user_errors():
    from dsd.errors import UserError

    with pytest.raises(UserError, match="background"):
        NerfRepresentation(NerfConfig(background="sky"))
    with pytest.raises(UserError, match="resolutions"):
        NerfRepresentation(NerfConfig(resolutions=[32, 64], resolution_milestones=[]))
    for ramp in ([0, 0.15, 0.0], [3000, 0.15, 0.0, 0], -1.0, [0, -1.0, 0.0, 10]):
        with pytest.raises(UserError, match="lambda_sparsity"):
            NerfRepresentation(NerfConfig(lambda_sparsity=ramp))


def test_compose_selects_nerf(compose):
    from dsd import registry

    cfg = compose("representation=nerf", "representation.num_samples=16")
    assert cfg.representation.name == "nerf" and cfg.representation.num_samples == 16
    rep = registry.build("representation", cfg.representation, prior=None, device="cpu")
    assert isinstance(rep, NerfRepresentation)


def test_dsd_nerf_preset_has_the_official_dsd_numbers(compose):
    # BillyXYB/Diverse-Score-Distillation configs/dsd.yaml:11-13 and :94-98
    cfg = compose("experiment=dsd_nerf")
    assert (cfg.guidance.name, cfg.prior.name, cfg.representation.name) == ("dsd", "sd21", "nerf")
    rep = cfg.representation
    assert rep.lambda_orient == 0.1 and rep.lambda_opaque == 0.1 and rep.lambda_z_variance == 1.0
    assert rep.lambda_sparsity == [0, 0.15, 0.0, 3000] and rep.lambda_convex == [0, 1.0, 1.0, 5000]
    assert rep.resolutions == [128, 512] and rep.resolution_milestones == [5000]
    assert cfg.trainer.steps == 10000 and cfg.camera.views_per_step == 1
    model = NerfRepresentation(NerfConfig(**{**vars(rep), "num_levels": 2, "log2_hashmap_size": 8}))
    assert [model.resolution_at(s) for s in (0, 4999, 5000)] == [128, 128, 512]
    weights = model.weights_at(1500)
    assert weights == pytest.approx({"orient": 0.1, "sparsity": 0.075, "opaque": 0.1, "z_variance": 1.0,
                                     "convex": 1.0})
    # a ramp can be replaced by a number from the command line
    assert compose("experiment=dsd_nerf", "representation.lambda_sparsity=0.5").representation.lambda_sparsity == 0.5


def test_dsd_nerf_preset_runs_on_the_analytic_prior(compose, tmp_path):
    from dsd.run import run

    cfg = compose("experiment=dsd_nerf", "prior=analytic", "prior.image_size=16", "seeds=1", "trainer.steps=2",
                  "representation.resolutions=[12]", "representation.resolution_milestones=[]",
                  "representation.num_levels=2", "representation.log2_hashmap_size=8", "representation.num_samples=8",
                  "representation.mesh_resolution=16", "representation.eval_resolution=12",
                  "camera.video_frames=0", "camera.eval_views=1", "trainer.checkpoint_every=0")
    summary = run(cfg, tmp_path)
    assert [e["steps"] for e in summary["seeds"]] == [2]


def test_occupancy_is_computed_once_per_parameter_state():
    """A turntable renders in chunks; the occupancy lattice is shared until the field changes."""
    rep = nerf(eval_occupancy_res=16)
    first = rep.occupancy()
    assert rep.occupancy() is first  # nothing changed: reused
    with torch.no_grad():  # an optimizer step changes the parameters in place
        for p in rep.field.density_mlp.parameters():
            p.mul_(-1.0)
    changed = rep.occupancy()
    assert changed is not first
    fresh = nerf(eval_occupancy_res=16)
    fresh.load_state_dict(rep.state_dict())
    assert torch.equal(fresh.occupancy(), changed)  # the cached grid is the one a fresh computation gives
    rep.load_state_dict(nerf(eval_occupancy_res=16).state_dict())  # a load is a change too
    assert torch.equal(rep.occupancy(), first)
