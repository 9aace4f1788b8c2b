"""Cost of DSD with and without the ODE trajectory cache, measured side by side.

Both variants run the same DSD config (analytic prior) in alternation, `--repeats` times each,
for both ways of taking ε_ode (`ode_target=exact`, the default and the official code's; `grid`);
prints prior rows per optimization step (exact) and median wall seconds (noisy machines: read the
ratio). `ode_cache=false` re-simulates the seed's ODE every step, as the official code does.

    .venv/bin/python benchmarks/ode_cache.py --seeds 4 --steps 300 --repeats 3
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    common = [
        f"seeds={args.seeds}",
        f"trainer.steps={args.steps}",
        f"prior.image_size={args.image_size}",
        "wandb.mode=disabled",
        "device=cpu",
        "guidance=dsd",
    ]
    variants = [(target, cache) for target in ("exact", "grid") for cache in (True, False)]
    results: dict[tuple, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for target, cache in variants:
                out = Path(tmp) / f"{target}_{cache}_{repeat}"
                overrides = [*common, f"guidance.ode_target={target}", f"guidance.ode_cache={str(cache).lower()}"]
                results[(target, cache)].append(run(compose_config(overrides), out))
    rows = {v: statistics.mean(s["prior_rows_per_step"] for s in results[v]) for v in variants}
    wall = {v: statistics.median(s["wall_s"] for s in results[v]) for v in variants}
    print(
        f"\nDSD, analytic prior {args.image_size}px, {args.seeds} seeds x {args.steps} steps, {args.repeats} repeats\n"
    )
    print("| ode_target | ode_cache | prior rows / step | median wall s |")
    print("|---|---|---|---|")
    for target, cache in variants:
        print(f"| {target} | {str(cache).lower()} | {rows[(target, cache)]:.2f} | {wall[(target, cache)]:.2f} |")
    for target in ("exact", "grid"):
        on, off = (target, True), (target, False)
        print(f"\n{target}: rows ratio (cache off/on) {rows[off] / rows[on]:.2f}, wall ratio {wall[off] / wall[on]:.2f}")


if __name__ == "__main__":
    main()
