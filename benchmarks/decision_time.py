"""When along the DDIM ODE does the analytic prior decide each seed's reference?

Prints, per grid point g_j, the fraction of seeds whose nearest reference of the one-step
prediction x0(g_j) equals the reference of the finished DDIM sample (dsd.metrics.decision), for
each prompt of the pool and each data set. A prior that is ~1.0 at g_0 decides the result from the
noise alone at t = T, so a diversity figure measured on it is the start point, not the guidance.
Target for the default data (`prior.data=colourways`): <= 0.5 at g_0 and < 1 at every grid point
above 0.6T (inside DSD's t range 0.98T -> 0.32T).

    .venv/bin/python benchmarks/decision_time.py --seeds 64
"""

from __future__ import annotations

import argparse

import torch

from dsd.metrics.decision import decision_curve
from dsd.metrics.reference import reach_threshold_db
from dsd.priors.analytic import DEFAULT_POOL, AnalyticPrior, AnalyticPriorConfig
from dsd.priors.procedural import DATA_SETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="N_ddim")
    parser.add_argument("--cfg", type=float, default=7.5, help="the ODE's CFG scale")
    parser.add_argument("--data", nargs="*", default=list(DATA_SETS))
    parser.add_argument("--prompts", nargs="*", default=DEFAULT_POOL)
    parser.add_argument("--views", type=int, default=4, help="3D: evaluation views of the first prompt (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is faster on a busy 2-core machine
    seeds = list(range(args.seeds))
    for data in args.data:
        prior = AnalyticPrior(AnalyticPriorConfig(data=data))
        T = prior.num_train_timesteps
        curves = {}
        for prompt in args.prompts:
            grid, curves[prompt] = decision_curve(prior, prompt, seeds, args.steps, args.cfg)
        mean = torch.stack(list(curves.values())).mean(0)
        print(f"\nprior.data={data}: decided fraction of {args.seeds} seeds at each grid point "
              f"(K={prior.cfg.num_references}, {prior.cfg.image_size} px, ODE CFG {args.cfg}, N_ddim {args.steps})\n")
        print("| prompt | " + " | ".join(f"g{j}={int(t)} ({t / T:.1f}T)" for j, t in enumerate(grid.tolist()))
              + " | reach threshold dB |")
        print("|---|" + "---|" * (len(grid) + 1))
        for prompt, curve in curves.items():
            threshold = reach_threshold_db(prior.references(prompt))
            print(f"| {prompt} | " + " | ".join(f"{v:.2f}" for v in curve.tolist()) + f" | {threshold:.1f} |")
        print("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in mean.tolist()) + " | |")
        above = [j for j, t in enumerate(grid.tolist()) if t > 0.6 * T]
        worst_g0 = max(float(c[0]) for c in curves.values())
        undecided = all(float(c[j]) < 1 for c in curves.values() for j in above)
        print(f"\ntarget: every prompt <= 0.5 at g0 (worst {worst_g0:.2f}) and < 1 at every g_j > 0.6T: "
              f"{'met' if worst_g0 <= 0.5 and undecided else 'NOT met'}")
        if args.views:
            print_3d(prior, args.prompts[0], seeds, args.views, args.steps, args.cfg)


def print_3d(prior, prompt: str, seeds: list[int], views: int, steps: int, cfg: float) -> None:
    """The same per evaluation view of the 3D prior (the references rendered from that camera)."""
    from dsd.cameras import eval_cameras
    from dsd.config import CameraConfig

    cameras = eval_cameras(CameraConfig(), views, prior.cfg.image_size)
    print(f"\n3D, prompt {prompt!r}, per evaluation view (elevation {CameraConfig().eval_elevation}°):\n")
    curves = []
    for view in range(views):
        grid, curve = decision_curve(prior, prompt, seeds, steps, cfg, camera=cameras.rows([view]))
        curves.append(curve)
    print("| azimuth | " + " | ".join(f"g{j}={int(t)}" for j, t in enumerate(grid.tolist())) + " |")
    print("|---|" + "---|" * len(grid))
    for azimuth, curve in zip(cameras.azimuth_deg.tolist(), curves):
        print(f"| {azimuth:.0f}° | " + " | ".join(f"{v:.2f}" for v in curve.tolist()) + " |")


if __name__ == "__main__":
    main()
