"""`python -m benchmarks.run`: time `mergelens compare ft_a ft_b --base base` on generated 0.5B Llama models.

Prints wall time, CPU time and peak RSS of the child, the I/O floor (reading and upcasting every tensor of
the three models once, measured in the same run), their ratio, parameters per second and spectral coverage;
then the same for a model with twice the layers, and the time ratio (linear scaling gives about 2); then,
where `mergelens serve` exists, the latency of `tools/list` while the server runs the same compare. The
checkpoints are generated once into .bench/ and reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.checkpoints import BENCH_SHAPE, ensure_family
from mergelens_mcp.analysis.loading import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"


@dataclass(frozen=True)
class Run:
    """One child process: its wall time, peak resident memory and exit status."""

    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    log: Path


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run `cmd`; its wall and CPU time (wait4: its own, not other children's) and its own peak RSS.

    The peak is the child's VmHWM, read from /proc every POLL_S until it exits. Its ru_maxrss is not used: a
    child started by vfork/posix_spawn (as subprocess does) inherits the parent's high-water mark at exec, so
    a bench process that had just generated the checkpoints reported its own 1.95 GB as the child's.
    """
    with log.open("wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        peak = 0
        while True:
            peak = max(peak, _high_water_mark(child.pid))
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_utime + usage.ru_stime, peak, child.returncode, log)


POLL_S = 0.01


def _high_water_mark(pid: int) -> int:
    """A running process's peak resident memory in bytes (VmHWM), 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def family_params(folders: dict[str, Path]) -> int:
    return sum(load_checkpoint(str(f), name).n_params for name, f in folders.items())


def io_floor(folders: dict[str, Path]) -> tuple[float, float]:
    """(wall, CPU) seconds to read and upcast to float32 every tensor of every model once, one at a time."""
    started, cpu = time.perf_counter(), time.process_time()
    for name, folder in folders.items():
        with load_checkpoint(str(folder), name) as ckpt:
            for tensor in ckpt.tensors:
                ckpt.read(tensor)
    return time.perf_counter() - started, time.process_time() - cpu


def disk_read_rate(folder: Path) -> float:
    """Bytes/second reading one shard after evicting it from the page cache (posix_fadvise DONTNEED)."""
    shard = sorted(folder.glob("*.safetensors"))[0]
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started, total = time.perf_counter(), 0
        while chunk := os.read(fd, 16 << 20):
            total += len(chunk)
        return total / (time.perf_counter() - started)
    finally:
        os.close(fd)


def ours(folders: dict[str, Path], out: Path, device: str, workers: bool = False) -> tuple[Run, dict]:
    """`mergelens compare ft_a ft_b --base base` as a child process; its JSON result.

    Without `workers` the analysis runs in the child itself (MERGELENS_WORKER_PROCESSES=0), so its CPU time
    and peak RSS are the analysis's: a worker process is the child's grandchild, which neither wait4's
    rusage nor the child's VmHWM counts. `workers` runs it as users get it, in a worker process: compare
    wall times only."""
    result = out.with_suffix(".json")
    cmd = [
        sys.executable, "-m", "mergelens_mcp", "compare", str(folders["ft_a"]), str(folders["ft_b"]),
        "--base", str(folders["base"]), "--json", str(result), "--layers", "0", "--device", device,
    ]
    env = {**os.environ, "MERGELENS_WORKER_PROCESSES": "1" if workers else "0"}
    run = run_child(cmd, out.with_suffix(".log"), env=env)
    if run.returncode != 0:
        sys.exit(f"mergelens compare failed ({run.returncode}); see {run.log}")
    return run, json.loads(result.read_text())


def print_run(
    title: str, run: Run, params: int, floor: tuple[float, float], result: dict | None = None
) -> None:
    print(f"\n{title}")
    print(f"  wall time          {run.wall_s:8.1f} s   (CPU {run.cpu_s:.1f} s)")
    print(f"  peak RSS (child)   {run.peak_rss_bytes / 1e9:8.2f} GB")
    print(f"  I/O floor          {floor[0]:8.1f} s   (CPU {floor[1]:.1f} s; read + upcast every tensor once)")
    print(f"  wall / I/O floor   {run.wall_s / floor[0]:8.2f} x   (CPU / CPU {run.cpu_s / floor[1]:.2f} x)")
    print(f"  parameters/second  {params / run.wall_s / 1e6:8.1f} M   ({params / 1e9:.2f} B read, 3 models)")
    if result is not None:
        cov = result["coverage"]
        share = cov["spectral_params"] / max(cov["matrix_params"], 1)
        print(f"  spectral coverage  {share:8.1%}   of 2-D params ({cov['exact_svd_tensors']} exact SVDs, "
              f"{cov['randomized_svd_tensors']} randomized, rank {cov['svd_rank']})")
        print(f"  analysis (in-proc) {result['elapsed_s']:8.1f} s   MCI {result['mci']['score']}")


def serve_latency(folders: dict[str, Path]) -> dict[str, object] | None:
    """Max and median `tools/list` latency while `mergelens serve` (stdio) runs compare_models."""
    if importlib.util.find_spec("mergelens_mcp.server") is None:
        print("\nserve latency: skipped, this checkout has no mergelens_mcp/server.py")
        return None
    import anyio

    figures = anyio.run(_serve_latency, folders)
    lat = sorted(figures["latencies_s"])
    print(f"\nunder `mergelens serve`: compare_models took {figures['compare_s']:.1f} s; during it "
          f"{len(lat)} tools/list requests answered in max {lat[-1] * 1000:.0f} ms, "
          f"median {lat[len(lat) // 2] * 1000:.0f} ms")
    return figures


async def _serve_latency(folders: dict[str, Path]) -> dict[str, object]:
    import anyio
    from mcp import Client, StdioServerParameters

    env = {k: os.environ[k] for k in ("PATH", "HOME", "HF_HOME", "HF_HUB_OFFLINE") if k in os.environ}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mergelens_mcp", "serve", "--allow-dir", str(BENCH)],
        cwd=ROOT, env=env,
    )
    args = {"models": [str(folders["ft_a"]), str(folders["ft_b"])], "base_model": str(folders["base"])}
    latencies: list[float] = []
    out: dict[str, object] = {}
    async with Client(params) as client:
        await client.list_tools()
        done = anyio.Event()

        async def compare() -> None:
            started = time.perf_counter()
            result = await client.call_tool("compare_models", args)
            out["compare_s"] = time.perf_counter() - started
            out["error"] = result.content[0].text if result.is_error else None
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(compare)
            while not done.is_set():
                with anyio.move_on_after(0.5):  # one request every half second while the compare runs
                    await done.wait()
                if done.is_set():
                    break
                started = time.perf_counter()
                await client.list_tools()
                latencies.append(time.perf_counter() - started)
    if out.get("error"):
        sys.exit(f"compare_models under serve failed: {out['error']}")
    return {**out, "latencies_s": latencies}


def measure(
    folders: dict[str, Path], out: Path, device: str, repeat: int
) -> tuple[tuple[float, float], Run, dict]:
    """The I/O floor and our run, each measured `repeat` times, alternating so both see the same machine;
    the medians by wall time (the shared machine's noise moved single floors between 0.6 and 3.1 s)."""
    floors, runs = [], []
    for _ in range(repeat):
        floors.append(io_floor(folders))
        runs.append(ours(folders, out, device))
    walls = ", ".join(f"{r.wall_s:.2f}" for r, _ in runs)
    print(f"  floors {', '.join(f'{f[0]:.2f}' for f in floors)} s; runs {walls} s")
    floor = sorted(floors)[len(floors) // 2]
    run, result = sorted(runs, key=lambda r: r[0].wall_s)[len(runs) // 2]
    return floor, run, result


def worker_cost(folders: dict[str, Path], out: Path, device: str, repeat: int) -> dict[str, float]:
    """The same compare in the child and in a worker process (as the CLI and the server run it), alternating;
    the medians of the wall times and their ratio: what the sandbox costs."""
    inline, pooled = [], []
    for _ in range(repeat):
        inline.append(ours(folders, out, device)[0].wall_s)
        pooled.append(ours(folders, out, device, workers=True)[0].wall_s)
    a, b = sorted(inline)[len(inline) // 2], sorted(pooled)[len(pooled) // 2]
    print(f"\nworker process: {b:.1f} s vs {a:.1f} s in the child (medians of {repeat}, alternating): {b / a:.2f}x")
    return {"in_child_s": a, "in_worker_s": b, "ratio": b / a}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-scaling", action="store_true", help="skip the 16-layer model")
    parser.add_argument("--no-serve", action="store_true", help="skip the tools/list latency under `serve`")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json", help="write the figures here")
    parser.add_argument("--repeat", type=int, default=3, help="floor and run measured this many times, alternating")
    args = parser.parse_args(argv)

    small = ensure_family(BENCH / "llama-8L", BENCH_SHAPE)
    big = None if args.no_scaling else ensure_family(BENCH / "llama-16L", replace(BENCH_SHAPE, layers=16))
    rate = disk_read_rate(small["base"])
    print(f"disk read rate (page cache evicted, one shard): {rate / 1e9:.2f} GB/s")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    figures: dict[str, object] = {
        "disk_read_bytes_per_s": rate, "cpus": os.cpu_count(), "load": os.getloadavg(),
    }

    for label, folders in (("8 layers", small), ("16 layers", big)):
        if folders is None:
            continue
        params = family_params(folders)
        io_floor(folders)  # warm the page cache, so the floor and the run read the same way
        floor, run, result = measure(folders, BENCH / f"ours-{label.split()[0]}L", args.device, args.repeat)
        print_run(f"mergelens-mcp compare, {label} ({params / 3 / 1e9:.2f} B params per model)",
                  run, params, floor, result)
        figures[label] = {
            "wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_bytes": run.peak_rss_bytes,
            "io_floor_s": floor[0],
            "io_floor_cpu_s": floor[1], "params": params, "coverage": result["coverage"],
            "elapsed_s": result["elapsed_s"],
        }
    figures["worker_pool"] = worker_cost(small, BENCH / "ours-workers", args.device, args.repeat)
    if big is not None:
        a, b = figures["8 layers"], figures["16 layers"]
        print(f"\nscaling: 16 layers / 8 layers = {b['wall_s'] / a['wall_s']:.2f}x time "
              f"({b['cpu_s'] / a['cpu_s']:.2f}x CPU) for {b['params'] / a['params']:.2f}x parameters")
    if not args.no_serve:
        figures["serve"] = serve_latency(small)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
