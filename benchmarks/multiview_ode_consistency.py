"""Does a seed's ODE land on the same shape from every camera set it is trained with?

On the multi-view analytic prior (prior.mode=multiview, the make-demo cameras) DDIM from a seed's
4 slot noises is run jointly on every camera SET training can draw (elevation and first azimuth on
the 15° grid of experiment=demo, 4 views 90° apart, view slot k in the k-th quarter), and on the
evaluation turntable that dsd-sample uses. Prints, per seed, the evaluation-set shape, how the
training sets' shapes are distributed, and their majority: a DSD run follows the ODEs of the
training sets, so where those disagree with the evaluation set, "lands on its own DDIM sample"
cannot hold for every seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multiview_ode_consistency.py --seeds 8
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from dsd.cameras import Cameras, multiview_order, orbit_cameras  # noqa: E402
from dsd.compose import compose_config  # noqa: E402
from dsd.metrics.reference import nearest_reference  # noqa: E402
from dsd.ode import ddim_sample  # noqa: E402
from dsd.run import build_prior, evaluation_cameras  # noqa: E402
from dsd.seeding import prior_eps_star  # noqa: E402


def camera_sets(cfg, size: int) -> list[Cameras]:
    """Every camera set sample_multiview_cameras can return under cfg (no perturbation, quantized)."""
    q, (lo, hi) = cfg.quantize_deg, cfg.azimuth_range
    elevations = torch.arange(cfg.elevation_range[0], cfg.elevation_range[1] + 1e-6, q)
    offsets = torch.arange(lo, lo + (hi - lo) / 4 + 1e-6, q)
    sets = []
    for e in elevations.tolist():
        for o in offsets.tolist():
            az = torch.tensor([o + k * 90.0 for k in range(4)], dtype=torch.float64)
            full = lambda v: torch.full((4,), float(v), dtype=torch.float64)  # noqa: E731
            sets.append(orbit_cameras(full(e), az, full(cfg.distance_range[0]), full(cfg.fovy_range[0]), size, size))
    return sets


def shapes_of(prior, prompt: str, seed: int, sets: list[Cameras], steps: int, cfg_scale: float) -> list[int]:
    eps = prior_eps_star(seed, prior)
    x0 = ddim_sample(prior, eps.repeat(len(sets), 1, 1, 1), prior.condition(prompt, 4 * len(sets), Cameras.cat(sets)),
                     steps, cfg_scale)
    images = prior.decode(x0).permute(0, 2, 3, 1).reshape(len(sets), 4, *x0.shape[-2:], 3)
    out = []
    for cams, views in zip(sets, images):
        refs = prior.reference_renders(prompt, cams).permute(0, 1, 3, 4, 2)
        out.append(nearest_reference(views, refs)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--prompt", default="a hamburger")
    args = parser.parse_args()
    cfg = compose_config(["experiment=demo", "prior.mode=multiview", "wandb.mode=disabled", "device=cpu"])
    prior = build_prior(cfg, torch.device("cpu"))
    size = prior.image_shape[-1]
    sets = camera_sets(cfg.camera, size)
    evaluation = evaluation_cameras(cfg, prior)
    evaluation = evaluation.rows(multiview_order(evaluation, 4, cfg.camera.azimuth_range))
    print(f"\n{len(sets)} training camera sets; DDIM {cfg.sampler.steps} steps, CFG {cfg.sampler.cfg_scale}\n")
    print("| seed | evaluation-set shape | training-set shapes (count) | majority | share of majority |")
    print("|---|---|---|---|---|")
    for seed in range(args.seeds):
        own = shapes_of(prior, args.prompt, seed, [evaluation], cfg.sampler.steps, cfg.sampler.cfg_scale)[0]
        counts = collections.Counter(shapes_of(prior, args.prompt, seed, sets, cfg.sampler.steps, cfg.sampler.cfg_scale))
        majority, n = counts.most_common(1)[0]
        shown = ", ".join(f"{k}×{c}" for k, c in counts.most_common())
        print(f"| {seed} | {own} | {shown} | {majority} | {n}/{len(sets)} |")


if __name__ == "__main__":
    main()
