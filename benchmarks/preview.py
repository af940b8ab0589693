"""Preview of one merge on the bench's 0.5B Llama-shaped checkpoints against its floor.

The floor (`python -m benchmarks.preview floor A B BASE PROBES`): one read of the weights (every tensor of the
three models read and upcast once, ft_a's kept as a transformers model) and one forward pass of that model
over the probes. Preview: `mergelens preview ft_a ft_b --base base --config linear.yaml --probe PROBES` as a
user runs it (in the child: MERGELENS_WORKER_PROCESSES=0), which runs both sources and the merge, so it does
three forward passes and reads the sources twice. Both are child processes measured alternately (wall, CPU,
peak RSS); the floor child holds one float32 model, so its peak is "one model" plus what any process that
runs the probes holds (torch, transformers, the outputs).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

PROBES = 32
TOKENS = 64
WORDS = ("merge", "model", "layer", "weight", "token", "prompt", "answer", "tensor", "vector", "matrix",
         "the", "of", "and", "a", "to", "in", "is", "for", "on", "with", "that", "by", "from", "as")


def write_probes(path: Path, n: int = PROBES, seed: int = 0) -> Path:
    """`n` seeded lines of at least `TOKENS` bytes (these checkpoints have no tokenizer: one token a byte)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words: list[str] = []
        while len(" ".join(words)) < TOKENS + 16:
            words.append(rng.choice(WORDS))
        lines.append(" ".join(words))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, a: Path, b: Path) -> Path:
    path.write_text(f"merge_method: linear\nmodels:\n- model: {a}\n  parameters: {{weight: 0.5}}\n"
                    f"- model: {b}\n  parameters: {{weight: 0.5}}\nparameters: {{normalize: true}}\n"
                    "dtype: bfloat16\n")
    return path


def floor(a: str, b: str, base: str, probes: str) -> dict[str, float]:
    """One read of the three models (a's tensors kept, as a model) and one forward pass over the probes."""
    import torch

    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.probe import fill, read_probes, run_probes, skeleton_of, stored_tensors, tokenize

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    records = read_probes(probes)
    wall, cpu = time.perf_counter(), time.process_time()
    with load_checkpoint(a, "ft_a") as ckpt:
        skeleton = skeleton_of(ckpt)
        model = fill(skeleton.empty(), stored_tensors(ckpt), "ft_a")
    for path in (b, base):
        with load_checkpoint(path, Path(path).name) as ckpt:
            for _ in stored_tensors(ckpt):
                pass
    read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
    batch = tokenize(records, skeleton)
    wall, cpu = time.perf_counter(), time.process_time()
    run_probes(model, batch, skeleton.kind, "cpu")
    return {"read_s": read_wall, "read_cpu_s": read_cpu, "forward_s": time.perf_counter() - wall,
            "forward_cpu_s": time.process_time() - cpu, "tokens": int(batch.mask.sum())}


def measure(folders: dict[str, Path], work: Path, repeat: int, threads: int = 1) -> dict:
    """The floor and the preview as child processes, alternating, `repeat` times each; medians by wall time."""
    from benchmarks.run import run_child

    work.mkdir(parents=True, exist_ok=True)
    probes = write_probes(work / "probes.txt")
    config = write_config(work / "linear.yaml", folders["ft_a"], folders["ft_b"])
    env = {**os.environ, "MERGELENS_WORKER_PROCESSES": "0", "BENCH_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    floor_cmd = [sys.executable, "-m", "benchmarks.preview", "floor", str(folders["ft_a"]), str(folders["ft_b"]),
                 str(folders["base"]), str(probes), str(work / "floor.json")]
    preview_cmd = [sys.executable, "-m", "mergelens_mcp", "preview", str(folders["ft_a"]), str(folders["ft_b"]),
                   "--base", str(folders["base"]), "--config", str(config), "--probe", str(probes),
                   "--device", "cpu", "--json", str(work / "preview.json")]
    floors, previews = [], []
    for _ in range(repeat):
        run = run_child(floor_cmd, work / "floor.log", env=env)
        if run.returncode != 0:
            sys.exit(f"the preview floor failed ({run.returncode}); see {run.log}")
        floors.append((run, json.loads((work / "floor.json").read_text())))
        run = run_child(preview_cmd, work / "preview.log", env=env)
        if run.returncode != 0:
            sys.exit(f"mergelens preview failed ({run.returncode}); see {run.log}")
        previews.append((run, json.loads((work / "preview.json").read_text())))
    f_run, f_in = sorted(floors, key=lambda r: r[0].wall_s)[repeat // 2]
    p_run, p_out = sorted(previews, key=lambda r: r[0].wall_s)[repeat // 2]
    inner_floor = f_in["read_s"] + f_in["forward_s"]
    figures = {
        "probes": PROBES, "tokens_per_probe": TOKENS, "threads": threads, "repeat": repeat,
        "floor": {"wall_s": f_run.wall_s, "cpu_s": f_run.cpu_s, "peak_rss_bytes": f_run.peak_rss_bytes, **f_in},
        "preview": {"wall_s": p_run.wall_s, "cpu_s": p_run.cpu_s, "peak_rss_bytes": p_run.peak_rss_bytes,
                    "elapsed_s": p_out["elapsed_s"]},
        "walls": {"floor": [r.wall_s for r, _ in floors], "preview": [r.wall_s for r, _ in previews]},
        "ratio_wall": p_run.wall_s / f_run.wall_s, "ratio_cpu": p_run.cpu_s / f_run.cpu_s,
        "ratio_in_process": p_out["elapsed_s"] / inner_floor,
        "ratio_memory": p_run.peak_rss_bytes / f_run.peak_rss_bytes,
    }
    print(f"\npreview of one method (linear, --config) on 32 probes x 64 tokens, {threads} thread(s), medians of "
          f"{repeat} alternating runs")
    print(f"  floor (read 3 models once, 1 forward)  {f_run.wall_s:6.1f} s wall  {f_run.cpu_s:6.1f} s CPU  "
          f"{f_run.peak_rss_bytes / 1e9:5.2f} GB peak (in-process: read {f_in['read_s']:.1f} s, forward "
          f"{f_in['forward_s']:.1f} s)")
    print(f"  mergelens preview                      {p_run.wall_s:6.1f} s wall  {p_run.cpu_s:6.1f} s CPU  "
          f"{p_run.peak_rss_bytes / 1e9:5.2f} GB peak (in-process {p_out['elapsed_s']:.1f} s)")
    print(f"  preview / floor: wall {figures['ratio_wall']:.2f}x, CPU {figures['ratio_cpu']:.2f}x, in-process "
          f"{figures['ratio_in_process']:.2f}x, peak memory {figures['ratio_memory']:.2f}x (targets: 3x, 1.2x)")
    return figures


def main(argv: list[str]) -> int:
    if argv[:1] == ["floor"] and len(argv) == 6:
        figures = floor(*argv[1:5])
        Path(argv[5]).write_text(json.dumps(figures) + "\n")
        return 0
    from benchmarks.checkpoints import BENCH_SHAPE, ensure_family
    from benchmarks.run import BENCH

    repeat = int(argv[0]) if argv else 3
    figures = measure(ensure_family(BENCH / "llama-8L", BENCH_SHAPE), BENCH / "preview", repeat)
    (BENCH / "preview.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
