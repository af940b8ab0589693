"""`python -m benchmarks.bench7b` (`make bench-7b`): a Llama-2-7B-shaped compare against the cold read of its files.

Generates base + two fine-tunes with Llama-2-7B's shapes (hidden 4096, 32 layers, intermediate 11008, vocab
32000; bf16, two shards each, 40 GB in all) into .bench/llama-7b (after checking the free disk), then,
`--repeat` times, alternating: the cold read of the three models (every shard read once, sequentially, as
`cat` to /dev/null would) and `mergelens compare ft_a ft_b --base base` as a child process, each after the page
cache was dropped (`/proc/sys/vm/drop_caches` as root, and `posix_fadvise(DONTNEED)` on every file always, so
that a non-root run still starts cold; it says which was used). With `--before REV` the same compare of the
code at git revision REV runs beside each one (exported to .bench/rev-REV), so the two are compared on the same
machine minutes apart. `--threads 1,2` adds one cold run per other MERGELENS_THREADS value.

Per run: wall, CPU seconds, peak RSS, and the counters of `benchmarks.timed_compare` (CPU and wall seconds of
the elementwise passes and SVDs, and inside the SVDs of the bf16 rounding and the float32 product). The set is
deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.checkpoints import MODELS, ensure_family
from benchmarks.run import Run, run_child
from mergelens_mcp.demo import Shape

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
SHAPE_7B = Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
DISK_MARGIN = 4 << 30  # left free beyond the set


def check_disk(root: Path, shape: Shape) -> None:
    """Exit with a message when the set is not there and would not fit on the disk with a margin."""
    needed = len(MODELS) * 2 * sum(math.prod(d) for d in shape.tensor_shapes().values())  # bf16
    present = sum(p.stat().st_size for p in root.rglob("*.safetensors")) if root.exists() else 0
    free = shutil.disk_usage(root.parent).free
    if free + present < needed + DISK_MARGIN:
        sys.exit(f"bench-7b needs {needed / 1e9:.0f} GB for {root} and {free / 1e9:.0f} GB are free: "
                 "free some space or set --root to a larger disk")


def shards(folders: dict[str, Path]) -> list[Path]:
    return sorted(p for f in folders.values() for p in f.glob("*.safetensors"))


def evict(files: list[Path]) -> str:
    """Drop the files from the page cache; how (the global drop needs root, the per-file advice does not)."""
    how = "posix_fadvise(DONTNEED) per file"
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        how = "drop_caches + " + how
    except OSError:
        pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def cold_read(files: list[Path]) -> float:
    """Seconds to read every file once, sequentially, 16 MB at a time, after evicting them."""
    evict(files)
    started = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, 16 << 20):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - started


def export_revision(rev: str) -> Path:
    """The package at git revision `rev`, exported once to .bench/rev-<rev>/ (a path for PYTHONPATH)."""
    target = BENCH / f"rev-{rev}"
    if not (target / "mergelens_mcp").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "mergelens_mcp"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def compare(folders: dict[str, Path], code: Path, label: str, threads: int | None, device: str) -> dict:
    """One cold `compare` of the code at `code` as a child: wall, CPU, peak RSS, counters and its result."""
    files = shards(folders)
    evict(files)
    out = BENCH / f"7b-{label}"
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT}",
           "MERGELENS_BENCH_COUNTERS": str(out.with_suffix(".counters.json")),
           "MERGELENS_WORKER_PROCESSES": "0"}  # in the child: its CPU, peak RSS and counters are the analysis's
    if threads is not None:
        env["MERGELENS_THREADS"] = str(threads)
    # -P: the package comes from PYTHONPATH (the code under test), not from the working directory
    cmd = [sys.executable, "-P", "-m", "benchmarks.timed_compare", "compare", str(folders["ft_a"]),
           str(folders["ft_b"]), "--base", str(folders["base"]), "--json", str(out.with_suffix(".json")),
           "--layers", "0", "--device", device]
    load = os.getloadavg()[0]
    run: Run = run_child(cmd, out.with_suffix(".log"), env=env)
    if run.returncode != 0:
        sys.exit(f"compare ({label}) failed ({run.returncode}); see {run.log}")
    counters = json.loads(out.with_suffix(".counters.json").read_text())["counters"]
    result = json.loads(out.with_suffix(".json").read_text())
    figures = {"label": label, "wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_bytes": run.peak_rss_bytes,
               "load_at_start": load, "counters": counters, "elapsed_s": result["elapsed_s"]}
    print(f"  {label:<14} wall {run.wall_s:7.1f} s  CPU {run.cpu_s:7.1f} s  peak RSS "
          f"{run.peak_rss_bytes / 1e9:5.2f} GB  (load {load:.1f})  " + _split(counters), flush=True)
    return {**figures, "result": result}


def _split(counters: dict[str, list[float]]) -> str:
    return "  ".join(f"{name} {cpu:.1f}/{wall:.1f}" for name, (_, cpu, wall) in counters.items())


def numbers(value: object, path: str = "") -> dict[str, float]:
    """Every number in a JSON result by its path, timings and identifiers left out."""
    found: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in ("elapsed_s", "created_at", "version"):
                found.update(numbers(item, f"{path}.{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.update(numbers(item, f"{path}[{i}]"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found[path] = float(value)
    return found


def agreement(a: dict, b: dict) -> tuple[float, str, float, float]:
    """(largest absolute difference between two results' numbers, where, and the two MCIs)."""
    x, y = numbers(a), numbers(b)
    worst, where = 0.0, ""
    for key in x.keys() & y.keys():
        diff = abs(x[key] - y[key])
        if diff > worst:
            worst, where = diff, key
    return worst, where, a["mci"]["score"], b["mci"]["score"]


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench7b", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=BENCH / "llama-7b", help="where the set is generated")
    parser.add_argument("--keep", action="store_true", help="keep the 40 GB set afterwards")
    parser.add_argument("--repeat", type=int, default=3, help="cold reads and runs, alternating (medians)")
    parser.add_argument("--before", metavar="REV", help="also run the code of this git revision beside")
    parser.add_argument("--threads", default="", help="e.g. 1,2: one more cold run per other thread count")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--layers", type=int, default=SHAPE_7B.layers, help="fewer layers: a quick trial")
    parser.add_argument("--json", type=Path, default=BENCH / "bench7b.json", help="write the figures here")
    args = parser.parse_args(argv)

    BENCH.mkdir(exist_ok=True)
    shape = replace(SHAPE_7B, layers=args.layers)
    check_disk(args.root, shape)
    folders = ensure_family(args.root, shape)
    files = shards(folders)
    size = sum(p.stat().st_size for p in files)
    print(f"{len(MODELS)} models, {len(files)} shards, {size / 1e9:.1f} GB; {os.cpu_count()} CPUs; "
          f"page cache dropped by {evict(files)}", flush=True)
    codes = {"after": ROOT}
    if args.before:
        codes = {f"before {args.before}": export_revision(args.before), **codes}
    reads: list[float] = []
    runs: dict[str, list[dict]] = {label: [] for label in codes}
    try:
        for i in range(args.repeat):
            reads.append(cold_read(files))
            print(f"cold read {i + 1}: {reads[-1]:.1f} s ({size / reads[-1] / 1e9:.2f} GB/s)", flush=True)
            for label, code in codes.items():
                runs[label].append(compare(folders, code, f"{label.split()[0]}-{i + 1}", None, args.device))
        scaling = []
        for threads in (int(t) for t in args.threads.split(",") if t):
            scaling.append({"threads": threads,
                            **compare(folders, ROOT, f"threads-{threads}", threads, args.device)})
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
            print(f"removed {args.root} (--keep keeps it)")

    read = statistics.median(reads)
    figures: dict[str, object] = {"bytes": size, "cold_reads_s": reads, "cold_read_s": read,
                                  "cpus": os.cpu_count(), "runs": {}, "threads": []}
    print(f"\ncold read (median of {len(reads)}): {read:.1f} s, {size / read / 1e9:.2f} GB/s")
    for label, done in runs.items():
        mid = median_run(done)
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in done)
        print(f"{label:<16} median wall {mid['wall_s']:.1f} s = {mid['wall_s'] / read:.2f} x the cold read; "
              f"CPU {mid['cpu_s']:.1f} s; peak RSS {max(r['peak_rss_bytes'] for r in done) / 1e9:.2f} GB "
              f"(walls {walls})")
        figures["runs"][label] = [{k: v for k, v in r.items() if k != "result"} for r in done]
    if len(runs) == 2:
        first, second = (median_run(done) for done in runs.values())
        worst, where, mci_a, mci_b = agreement(first["result"], second["result"])
        print(f"before / after: wall {first['wall_s'] / second['wall_s']:.2f}x, CPU "
              f"{first['cpu_s'] / second['cpu_s']:.2f}x; MCI {mci_a} and {mci_b}; largest difference of any "
              f"number in the results {worst:.2e} ({where})")
        figures["agreement"] = {"max_abs_diff": worst, "at": where, "mci": [mci_a, mci_b]}
    for entry in scaling:
        print(f"MERGELENS_THREADS={entry['threads']}: wall {entry['wall_s']:.1f} s, CPU {entry['cpu_s']:.1f} s")
        figures["threads"].append({k: v for k, v in entry.items() if k != "result"})
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
