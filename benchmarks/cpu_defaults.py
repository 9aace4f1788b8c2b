"""CPU speed defaults, measured side by side in one process (variants alternate, medians reported):

1. threads: one training step of experiment=demo (3D Gaussians) and experiment=demo2d at 1 vs 2
   torch threads (torch.set_num_threads switched between alternating steps);
2. seed batching: time per seed-step with seed_batch 1 vs 4 for the image, Gaussians and NeRF
   representations (two trainers over the same seeds, one round of each in turn);
3. NeRF memory: peak RSS (ru_maxrss) of one NeRF seed-step at 64 and 128 px, one subprocess per
   variant, next to the same process stopped before the step;
4. the optimizer's torch._dynamo import: which Adam flags import it, and what the import costs
   (one fresh subprocess per variant).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_defaults.py            # all four
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_defaults.py --only memory --repeats 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_defaults.py --only memory --repeats 1 --sizes 64 \
        --nerf representation.num_levels=16 representation.log2_hashmap_size=19   # a wider field
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_defaults.py --only seed_batch --representations gaussians \
        --warmup 40 --rounds 21     # the demo once its ODE trajectories are cached

The machine's load average is printed with each table: on a shared machine only the ratios mean
something, and they depend on the load (more threads lose more when the cores are busy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO3D = ("experiment=demo",)
DEMO2D = ("experiment=demo2d",)
NERF = ("representation=nerf",)  # CPU-sized defaults (32 px renders), analytic prior, DSD


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def build(overrides: tuple[str, ...], seeds: list[int]):
    """A Trainer and its initialized seed states, built as dsd.run builds them."""
    from dsd import registry
    from dsd.compose import compose_config
    from dsd.run import build_prior
    from dsd.trainer import Trainer

    cfg = compose_config(["wandb.mode=disabled", "device=cpu", *overrides])
    device = torch.device("cpu")
    prior = build_prior(cfg, device)
    guidance = registry.build("guidance", cfg.guidance, prior=prior)
    make_rep = lambda: registry.build("representation", cfg.representation, prior=prior, device=device)  # noqa: E731
    trainer = Trainer(prior, guidance, cfg.prompt, cfg.trainer, Path(tempfile.mkdtemp()), make_rep, device,
                      camera_cfg=cfg.camera)
    states = [trainer.new_state(seed) for seed in seeds]
    trainer.initialize(states)
    return trainer, states


def timed_round(trainer, states, batch: int) -> float:
    """Seconds per seed-step of one step of every state, `batch` seeds per call."""
    started = time.perf_counter()
    for first in range(0, len(states), batch):
        group = states[first : first + batch]
        trainer.step(group, group[0].step)
    return (time.perf_counter() - started) / len(states)


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def threads_table(rounds: int, warmup: int) -> str:
    rows = []
    before = load()
    for name, overrides in (("demo (3D Gaussians, 4 seeds)", DEMO3D), ("demo2d (image, 4 seeds)", DEMO2D)):
        trainer, states = build(overrides, [0, 1, 2, 3])
        times: dict[int, list[float]] = {1: [], 2: []}
        for k in range(warmup + rounds):
            for threads in ((1, 2) if k % 2 == 0 else (2, 1)):
                torch.set_num_threads(threads)
                t = timed_round(trainer, states, 4) * 4  # the whole batched step
                if k >= warmup:
                    times[threads].append(t)
        ratio = statistics.median(b / a for a, b in zip(times[1], times[2]))
        rows.append([name, ms(statistics.median(times[1])), ms(statistics.median(times[2])), f"{ratio:.2f}"])
    torch.set_num_threads(1)
    return table(f"Training step (4 seeds in one batch) at 1 vs 2 torch threads, median of {rounds} alternating "
                 f"pairs after {warmup} warm-up pairs; {before} at start, {load()} at end",
                 ["experiment", "1 thread ms", "2 threads ms", "ratio 2/1 (median of pairs)"], rows)


SEED_BATCH_CASES = {"image": ("image (demo2d)", DEMO2D), "gaussians": ("gaussians (demo)", DEMO3D),
                    "nerf": ("nerf (CPU defaults, 32 px)", NERF)}


def seed_batch_table(rounds: int, warmup: int, which: list[str]) -> str:
    torch.set_num_threads(1)
    rows = []
    before = load()
    for name, overrides in (SEED_BATCH_CASES[key] for key in which):
        runs = {batch: build(overrides, [0, 1, 2, 3]) for batch in (1, 4)}
        times: dict[int, list[float]] = {1: [], 4: []}
        for k in range(warmup + rounds):
            for batch in ((1, 4) if k % 2 == 0 else (4, 1)):
                t = timed_round(*runs[batch], batch)
                if k >= warmup:
                    times[batch].append(t)
        ratio = statistics.median(a / b for a, b in zip(times[1], times[4]))
        rows.append([name, ms(statistics.median(times[1])), ms(statistics.median(times[4])), f"{ratio:.2f}"])
    return table(f"Time per seed-step, seed_batch 1 vs 4 (4 seeds, 1 torch thread), median of {rounds} alternating "
                 f"rounds after {warmup} warm-up rounds; {before} at start, {load()} at end",
                 ["representation", "seed_batch=1 ms", "seed_batch=4 ms", "speed-up 1/4 (median of pairs)"], rows)


MEMORY_CHILD = """
import json, resource, sys
import torch
sys.path.insert(0, {root!r})
from benchmarks.cpu_defaults import build
torch.set_num_threads(1)
size, seeds, do_step = {size}, {seeds}, {do_step}
overrides = ("representation=nerf", f"representation.resolutions=[{{size}}]", "representation.resolution_milestones=[]",
             *{extra!r})
trainer, states = build(overrides, list(range(seeds)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if do_step:
    trainer.step(states, 0)
print(json.dumps({{"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def child_json(code: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(repeats: int, sizes: list[int], extra: list[str]) -> str:
    from dsd.compose import compose_config
    from dsd.representations.nerf import step_memory_bytes

    nerf_cfg = compose_config(["representation=nerf", *extra]).representation
    rows = []
    before = load()
    for size in sizes:
        for seeds in (1, 2):
            peaks, bases = [], []
            for _ in range(repeats):
                step = child_json(MEMORY_CHILD.format(root=str(ROOT), size=size, seeds=seeds, do_step=True, extra=extra))
                base = child_json(MEMORY_CHILD.format(root=str(ROOT), size=size, seeds=seeds, do_step=False, extra=extra))
                peaks.append(step["peak_kb"] / 2**20)
                bases.append(base["peak_kb"] / 2**20)
            peak, base = statistics.median(peaks), statistics.median(bases)
            estimate = step_memory_bytes(nerf_cfg, size, 1, seeds) / 2**30
            rows.append([f"{size} px", str(seeds), f"{base:.2f}", f"{peak:.2f}", f"{peak - base:.2f}", f"{estimate:.2f}"])
    return table(f"Peak RSS (GiB, ru_maxrss) of one NeRF step (representation=nerf {' '.join(extra) or 'defaults'}, "
                 f"one view per seed, "
                 f"1 thread), one subprocess per variant, median of {repeats}; {before}",
                 ["render", "seeds", "before the step", "after one step", "the step's share",
                  "estimate (dsd.representations.nerf.step_memory_bytes)"], rows)


DYNAMO_CHILD = """
import json, sys, time
import torch
flags = {flags}
p = torch.nn.Parameter(torch.zeros(8))
started = time.perf_counter()
opt = {make}
after_init = "torch._dynamo" in sys.modules
p.grad = torch.ones(8)
opt.step()
print(json.dumps({{"init": after_init, "step": "torch._dynamo" in sys.modules, "s": time.perf_counter() - started}}))
"""

IMPORT_CHILD = """
import json, sys, time
import torch
started = time.perf_counter()
import torch._dynamo
print(json.dumps({"s": time.perf_counter() - started}))
"""

SETUP_CHILD = """
import json, sys
from dsd import registry
import dsd.run
registry.load_all()
print(json.dumps({"dynamo_before_optimizer": "torch._dynamo" in sys.modules}))
"""


def dynamo_table(repeats: int) -> str:
    variants = {
        "Adam() default": ("{}", "torch.optim.Adam([p], **flags)"),
        "Adam(foreach=False)": ("{'foreach': False}", "torch.optim.Adam([p], **flags)"),
        "Adam(foreach=True)": ("{'foreach': True}", "torch.optim.Adam([p], **flags)"),
        "Adam(fused=True)": ("{'fused': True}", "torch.optim.Adam([p], **flags)"),
        "Adam(capturable=True)": ("{'capturable': True}", "torch.optim.Adam([p], **flags)"),
        "Adam(differentiable=True)": ("{'differentiable': True}", "torch.optim.Adam([p], **flags)"),
        "SGD()": ("{}", "torch.optim.SGD([p], lr=0.1)"),
    }
    rows = []
    for name, (flags, make) in variants.items():
        try:
            results = [child_json(DYNAMO_CHILD.format(flags=flags, make=make)) for _ in range(repeats)]
        except subprocess.CalledProcessError as err:
            rows.append([name, "error", "error", err.stderr.strip().splitlines()[-1][:80]])
            continue
        rows.append([name, str(results[0]["init"]), str(results[0]["step"]),
                     f"{statistics.median(r['s'] for r in results):.2f}"])
    cost = statistics.median(child_json(IMPORT_CHILD)["s"] for _ in range(repeats))
    setup = child_json(SETUP_CHILD)["dynamo_before_optimizer"]
    return table(f"torch._dynamo and the optimizer (torch {torch.__version__}), fresh subprocess per variant, "
                 f"median of {repeats}; {load()}",
                 ["optimizer", "imported by the constructor", "imported by the first step()",
                  "constructor + first step s"], rows) + (
        f"\n\n`import torch._dynamo` alone after `import torch`: {cost:.2f} s (median of {repeats}); "
        f"already imported by `import dsd.run` + registry.load_all() before any optimizer: {setup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("threads", "seed_batch", "memory", "dynamo"), nargs="*")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128], help="NeRF render sizes (memory)")
    parser.add_argument("--nerf", nargs="*", default=[], help="extra NeRF overrides (memory), e.g. representation.num_levels=16")
    parser.add_argument("--representations", nargs="*", choices=tuple(SEED_BATCH_CASES), default=list(SEED_BATCH_CASES),
                        help="seed-batch table rows")
    args = parser.parse_args()
    parts = args.only or ["threads", "seed_batch", "memory", "dynamo"]
    if "dynamo" in parts:
        print(dynamo_table(args.repeats), flush=True)
    if "threads" in parts:
        print(threads_table(args.rounds, args.warmup), flush=True)
    if "seed_batch" in parts:
        print(seed_batch_table(args.rounds, args.warmup, args.representations), flush=True)
    if "memory" in parts:
        print(memory_table(args.repeats, args.sizes, args.nerf), flush=True)


if __name__ == "__main__":
    main()
