"""DSD's cost against SDS in 3D, side by side: prior rows per step (exact) and wall seconds
(alternated variants, median of repeats: read the ratios), on the make-demo settings (3D Gaussians,
per-view analytic prior, 15° camera grid).

Variants: sds; dsd as the official code (exact ε_ode, every camera its own ODE), with and without
the trajectory cache; dsd grid; dsd grid with ODE cameras snapped to 45° (guidance.ode_camera_deg).
On CPU the renderer (forward + backward of the Gaussians) takes a share of every step that does not
depend on the method, so wall ratios are smaller than row ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_3d.py --seeds 2 --steps 100 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from dsd.compose import compose_config  # noqa: E402
from dsd.run import run  # noqa: E402

VARIANTS = {
    "sds": ["guidance=sds"],
    "dsd (official: exact, cache off)": ["guidance=dsd", "guidance.ode_cache=false"],
    "dsd exact (cache on)": ["guidance=dsd"],
    "dsd grid": ["guidance=dsd", "guidance.ode_target=grid"],
    "dsd grid, ODE cameras 45°": ["guidance=dsd", "guidance.ode_target=grid", "guidance.ode_camera_deg=45"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    common = ["experiment=demo", f"seeds={args.seeds}", f"trainer.steps={args.steps}", "camera.video_frames=0",
              "trainer.seed_batch=1", "wandb.mode=disabled", "device=cpu"]
    rows: dict[str, list[float]] = {name: [] for name in VARIANTS}
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (name, overrides) in enumerate(VARIANTS.items()):
                summary = run(compose_config([*common, *overrides]), Path(tmp) / f"{repeat}_{i}")
                rows[name].append(summary["prior_rows_per_step"])
                wall[name].append(summary["wall_s"])
    base_rows, base_wall = statistics.mean(rows["sds"]), statistics.median(wall["sds"])
    print(f"\n3D Gaussians, analytic prior, {args.seeds} seeds x {args.steps} steps, {args.repeats} repeats "
          f"alternated, torch threads 1\n")
    print("| variant | prior rows/step | rows vs sds | median wall s | wall vs sds |\n|---|---|---|---|---|")
    for name in VARIANTS:
        r, w = statistics.mean(rows[name]), statistics.median(wall[name])
        print(f"| {name} | {r:.2f} | {r / base_rows:.2f} | {w:.1f} | {w / base_wall:.2f} |")


if __name__ == "__main__":
    main()
