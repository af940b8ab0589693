"""`python -m benchmarks.zoo`: the zoo on 12 generated Llama-shaped fine-tunes of one base (plus the base).

Prints: the I/O floor (reading and upcasting every tensor of the 12 models once, page cache warm, measured in the
same run), `mergelens zoo` on an empty sketch cache (wall, CPU, peak RSS of the child) and its ratio to the floor;
adding a 13th model to the cached zoo against reading that model once, two ways: `mergelens zoo` in a fresh
process (the CLI: its imports are paid) and `compare_zoo` in a process that already holds the package and has
answered the cached zoo once (a warm MCP server running `rank_merge_partners`); the sketch size against the
model's; and projections for 50 and 200 7B models on 1 and 10 nodes from the measured rates. Models are generated
once into .bench/zoo-<hidden>-<layers>-<intermediate>/ and reused (`--hidden`, `--layers`, `--intermediate` set
their size; the default is 0.127B, inside the issue's 0.1B-0.5B).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.run import BENCH, io_floor, run_child
from mergelens_mcp.analysis import sketch as sk
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.demo import Shape, combine, random_model, save, task_vector

N_MODELS = 12
SEVEN_B = 7e9


def ensure_zoo(root: Path, shape: Shape) -> tuple[Path, list[Path], Path]:
    """base, 12 fine-tunes (two of four task vectors each) and one extra fine-tune, generated once."""
    stamp = root / ".complete"
    key = json.dumps(shape.tensor_shapes())
    models = [root / "zoo" / f"ft_{i:02d}" for i in range(N_MODELS)]
    extra = root / "extra" / "ft_new"
    if stamp.is_file() and stamp.read_text() == key:
        return root / "base", models, extra
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    base = random_model(shape, 0)
    save(base, root / "base", shape)
    tasks = [task_vector(base, 1 + k) for k in range(4)]
    for i, folder in enumerate(models):
        save(combine(base, (1.0, tasks[i % 4]), (0.3 + 0.1 * (i % 3), tasks[(i + 1 + i // 4) % 4])), folder, shape)
    save(combine(base, (1.0, task_vector(base, 50))), extra, shape)
    stamp.write_text(key)
    print(f"generated {root} in {time.perf_counter() - started:.1f} s", flush=True)
    return root / "base", models, extra


def seven_b_share() -> float:
    """A Llama-2-7B model's sketch (against a base) over its bf16 bytes, from the default sketch widths."""
    params = sk.SketchParams()
    layer = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)] + [(4096,)] * 2
    shapes = [(32000, 4096), (32000, 4096), (4096,)] + 32 * layer
    return sum(sk.sketch_nbytes(s, params, True) for s in shapes) / sum(2 * math.prod(s) for s in shapes)


def zoo_child(models: list[Path], base: Path, cache: Path, out: Path, workers: int):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "mergelens_mcp", "zoo", *map(str, models), "--base", str(base),
           "--cache-dir", str(cache), "--workers", str(workers), "--json", str(out)]
    run = run_child(cmd, out.with_suffix(".log"))
    if run.returncode != 0:
        raise SystemExit(f"mergelens zoo failed ({run.returncode}); see {run.log}")
    return run, json.loads(out.read_text())


def warm_child(argv: list[str]) -> int:
    """`python -m benchmarks.zoo --warm CACHE OUT BASE MODEL... EXTRA`: in one process, the cached zoo once (as a
    server's earlier call: imports and first use paid), then the zoo with EXTRA added, timed (wall and this
    process's CPU); the figures go to OUT as JSON."""
    from mergelens_mcp.zoo import compare_zoo

    cache, out, base, *models = argv
    compare_zoo(models[:-1], base, cache_dir=cache, workers=1)
    started, cpu = time.perf_counter(), time.process_time()
    grown = compare_zoo(models, base, cache_dir=cache, workers=1)
    figures = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
               "cached": sum(m.cached for m in grown.models)}
    Path(out).write_text(json.dumps(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--warm"]:
        return warm_child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=BENCH / "zoo.json")
    parser.add_argument("--keep-cache", action="store_true", help="leave the sketch cache in place (default: removed)")
    args = parser.parse_args(argv)
    shape = Shape(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4, intermediate=args.intermediate,
                  vocab=32000)
    root = BENCH / f"zoo-{args.hidden}-{args.layers}-{args.intermediate}"
    base, models, extra = ensure_zoo(root, shape)
    params = load_checkpoint(str(models[0]), "m").n_params
    nbytes = load_checkpoint(str(models[0]), "m").nbytes
    print(f"{N_MODELS} models of {params / 1e9:.3f} B params ({nbytes / 1e6:.0f} MB bf16) + base; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    folders = {m.name: m for m in models}
    io_floor(folders)  # warm the page cache
    floor, floor_cpu = io_floor(folders)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold, result = zoo_child(models, base, cache, root / "cold.json", args.workers)
    warm_cache = root / "cache-warm"
    shutil.rmtree(warm_cache, ignore_errors=True)
    shutil.copytree(cache, warm_cache)  # the same 12 cached sketches and pairs for the in-process add
    one_floor, one_floor_cpu = io_floor({extra.name: extra})
    added, grown = zoo_child([*models, extra], base, cache, root / "added.json", args.workers)
    warm_out = root / "warm.json"
    warm_run = run_child([sys.executable, "-m", "benchmarks.zoo", "--warm", str(warm_cache), str(warm_out),
                          str(base), *map(str, models), str(extra)], root / "warm.log")
    if warm_run.returncode != 0:
        raise SystemExit(f"the in-process add failed ({warm_run.returncode}); see {warm_run.log}")
    warm = json.loads(warm_out.read_text())
    shutil.rmtree(warm_cache, ignore_errors=True)
    sketch_bytes = result["models"][0]["sketch_bytes"]
    pairs = len(result["pairs"])
    figures = {
        "shape": shape.tensor_shapes()["model.layers.0.mlp.up_proj.weight"], "params_per_model": params,
        "model_bytes": nbytes, "io_floor_s": floor, "io_floor_cpu_s": floor_cpu,
        "zoo_cold_wall_s": cold.wall_s, "zoo_cold_cpu_s": cold.cpu_s, "zoo_peak_rss_bytes": cold.peak_rss_bytes,
        "ratio_to_floor": cold.wall_s / floor, "add_one_wall_s": added.wall_s, "read_one_s": one_floor,
        "add_one_ratio": added.wall_s / one_floor, "add_one_cpu_s": added.cpu_s, "read_one_cpu_s": one_floor_cpu,
        "sketch_bytes": sketch_bytes,
        "sketch_share": sketch_bytes / nbytes, "pairs": pairs, "workers": args.workers,
        "cached_after_add": sum(m["cached"] for m in grown["models"]),
        "add_one_in_process_wall_s": warm["wall_s"], "add_one_in_process_cpu_s": warm["cpu_s"],
        "cached_in_process": warm["cached"], "load": os.getloadavg()[0],
    }
    print(f"I/O floor (read + upcast every tensor of the 12 models once): {floor:.1f} s, {floor_cpu:.1f} s CPU")
    print(f"mergelens zoo, empty cache, {args.workers} workers: {cold.wall_s:.1f} s wall, {cold.cpu_s:.1f} s CPU, "
          f"peak RSS {cold.peak_rss_bytes / 2**30:.2f} GiB; {cold.wall_s / floor:.1f}x the floor")
    print(f"adding a 13th model to the cached zoo: {added.wall_s:.1f} s (reading it once: {one_floor:.2f} s; "
          f"{added.wall_s / one_floor:.1f}x; {figures['cached_after_add']} of 13 sketches from the cache); CPU "
          f"{added.cpu_s:.1f} s against {one_floor_cpu:.2f} s ({added.cpu_s / one_floor_cpu:.1f}x)")
    print(f"adding it in a warm process (compare_zoo, imports paid; {warm['cached']} of 13 cached): "
          f"{warm['wall_s']:.2f} s wall ({warm['wall_s'] / one_floor:.1f}x the read), {warm['cpu_s']:.2f} s CPU "
          f"({warm['cpu_s'] / one_floor_cpu:.1f}x); load {os.getloadavg()[0]:.1f}")
    print(f"sketch: {sketch_bytes / 1e6:.2f} MB per model, {100 * sketch_bytes / nbytes:.1f}% of its bytes")
    seven_b = seven_b_share()
    figures["sketch_share_7b"] = seven_b
    print(f"sketch of a Llama-2-7B-shaped model (computed from the sketch widths, not measured): "
          f"{100 * seven_b:.2f}% of its bf16 bytes")
    rate = N_MODELS * params / cold.cpu_s  # params sketched per CPU-second (the wall is the machine's contention)
    projections = {}
    for n in (50, 200):
        for nodes in (1, 10):
            cores = nodes * (os.cpu_count() or 1)
            secs = n * SEVEN_B / rate / cores
            projections[f"{n}x7B on {nodes} node(s) of {os.cpu_count()} cores"] = secs
            print(f"projection: {n} x 7B on {nodes} node(s) of {os.cpu_count()} cores: {secs / 3600:.1f} h "
                  f"(sketching at {rate / 1e6:.1f} M params per CPU-second, as measured here; the wall time on a "
                  "contended machine is longer)")
    figures["projections_s"] = projections
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
