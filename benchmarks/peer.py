"""`python -m benchmarks.peer`: mergelens-mcp and mergelens 2.0.3 side by side on the same 0.5B checkpoints.

mergelens 2.0.3 goes into its own venv, .bench/peer-venv: torch first, pinned (TORCH_SPEC, default
torch==2.13.0, the CPU build where pip's find-links offer it), then `mergelens==2.0.3`, whose `torch>=2.0`
is then already met, so pip pulls no other torch. Both tools run `compare ft_a ft_b --base base` as child
processes, one after the other in the same run, on page-cache-warm files; wall time, CPU time and peak RSS
of each child are printed with their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.checkpoints import BENCH_SHAPE, ensure_family
from benchmarks.run import BENCH, Run, family_params, io_floor, ours, run_child

PEER = "mergelens==2.0.3"
VENV = BENCH / "peer-venv"


def ensure_peer_venv(torch_spec: str) -> Path:
    """The peer venv's python, created and filled on first use."""
    python = VENV / "bin" / "python"
    done = VENV / ".installed"
    if done.is_file() and done.read_text() == f"{torch_spec} {PEER}":
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, torch_spec], check=True)
    subprocess.run([*pip, PEER], check=True)
    check = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    print(f"peer venv: mergelens 2.0.3 with torch {check[0]} (CUDA: {check[1]})")
    done.write_text(f"{torch_spec} {PEER}")
    return python


def theirs(python: Path, folders: dict[str, Path], out: Path) -> Run:
    cmd = [
        str(python.parent / "mergelens"), "compare", str(folders["ft_a"]), str(folders["ft_b"]),
        "--base", str(folders["base"]), "--device", "cpu", "--json", str(out.with_suffix(".json")),
    ]
    env = {**os.environ, "COLUMNS": "200"}
    run = run_child(cmd, out.with_suffix(".log"), env)
    if run.returncode != 0:
        sys.exit(f"mergelens 2.0.3 compare failed ({run.returncode}); see {run.log}")
    return run


def peer_coverage(result_json: Path) -> str:
    """Share of 2-D parameters mergelens 2.0.3 computed spectral_overlap on, from its per-tensor JSON rows."""
    try:
        rows = json.loads(result_json.read_text())["tensor_metrics"]
        matrices = [r for r in rows if len(r["shape"]) == 2]
        total = sum(r["parameter_count"] for r in matrices)
        covered = sum(r["parameter_count"] for r in matrices if r.get("spectral_overlap") is not None)
    except (OSError, ValueError, KeyError, TypeError):
        return "n/a (its JSON has no per-tensor rows)"
    return f"{covered / total:.1%} of 2-D parameters" if total else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__)
    parser.add_argument("--torch", default=os.environ.get("TORCH_SPEC", "torch==2.13.0"), help="torch pin")
    args = parser.parse_args(argv)

    python = ensure_peer_venv(args.torch)
    folders = ensure_family(BENCH / "llama-8L", BENCH_SHAPE)
    params = family_params(folders)
    io_floor(folders)  # warm the page cache for both
    floor = io_floor(folders)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; I/O floor {floor[0]:.1f} s "
          f"(CPU {floor[1]:.1f} s) for {params / 1e9:.2f} B parameters (3 models)")
    mine, result = ours(folders, BENCH / "side-ours", "cpu")
    peer = theirs(python, folders, BENCH / "side-peer")

    cov = result["coverage"]
    rows = [
        ("wall time (s)", f"{mine.wall_s:.1f}", f"{peer.wall_s:.1f}", peer.wall_s / mine.wall_s),
        ("CPU time (s)", f"{mine.cpu_s:.1f}", f"{peer.cpu_s:.1f}", peer.cpu_s / mine.cpu_s),
        ("peak RSS (GB)", f"{mine.peak_rss_bytes / 1e9:.2f}", f"{peer.peak_rss_bytes / 1e9:.2f}",
         peer.peak_rss_bytes / mine.peak_rss_bytes),
        ("wall / I/O floor", f"{mine.wall_s / floor[0]:.2f}", f"{peer.wall_s / floor[0]:.2f}", None),
        ("params/s (M)", f"{params / mine.wall_s / 1e6:.1f}", f"{params / peer.wall_s / 1e6:.1f}", None),
    ]
    head = ("compare ft_a ft_b --base base", "mergelens-mcp", "mergelens 2.0.3", "2.0.3 / ours")
    print(f"\n{head[0]:32} {head[1]:>14} {head[2]:>16} {head[3]:>13}")
    for label, a, b, ratio in rows:
        print(f"{label:32} {a:>14} {b:>16} {'' if ratio is None else f'{ratio:.2f}x':>13}")
    share = cov["spectral_params"] / cov["matrix_params"]
    print(f"\nmergelens-mcp spectral coverage: {share:.1%} of 2-D parameters")
    print(f"mergelens 2.0.3 spectral coverage: {peer_coverage(BENCH / 'side-peer.json')} (its JSON)")
    (BENCH / "peer-results.json").write_text(json.dumps({
        "ours": mine.__dict__ | {"log": str(mine.log)}, "peer": peer.__dict__ | {"log": str(peer.log)},
        "io_floor_s": floor[0], "io_floor_cpu_s": floor[1], "params": params, "load": os.getloadavg(),
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
