"""Diversity, fidelity and ODE agreement of guidance methods on the exact analytic prior, with
their control rows on the same seeds.

For each row: distinct references *reached* (a seed counts only when its PSNR to its nearest
reference is above the reach threshold, dsd.metrics.reference), seeds reached, median and mean
PSNR to the nearest reference, and ODE agreement = fraction of seeds whose nearest reference is
the one the plain DDIM sample of that seed reaches (dsd-sample). A claim about a method holds
only where its row beats its controls: DDIM (what following the ODE exactly gives; at 100
steps: what solving the same ODE more finely changes), init only
(guidance off: the start point alone), `ode=random` (ASD-like: the same method with fresh noise
instead of the seed's ODE) and SDS.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analytic_diversity.py --seeds 16 --steps 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from dsd.compose import compose_config  # noqa: E402
from dsd.run import run  # noqa: E402
from dsd.sample import sample  # noqa: E402

GUIDANCE_OFF = "trainer.lr=1e-9"  # the start point alone: the same run with a vanishing step size
ROWS = {
    # controls
    "init only (guidance off)": ["guidance=dsd", GUIDANCE_OFF],
    "sds": ["guidance=sds"],
    "dsd ode=random (ASD-like)": ["guidance=dsd", "guidance.ode=random"],
    # DSD as the official code (exact ε_ode at t+δ) and its options
    "dsd (official: ode_target=exact)": ["guidance=dsd"],
    "dsd ode_target=grid (cached, cheaper)": ["guidance=dsd", "guidance.ode_target=grid"],
    "dsd ode=linear (ε* itself)": ["guidance=dsd", "guidance.ode=linear"],
    "dsd t_schedule=linear": ["guidance=dsd", "guidance.t_schedule=linear"],
    # DSD started at the seed's x0(g_0), with its own controls
    "dsd_ode_init: init only (guidance off)": ["guidance=dsd_ode_init", GUIDANCE_OFF],
    "dsd_ode_init ode=random (ASD-like)": ["guidance=dsd_ode_init", "guidance.ode=random"],
    "dsd_ode_init": ["guidance=dsd_ode_init"],
    # the paper's 2D algorithm and the sampling form
    "dsd_2d (Alg. 2)": ["guidance=dsd_2d"],
    "dsd_sampling (DSD*, Eq. 7-8)": ["guidance=dsd_sampling"],
}


def row(name: str, summary: dict, ddim_refs: list[int]) -> tuple:
    refs = [e["nearest_reference"] for e in summary["seeds"]]
    agree = sum(r == d for r, d in zip(refs, ddim_refs)) / len(refs)
    return (name, summary["distinct_references"], summary["reached_seeds"], summary["median_psnr_to_reference"],
            summary["mean_psnr_to_reference"], agree, summary.get("prior_rows_per_step", 0.0), summary["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prompt", default="a hamburger")
    parser.add_argument("--data", default="colourways", help="prior.data (colourways | separated)")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = parser.parse_args()
    common = [f"seeds={args.seeds}", f"prompt={args.prompt}", f"prior.data={args.data}", "wandb.mode=disabled",
              "device=cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        ddim = sample(compose_config(common), Path(tmp) / "ddim")
        ddim_refs = [e["nearest_reference"] for e in ddim["seeds"]]
        rows = [row("ddim sample (10 steps)", ddim, ddim_refs)]
        # the same ODE solved finer: how much agreement a different discretisation alone costs
        fine = sample(compose_config([*common, "sampler.steps=100"]), Path(tmp) / "ddim100")
        rows.append(row("ddim sample (100 steps)", fine, ddim_refs))
        for name, overrides in ROWS.items():
            if args.only and name not in args.only:
                continue
            summary = run(compose_config([*common, *overrides, f"trainer.steps={args.steps}"]),
                          Path(tmp) / str(len(rows)))
            rows.append(row(name, summary, ddim_refs))
    print(f"\nprompt {args.prompt!r}, {args.seeds} seeds, {args.steps} steps, analytic prior (prior.data="
          f"{args.data}, K=8, 32 px); reach threshold {ddim['reach_threshold_db']:.1f} dB\n")
    print("| method | distinct refs reached | seeds reached | median PSNR (dB) | mean PSNR (dB) | ODE agreement "
          "| prior rows/step | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, distinct, reached, median, mean, agree, rows_per_step, wall in rows:
        print(f"| {name} | {distinct}/{args.seeds} | {reached}/{args.seeds} | {median:.1f} | {mean:.1f} | "
              f"{agree:.2f} | {rows_per_step:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
