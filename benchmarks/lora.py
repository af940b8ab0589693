"""`python -m benchmarks.lora`: two rank-64 LoRA adapters of a 7B-shaped Llama, compared from their factors.

Generated once into .bench/lora/: a header-only base (a safetensors file whose header lists every tensor of a
7B Llama in bf16 -- 32 layers, hidden 4096, intermediate 11008, vocab 32000 -- and whose 13.5 GB of data are
a hole in a sparse file: never written, never read) and two PEFT adapters (adapter_config.json +
adapter_model.safetensors, bf16) of rank 64 over every linear module of every layer (224 modules each).

A child process opens both adapters over that base (headers and factors only) and measures every task-vector
metric of every adapted tensor from the factors (analysis/adapters.py's LowRankOperand): cosines, distances,
magnitudes, the TSV interference and energy from the factors' QR, sign conflicts on the seeded row sample.
Printed: wall time, peak RSS (VmHWM), and that no base byte was read. For comparison the same metrics on the
dense deltas (scale * B @ A formed in float32) of one layer are timed and projected to 32 layers.

Not covered: the weight metrics (cosine, distance, spectra of base + delta) and task_drift need the base's
values; a comparison through `mergelens compare` reads the base for them.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelens_mcp.demo import Shape

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".bench" / "lora"
SHAPE_7B = Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
RANK, ALPHA = 64, 128.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE = ".complete"


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bf16 safetensors file with `shapes` whose data region is a hole (sparse); its data size."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def make_adapter(folder: Path, base: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out, inp = shape
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, inp, generator=generator) / inp**0.5).bfloat16()
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, RANK, generator=generator) * 1e-3).bfloat16()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS),
              "base_model_name_or_path": str(base), "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def ensure(root: Path) -> dict[str, Path]:
    folders = {"base": root / "base", "a": root / "adapter_a", "b": root / "adapter_b"}
    if (root / DONE).is_file():
        return folders
    started = time.perf_counter()
    shapes = SHAPE_7B.tensor_shapes()
    folders["base"].mkdir(parents=True, exist_ok=True)
    size = write_header_only(folders["base"] / "model.safetensors", shapes)
    (folders["base"] / "config.json").write_text(json.dumps(SHAPE_7B.config()))
    make_adapter(folders["a"], folders["base"], shapes, seed=1)
    make_adapter(folders["b"], folders["base"], shapes, seed=2)
    (root / DONE).write_text("ok")
    print(f"generated in {time.perf_counter() - started:.1f} s: header-only base ({size / 1e9:.1f} GB of hole), "
          f"two rank-{RANK} adapters", flush=True)
    return folders


def child(root: Path) -> None:
    """Open both adapters over the header-only base and measure every task-vector metric from the factors."""
    from mergelens_mcp.analysis.adapters import LowRankOperand
    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.analysis.metrics import Operand, task_metrics

    torch.set_num_threads(1)  # one core: the product runs one torch thread per worker too
    folders = {"base": root / "base", "a": root / "adapter_a", "b": root / "adapter_b"}
    metrics = [m for m in task_metrics() if m.name != "task_drift"]
    cpu = torch.device("cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    with load_checkpoint(str(folders["base"]), "base") as base:
        a = load_checkpoint(str(folders["a"]), "model_a", base=base)
        b = load_checkpoint(str(folders["b"]), "model_b", base=base)
        values: dict[str, float] = {}
        for name in a.adapted:
            la, lb = a.factors(name, cpu), b.factors(name, cpu)
            ta = LowRankOperand(la[0], la[1], None, rank=16, exact_max_elements=512 * 512)
            tb = LowRankOperand(lb[0], lb[1], None, rank=16, exact_max_elements=512 * 512)
            for m in metrics:
                values[m.name] = values.get(m.name, 0.0) + float(m(ta, tb) or 0.0)
        wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        with open("/proc/self/status") as fh:
            peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
        mapped = len(base._maps) + len(a._maps) + len(b._maps)  # a view of a base tensor would map its file
        started, cpu_started = time.perf_counter(), time.process_time()  # layer 0 densely, for the projection
        for name in [n for n in a.adapted if ".layers.0." in n]:
            la, lb = a.factors(name, cpu), b.factors(name, cpu)
            da, db = Operand((la[0] @ la[1]).float()), Operand((lb[0] @ lb[1]).float())
            for m in metrics:
                m(da, db)
        dense_s, dense_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        n = len(a.adapted)
        a.close()
        b.close()
    print(json.dumps({
        "tensors": n, "low_rank_wall_s": round(wall, 2), "low_rank_cpu_s": round(cpu_s, 2),
        "peak_rss_gb": round(peak / 1e9, 2),
        "files_mapped_for_tensor_data": mapped,
        "dense_one_layer_s": round(dense_s, 2), "dense_projected_32_layers_s": round(dense_s * SHAPE_7B.layers, 1),
        "dense_one_layer_cpu_s": round(dense_cpu, 2),
        "dense_projected_32_layers_cpu_s": round(dense_cpu * SHAPE_7B.layers, 1),
        "mean_task_cosine": round(values["task_cosine"] / n, 5),
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.out)
        return 0
    ensure(args.out)
    import subprocess

    done = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--child", "--out", str(args.out)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr[-2000:])
    if done.returncode:
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"two rank-{RANK} adapters, {result['tensors']} modules each, 7B-shaped base never read: "
          f"{result['low_rank_wall_s']} s wall, {result['low_rank_cpu_s']} s CPU, peak RSS {result['peak_rss_gb']} GB "
          f"(tensor files mapped: {result['files_mapped_for_tensor_data']}; targets <= 30 s, <= 1.5 GB)")
    print(f"the same task-vector metrics on dense deltas: {result['dense_one_layer_s']} s wall, "
          f"{result['dense_one_layer_cpu_s']} s CPU for one layer; projected for 32 layers: about "
          f"{result['dense_projected_32_layers_s']} s wall, {result['dense_projected_32_layers_cpu_s']} s CPU "
          "(forming the deltas from the factors; a dense fine-tune would also read 2 x 13.5 GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
