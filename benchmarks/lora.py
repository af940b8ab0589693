"""`python -m benchmarks.lora`: two rank-64 LoRA adapters of a 7B-shaped Llama, compared from their factors.

Generated once into .bench/lora/: a header-only base (a safetensors file whose header lists every tensor of a
7B Llama in bf16 -- 32 layers, hidden 4096, intermediate 11008, vocab 32000 -- and whose 13.5 GB of data are
a hole in a sparse file, but for the rows the comparison samples: about 0.5 GB of values like a trained
model's, written where the product's own seeded sampler looks) and two PEFT adapters (adapter_config.json +
adapter_model.safetensors, bf16) of rank 64 over every linear module of every layer (224 modules each).

Two child processes, alternating (`--repeat` rounds), each printing wall time, CPU time, peak RSS (VmHWM):
- `compare`: the product's `service.compare([adapter_a, adapter_b])`, as `mergelens compare` runs it: every
  model an adapter of one base, so every metric the factors give (task vectors, their SVDs, sign conflicts on
  the seeded row sample, ...) is measured exactly, the base is read on a seeded sample of rows only (weight
  cosine, l2_distance, KL and task_drift estimated from it; the weights' spectra not measured), and it counts
  the whole-tensor reads of the base (views, prefetches, reads: 0 expected) and the base's bytes read.
- `metrics` (the figure before the comparison learnt to skip the base): every task-vector metric of every
  adapted tensor from the factors, called directly, without the engine; and, for comparison, the same metrics
  on the dense deltas (scale * B @ A formed in float32) of one layer, timed and projected to 32 layers.
"""

from __future__ import annotations

import argparse
import json
import os
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
DONE = ".complete-sampled"


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


def write_sampled_rows(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """Give the rows that the comparison samples (the product's own seeded `sample_rows`) values like a
    trained model's (normal, std 0.02, rows of unequal scale), in place in the header-only file; every other
    byte stays a hole. The number of bytes written."""
    from mergelens_mcp.analysis.adapters import BASE_SAMPLE_VALUES, sample_rows

    generator = torch.Generator().manual_seed(seed)
    with path.open("r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        written = 0
        for name, shape in shapes.items():
            rows = shape[0]
            cols = 1
            for d in shape[1:]:
                cols *= d
            start = 8 + size + header[name]["data_offsets"][0]
            for row in sample_rows(rows, cols, torch.device("cpu"), BASE_SAMPLE_VALUES).tolist():
                scale = 0.02 * float(torch.exp(0.3 * torch.randn(1, generator=generator)))
                values = (torch.randn(cols, generator=generator) * scale).bfloat16()
                fh.seek(start + row * cols * 2)
                fh.write(values.view(torch.int16).numpy().tobytes())
                written += cols * 2
    return written


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
    written = write_sampled_rows(folders["base"] / "model.safetensors", shapes)
    (folders["base"] / "config.json").write_text(json.dumps(SHAPE_7B.config()))
    make_adapter(folders["a"], folders["base"], shapes, seed=1)
    make_adapter(folders["b"], folders["base"], shapes, seed=2)
    (root / DONE).write_text("ok")
    print(f"generated in {time.perf_counter() - started:.1f} s: header-only base ({size / 1e9:.1f} GB, a hole but "
          f"for the {written / 1e9:.2f} GB of rows the comparison samples), two rank-{RANK} adapters", flush=True)
    return folders


def child_metrics(root: Path) -> None:
    """Both adapters over the header-only base: every task-vector metric from the factors, called directly."""
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
        peak = _peak_rss()
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
        "tensors": n, "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2), "peak_rss_gb": round(peak / 1e9, 2),
        "base_mapped": mapped,
        "dense_one_layer_s": round(dense_s, 2), "dense_projected_32_layers_s": round(dense_s * SHAPE_7B.layers, 1),
        "dense_one_layer_cpu_s": round(dense_cpu, 2),
        "dense_projected_32_layers_cpu_s": round(dense_cpu * SHAPE_7B.layers, 1),
        "mean_task_cosine": round(values["task_cosine"] / n, 5),
    }))


def child_compare(root: Path) -> None:
    """`mergelens compare adapter_a adapter_b` in this process, counting every mapping of the base's file."""
    from mergelens_mcp import service
    from mergelens_mcp.analysis.loading import Checkpoint

    base_file = (root / "base" / "model.safetensors").resolve()
    whole: list[str] = []  # whole-tensor accesses of the base: views, prefetches, reads

    def counting(method: str) -> None:
        original = getattr(Checkpoint, method)

        def counted(self: Checkpoint, name: str, *args: object, **kwargs: object) -> object:
            if self.tensors[name].file.resolve() == base_file:
                whole.append(f"{method} {name}")
            return original(self, name, *args, **kwargs)

        setattr(Checkpoint, method, counted)

    for method in ("view", "prefetch", "blocks", "read"):
        counting(method)
    sample = os.environ.get("MERGELENS_BENCH_BASE_SAMPLE")  # the base's row sample, values per tensor
    if sample:
        from mergelens_mcp.analysis import adapters

        adapters.BASE_SAMPLE_VALUES = int(sample)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = service.compare([str(root / "adapter_a"), str(root / "adapter_b")], device="cpu")
    wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({
        "tensors": result.coverage.tensors_compared, "low_rank_tensors": result.coverage.low_rank_tensors,
        "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2), "peak_rss_gb": round(_peak_rss() / 1e9, 2),
        "base_whole_reads": len(whole), "mci": result.mci.score,
        "confidence": result.mci.confidence, "verdict": result.mci.verdict.value,
        "not_measured": result.coverage.not_measured, "base_sampled": getattr(result.coverage, "base_sampled", []),
        "base_bytes_read_gb": round(getattr(result.coverage, "base_bytes_read", 0) / 1e9, 3),
        "base_bytes_share": getattr(result.coverage, "base_bytes_share", 0.0),
        "method": result.strategy.method.value if result.strategy
        else None, "threads": torch.get_num_threads(),
    }))


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the two children, alternating")
    parser.add_argument("--child", choices=("metrics", "compare"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        (child_metrics if args.child == "metrics" else child_compare)(args.out)
        return 0
    ensure(args.out)
    import subprocess

    for _ in range(args.repeat):
        for which in ("metrics", "compare"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--child", which, "--out", str(args.out)],
                                  cwd=ROOT, capture_output=True, text=True, check=False)
            sys.stderr.write(done.stderr[-2000:])
            if done.returncode:
                return done.returncode
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if which == "compare":
                print(f"compare (the product): {r['tensors']} tensors ({r['low_rank_tensors']} from factors), "
                      f"{r['wall_s']} s wall, {r['cpu_s']} s CPU, peak RSS {r['peak_rss_gb']} GB; the base read on "
                      f"sampled rows: {r['base_bytes_read_gb']} GB ({r['base_bytes_share']:.1%}), whole-tensor "
                      f"reads {r['base_whole_reads']}; MCI {r['mci']} ({r['verdict']}, {r['confidence']}), method "
                      f"{r['method']}; estimated: {', '.join(r['base_sampled'])}; not measured: "
                      f"{', '.join(r['not_measured'])} (targets <= 30 s, <= 1.5 GB)")
                continue
            print(f"task-vector metrics from the factors, called directly (one thread): {r['tensors']} modules, "
                  f"{r['wall_s']} s wall, {r['cpu_s']} s CPU, peak RSS {r['peak_rss_gb']} GB, base file mapped "
                  f"{r['base_mapped']} times")
            print(f"  the same on dense deltas: {r['dense_one_layer_s']} s wall, {r['dense_one_layer_cpu_s']} s CPU "
                  f"for one layer; projected for 32 layers: about {r['dense_projected_32_layers_s']} s wall, "
                  f"{r['dense_projected_32_layers_cpu_s']} s CPU (forming the deltas from the factors; a dense "
                  "fine-tune would also read 2 x 13.5 GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
