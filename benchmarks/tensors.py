"""`python -m benchmarks.tensors`: does a compare's time grow linearly with the number of tensors?

Generates pairs of checkpoints holding N small float tensors each (N = 5,000, 20,000 and 80,000 by default:
16 bfloat16 values per tensor, seeded, in one safetensors file per model, under .bench/tensors-N), then times
`mergelens compare a b` as a child process on each (wall, CPU, peak RSS: `benchmarks.run.run_child`, the
analysis in the child so that its CPU and memory are counted) and
prints the time per tensor. Linear growth keeps the time per tensor flat; before issue 18 the planner rebuilt
a per-checkpoint table for every tensor name, and 20,000 tensors took over 250 s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.run import BENCH, run_child

COUNTS = (5_000, 20_000, 80_000)
VALUES = 16  # per tensor


def ensure_pair(count: int) -> tuple[Path, Path]:
    """Two checkpoints of `count` tensors (the second a small perturbation of the first), made once."""
    root = BENCH / f"tensors-{count}"
    a, b = root / "a", root / "b"
    if not (a / "model.safetensors").is_file() or not (b / "model.safetensors").is_file():
        generator = torch.Generator().manual_seed(count)
        first = torch.randn(count, VALUES, generator=generator)
        second = first + 0.1 * torch.randn(count, VALUES, generator=generator)
        for folder, values in ((a, first), (b, second)):
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {f"model.extra.{i}.weight": values[i].to(torch.bfloat16).clone() for i in range(count)}
            save_file(tensors, str(folder / "model.safetensors"))
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="tensor counts (comma-separated)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    print(f"{'tensors':>8} {'wall s':>8} {'CPU s':>8} {'peak RSS':>9} {'ms/tensor':>10}")
    rows = []
    for count in counts:
        a, b = ensure_pair(count)
        log = BENCH / f"tensors-{count}" / "compare.log"
        cmd = [sys.executable, "-m", "mergelens_mcp", "compare", str(a), str(b), "--device", "cpu",
               "--json", str(log.with_suffix(".json"))]
        run = run_child(cmd, log, env={**os.environ, "MERGELENS_WORKER_PROCESSES": "0"})  # CPU and RSS counted
        if run.returncode != 0:
            sys.exit(f"compare of {count} tensors failed ({run.returncode}); see {log}")
        rows.append((count, run))
        print(f"{count:>8,} {run.wall_s:>8.1f} {run.cpu_s:>8.1f} {run.peak_rss_bytes / 1e9:>7.2f} GB "
              f"{1000 * run.wall_s / count:>10.2f}")
    if len(rows) > 1:
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        print(f"{n1 / n0:.0f}x the tensors took {r1.wall_s / r0.wall_s:.1f}x the time "
              f"({r1.cpu_s / r0.cpu_s:.1f}x the CPU); linear growth gives {n1 / n0:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
