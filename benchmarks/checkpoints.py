"""Deterministic Llama-shaped bench checkpoints, written tensor by tensor straight to disk.

A base and two fine-tunes (base + a shared and an own low-rank update + small dense noise) are generated in
one pass: each base tensor is drawn once, in float32, and written to all three models as bf16 before the next
is drawn, so memory stays at a few tensors however large the model. Same arguments, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import BinaryIO

import torch

from mergelens_mcp.demo import Shape

BENCH_SHAPE = Shape(hidden=2048, layers=8, heads=16, kv_heads=4, intermediate=5632, vocab=32000)
MODELS = ("base", "ft_a", "ft_b")
SHARDS = 2
DELTA_RANK = 8
DELTA_STRENGTH = 0.08  # size of the low-rank update relative to the weight scale
NOISE = 0.01  # dense noise relative to the weight scale
DONE = ".complete"


def spec_key(shape: Shape, seed: int) -> str:
    text = json.dumps([shape.tensor_shapes(), seed, DELTA_RANK, DELTA_STRENGTH, NOISE, SHARDS, MODELS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_family(root: Path, shape: Shape = BENCH_SHAPE, seed: int = 0) -> dict[str, Path]:
    """Folders of base, ft_a and ft_b under `root`; generated only when missing or made otherwise."""
    folders = {m: root / m for m in MODELS}
    key = spec_key(shape, seed)
    if all((f / DONE).is_file() and (f / DONE).read_text() == key for f in folders.values()):
        return folders
    started = time.perf_counter()
    write_family(folders, shape, seed)
    for folder in folders.values():
        (folder / DONE).write_text(key)
    size = sum(p.stat().st_size for f in folders.values() for p in f.glob("*.safetensors"))
    print(f"generated {root} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s", flush=True)
    return folders


def write_family(folders: dict[str, Path], shape: Shape, seed: int) -> None:
    shapes = shape.tensor_shapes()
    names = list(shapes)
    shard_of = _split(names, shapes)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DONE).unlink(missing_ok=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        _write_index(folder, shapes, shard_of)
    for shard in range(SHARDS):
        chunk = [n for n in names if shard_of[n] == shard]
        files = {m: (folders[m] / _shard_name(shard)).open("wb") for m in folders}
        try:
            for fh in files.values():
                _write_header(fh, {n: shapes[n] for n in chunk})
            for name in chunk:
                index = names.index(name)
                for model, tensor in _tensors(name, shapes[name], seed, index).items():
                    _write_tensor(files[model], tensor)
        finally:
            for fh in files.values():
                fh.close()


def _tensors(name: str, dims: tuple[int, ...], seed: int, index: int) -> dict[str, torch.Tensor]:
    """This tensor in base, ft_a and ft_b, drawn from generators seeded by (seed, tensor index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if len(dims) == 1:
        base = 1.0 + 0.05 * torch.randn(dims, generator=g)
    else:
        base = 0.02 * torch.randn(dims, generator=g)
    scale = float(base.norm()) / max(base.numel(), 1) ** 0.5
    out = {"base": base.to(torch.bfloat16)}
    shared = _low_rank(dims, g) if len(dims) == 2 else None
    for model in ("ft_a", "ft_b"):
        delta = NOISE * scale * torch.randn(dims, generator=g)
        if shared is not None:
            delta += DELTA_STRENGTH * scale * (shared + 0.7 * _low_rank(dims, g))
        out[model] = (base + delta).to(torch.bfloat16)
    return out


def _low_rank(dims: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    m, n = dims
    return torch.randn(m, DELTA_RANK, generator=g) @ torch.randn(DELTA_RANK, n, generator=g) / DELTA_RANK**0.5


def _split(names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    sizes = [_numel(shapes[n]) for n in names]
    half, seen, out = sum(sizes) / SHARDS, 0, {}
    for name, size in zip(names, sizes, strict=True):
        out[name] = min(SHARDS - 1, int(seen // half))
        seen += size
    return out


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _shard_name(shard: int) -> str:
    return f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"


def _write_index(folder: Path, shapes: dict[str, tuple[int, ...]], shard_of: dict[str, int]) -> None:
    index = {
        "metadata": {"total_size": sum(2 * _numel(d) for d in shapes.values())},
        "weight_map": {n: _shard_name(s) for n, s in shard_of.items()},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_header(fh: BinaryIO, shapes: dict[str, tuple[int, ...]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in shapes.items():
        nbytes = 2 * _numel(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)


def _write_tensor(fh: BinaryIO, tensor: torch.Tensor) -> None:
    fh.write(tensor.contiguous().view(torch.int16).numpy().data)
