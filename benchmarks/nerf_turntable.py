"""Time of a NeRF turntable (the end-of-run video) with the occupancy lattice computed once for
all chunks vs once per chunk (the old behaviour), measured side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nerf_turntable.py --frames 48 --resolution 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsd.cameras import turntable
from dsd.representations.nerf import NerfConfig, NerfRepresentation


def render_turntable(rep: NerfRepresentation, frames: int, resolution: int, chunk: int, shared: bool) -> float:
    cameras = turntable(frames, 15.0, 2.0, 50.0, resolution, resolution)
    started = time.perf_counter()
    with torch.no_grad():
        for first in range(0, frames, chunk):
            if not shared:
                rep._occupancy = None  # as before: every chunk recomputed the lattice
            rep.render(cameras.rows(range(first, min(first + chunk, frames))))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="views per render call (dsd.run's turntable)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rep = NerfRepresentation(NerfConfig()).eval()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for shared in (False, True):
            rep._occupancy = None
            times[shared].append(render_turntable(rep, args.frames, args.resolution, args.chunk, shared))
    per_chunk, once = statistics.median(times[False]), statistics.median(times[True])
    print(f"\nNeRF turntable, {args.frames} frames at {args.resolution}px, {args.chunk} views per call, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| occupancy lattice | wall s |\n|---|---|")
    print(f"| once per chunk (before) | {per_chunk:.2f} |\n| once per turntable | {once:.2f} |")
    print(f"\nratio {per_chunk / once:.2f}")


if __name__ == "__main__":
    main()
