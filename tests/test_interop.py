"""Our output files as other tools read them: glTF viewers (y-up), the 3DGS ply loader, file modes
for collaborators, and mp4s that stream."""

import math
import os
import struct

import numpy as np
import pytest
import torch

from dsd.export_mesh import extract_mesh, write_mesh
from dsd.export_ply import write_gaussians_ply
from dsd.outputs import save_grid, save_json, save_png, save_result, save_torch, save_video

# ---- mesh.glb / mesh.obj: y-up ----------------------------------------------------------------

SEMI_AXES = torch.tensor([0.15, 0.25, 0.45])  # along our x, y, z: tallest along our up axis z
CENTER = torch.tensor([0.2, -0.1, 0.05])


def _ellipsoid_mesh():
    density = lambda p: 1 - (((p - CENTER) / SEMI_AXES) ** 2).sum(-1)  # noqa: E731  (> 0 inside)
    color = lambda p: torch.full_like(p, 0.5)  # noqa: E731
    return extract_mesh(density, color, resolution=40, threshold=0.0, bound=0.8)


def _in_gltf_frame(v):
    """Our z-up world, front at +x (dsd/cameras.py) -> glTF 2.0 (spec 3.4): +Y up, front faces +Z,
    right-handed. So X = our y, Y = our z, Z = our x."""
    v = np.asarray(v, dtype=np.float64)
    return np.stack([v[..., 1], v[..., 2], v[..., 0]], axis=-1)


def test_glb_is_y_up_with_outward_faces_and_normals(tmp_path):
    import json

    import trimesh

    mesh = _ellipsoid_mesh()
    world_vertices = mesh.vertices.copy()
    obj_path, glb_path = write_mesh(mesh, tmp_path)
    assert np.array_equal(mesh.vertices, world_vertices)  # the caller's mesh stays in our frame

    glb = trimesh.load(glb_path, force="mesh", process=False)
    spacing = 1.6 / 39  # marching-cubes lattice step
    expected_extents = _in_gltf_frame(2 * SEMI_AXES.numpy())
    assert np.abs(glb.extents - expected_extents).max() < spacing, (glb.extents, expected_extents)
    assert np.argmax(glb.extents) == 1  # tall along +Y
    center = _in_gltf_frame(CENTER.numpy())
    assert np.abs(glb.bounds.mean(0) - center).max() < spacing, (glb.bounds.mean(0), center)

    # a proper rotation keeps the winding outward: signed volume > 0 and every face normal points
    # away from the centre of the (convex) ellipsoid
    assert glb.volume > 0
    assert (np.einsum("ij,ij->i", glb.face_normals, glb.triangles_center - center) > 0).all()
    # the stored NORMAL accessor is rotated too (viewers shade with it)
    length, _ = struct.unpack("<II", glb_path.read_bytes()[12:20])
    gltf = json.loads(glb_path.read_bytes()[20 : 20 + length])
    assert "NORMAL" in gltf["meshes"][0]["primitives"][0]["attributes"]
    assert (np.einsum("ij,ij->i", glb.vertex_normals, glb.vertices - center) > 0).all()

    obj = trimesh.load(obj_path, force="mesh", process=False)  # the obj is in the same y-up frame
    assert np.allclose(obj.bounds, glb.bounds, atol=1e-5)


# ---- gaussians.ply: the 3DGS layout (SH degree 3) -----------------------------------------------


def _three_dgs_property_names(sh_degree=3):
    """The vertex properties, in order, of 3DGS GaussianModel.save_ply (construct_list_of_attributes):
    x y z nx ny nz f_dc_0..2 f_rest_0..(3·((d+1)²−1)−1) opacity scale_0..2 rot_0..3."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(rest)] + ["opacity"]
            + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def _load_like_3dgs(path, max_sh_degree=3):
    """The steps of 3DGS GaussianModel.load_ply, in numpy: activated values per gaussian."""
    from plyfile import PlyData

    v = PlyData.read(str(path)).elements[0]
    n = len(v["x"])
    xyz = np.stack([np.asarray(v[c]) for c in "xyz"], axis=1)
    dc = np.stack([np.asarray(v[f"f_dc_{i}"]) for i in range(3)], axis=1)[:, :, None]  # (N, 3, 1)
    rest_names = sorted((p.name for p in v.properties if p.name.startswith("f_rest_")),
                        key=lambda name: int(name.split("_")[-1]))
    assert len(rest_names) == 3 * (max_sh_degree + 1) ** 2 - 3  # the loader's assert
    rest = np.stack([np.asarray(v[name]) for name in rest_names], axis=1)
    rest = rest.reshape(n, 3, (max_sh_degree + 1) ** 2 - 1)  # channel-major: (N, channel, coefficient)

    def by_index(prefix):
        names = sorted((p.name for p in v.properties if p.name.startswith(prefix)), key=lambda s: int(s.split("_")[-1]))
        return np.stack([np.asarray(v[name]) for name in names], axis=1)

    c0 = 1 / (2 * math.sqrt(math.pi))  # Y_0^0
    quats = by_index("rot")
    return {
        "means": xyz,
        "colors": c0 * dc[:, :, 0] + 0.5,  # SH2RGB of the degree-0 term
        "sh_rest": rest,
        "opacities": 1 / (1 + np.exp(-np.asarray(v["opacity"]))),
        "scales": np.exp(by_index("scale_")),
        "quats": quats / np.linalg.norm(quats, axis=1, keepdims=True),
    }


def test_ply_loads_like_the_3dgs_loader(tmp_path):
    from plyfile import PlyData

    g = torch.Generator().manual_seed(0)
    n = 11
    means = torch.randn(n, 3, generator=g)
    log_scales = torch.randn(n, 3, generator=g) - 3
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacity_logits = torch.randn(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    path = write_gaussians_ply(tmp_path / "gaussians.ply", means, log_scales, quats, opacity_logits, colors)

    assert [p.name for p in PlyData.read(str(path))["vertex"].properties] == _three_dgs_property_names()
    loaded = _load_like_3dgs(path)
    assert np.allclose(loaded["means"], means.numpy(), atol=1e-6)
    assert np.allclose(loaded["colors"], colors.numpy(), atol=1e-5)
    assert not loaded["sh_rest"].any()  # view-independent colours: no higher-order terms
    assert np.allclose(loaded["opacities"], torch.sigmoid(opacity_logits).numpy(), atol=1e-6)
    assert np.allclose(loaded["scales"], log_scales.exp().numpy(), rtol=1e-5)
    assert np.allclose(loaded["quats"], quats.numpy(), atol=1e-6)


# ---- file modes and mp4 layout ------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set a known umask for the test and restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    image = np.full((4, 4, 3), 0.5, dtype=np.float32)
    writers = {
        "summary.json": lambda p: save_json(p, {"a": 1}),
        "checkpoint.pt": lambda p: save_torch(p, {"x": torch.zeros(2)}),
        "result.npz": lambda p: save_result(p, image),
        "final.png": lambda p: save_png(p, image),
        "grid.png": lambda p: save_grid(p, [image], ["seed 0"]),
        "turntable.mp4": lambda p: save_video(p, np.stack([image] * 2)),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        mode = (tmp_path / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~mask, (name, oct(mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temporary files left


def _top_level_boxes(data: bytes) -> list[str]:
    """ISO-BMFF top-level boxes: 4-byte big-endian size (1: a 64-bit size follows; 0: to the end),
    then a 4-byte type."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:
            size = len(data) - offset
        assert size >= 8, (kind, size)
        boxes.append(kind.decode("latin-1"))
        offset += size
    assert offset == len(data)
    return boxes


def test_mp4_index_comes_before_the_media_data(tmp_path):
    frames = np.random.default_rng(0).random((6, 16, 16, 3))
    save_video(tmp_path / "turntable.mp4", frames)
    boxes = _top_level_boxes((tmp_path / "turntable.mp4").read_bytes())
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat"), boxes
