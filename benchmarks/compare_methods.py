"""Every guidance method of the paper's comparison (and CFD) on the same seeds of the exact analytic
prior, one table per setting, with DDIM and init-only control rows.

Settings: `2d` (one 32x32 image per seed, 500 steps), `3d` (3D Gaussians, per-view prior, the
make-demo settings, 300 steps), `3d-multiview` (the same with prior.mode=multiview: 4 views per
object, one posterior). Columns: distinct references reached (above the reach threshold,
dsd.metrics.reference), seeds reached, median PSNR to the nearest reference, ODE agreement (seeds
whose nearest reference is the one their own DDIM sample reaches: dsd-sample on the same
settings), mean pairwise RMSE between the seeds' results (result.npz: the image, or the first
evaluation view in 3D; how far apart the seeds end up, in [0, 1] pixel units), prior rows per step
(the exact cost) and wall seconds (the shared 2-core machine: noisy).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_methods.py --setting 2d --seeds 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_methods.py --setting 3d --methods dsd sds asd
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_methods.py --setting 3d --methods sds --no-init \
        --variant "dsd grid, ODE cameras 45°" guidance=dsd guidance.ode_target=grid guidance.ode_camera_deg=45
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402

from dsd.compose import compose_config  # noqa: E402
from dsd.outputs import load_result  # noqa: E402
from dsd.run import run  # noqa: E402
from dsd.sample import sample  # noqa: E402

SETTINGS = {
    "2d": (["representation=image"], 500),
    "3d": (["experiment=demo"], 300),
    "3d-multiview": (["experiment=demo", "prior.mode=multiview"], 300),
}
METHODS = ["sds", "asd", "sdi", "consistent3d", "hifa", "vsd", "cfd", "dsd"]
# the start point alone: in 2D a vanishing step size; the Gaussians set their own per-parameter
# learning rates (trainer.lr does not reach them), so in 3D one step (as analytic_3d_diversity.py)
GUIDANCE_OFF = {"2d": ["guidance=dsd", "trainer.lr=1e-9"], "3d": ["guidance=dsd", "trainer.steps=1"],
                "3d-multiview": ["guidance=dsd", "trainer.steps=1"]}


def pairwise_rmse(run_dir: Path, seeds: list[int]) -> float:
    images = [load_result(run_dir / f"seed_{s}" / "result.npz") for s in seeds]
    return float(np.mean([np.sqrt(np.mean((a - b) ** 2)) for a, b in itertools.combinations(images, 2)]))


def table_row(name: str, summary: dict, run_dir: Path, own: list[int], rows_per_step: float) -> str:
    seeds = [e["seed"] for e in summary["seeds"]]
    refs = [e["nearest_reference"] for e in summary["seeds"]]
    agree = sum(a == b for a, b in zip(refs, own))
    psnrs = [e["psnr_to_reference"] for e in summary["seeds"]]
    n = len(seeds)
    return (f"| {name} | {summary['distinct_references']}/{n} | {summary['reached_seeds']}/{n} "
            f"| {statistics.median(psnrs):.1f} | {agree}/{n} | {pairwise_rmse(run_dir, seeds):.3f} "
            f"| {rows_per_step:.2f} | {summary['wall_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="2d")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, help="default: 500 in 2D, 300 in 3D")
    parser.add_argument("--prompt", default="a hamburger")
    parser.add_argument("--methods", nargs="*", default=METHODS, help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("LABEL", "OVERRIDE"),
                        help="an extra row: its label, then its config overrides (repeatable)")
    parser.add_argument("--no-init", action="store_true", help="skip the init-only row (when splitting rows over "
                        "processes, run it in one of them)")
    args = parser.parse_args()
    setting, default_steps = SETTINGS[args.setting]
    steps = args.steps or default_steps
    common = [*setting, f"seeds={args.seeds}", f"prompt={args.prompt}", "camera.video_frames=0",
              "wandb.mode=disabled", "device=cpu"]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ddim_dir = Path(tmp) / "ddim"
        ddim = sample(compose_config(common), ddim_dir)
        own = [e["nearest_reference"] for e in ddim["seeds"]]
        lines.append(table_row("DDIM 10 steps from ε* (dsd-sample)", ddim, ddim_dir, own,
                               ddim["prior_rows"] / len(own)))
        runs = [] if args.no_init else [("init only (guidance off)", GUIDANCE_OFF[args.setting])]
        runs += [(m, [f"guidance={m}"]) for m in args.methods]
        runs += [(label, overrides) for label, *overrides in args.variant]
        for i, (name, overrides) in enumerate(runs):
            run_dir = Path(tmp) / f"{i}_{name.split()[0]}"
            summary = run(compose_config([*common, f"trainer.steps={steps}", *overrides]), run_dir)
            lines.append(table_row(name, summary, run_dir, own, summary["prior_rows_per_step"]))
        threshold = ddim["reach_threshold_db"]
    print(f"\nsetting {args.setting}: prompt {args.prompt!r}, {args.seeds} seeds, {steps} steps, analytic prior "
          f"(K=8, 32 px), each method's own defaults; reach threshold {threshold:.1f} dB. The DDIM row's prior "
          "rows are per seed for the whole sample.\n")
    print("| method | distinct refs reached | seeds reached | median PSNR (dB) | own DDIM | mean pairwise RMSE "
          "| prior rows/step | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
