"""Checkpoints: where they are, what their headers say, and one float32 tensor at a time.

Headers are parsed and validated by us before `safe_open` sees the file, so caps and hostile layouts
(offsets past the end, overlaps, byte counts that do not match dtype x shape) are refused before any
tensor byte is read. Pickle-based formats are never opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError, CheckpointNotFoundError
from ..security.limits import Limits
from ..security.paths import PathGuard

log = logging.getLogger(__name__)

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})(?:@(?P<rev>[A-Za-z0-9._/-]{1,128}))?$")
HUB_PATTERNS = ["*.safetensors", INDEX_NAME, "config.json"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path, limits: Limits, where: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{where}: {path.name} is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        limits.check_header(header_len, f"{where}: {path.name}")
        if 8 + header_len > size:
            raise CheckpointFormatError(
                f"{where}: {path.name} declares a {header_len:,}-byte header but the file has {size:,} bytes; "
                "the file is truncated or not safetensors"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{where}: {path.name} has an unreadable header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: {path.name} header is not a JSON object")
    header.pop("__metadata__", None)
    limits.check_tensor_count(len(header), f"{where}: {path.name}")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info, span = _tensor_entry(name, entry, path, data_len, 8 + header_len, where)
        limits.check_tensor(name, info.numel, where)
        infos[name] = info
        spans.append((*span, name))
    spans.sort()
    for (s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise CheckpointFormatError(f"{where}: {path.name}: tensors {n1!r} and {n2!r} overlap in the file")
    return infos


def _tensor_entry(
    name: str, entry: Any, path: Path, data_len: int, data_start: int, where: str
) -> tuple[TensorInfo, tuple[int, int]]:
    bad = f"{where}: {path.name}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"{bad} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CheckpointFormatError(f"{bad} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{bad} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise CheckpointFormatError(f"{bad} has data offsets {offsets!r} outside the file's {data_len:,} data bytes")
    info = TensorInfo(name, tuple(shape), dtype, path, data_start + offsets[0])
    if offsets[1] - offsets[0] != info.nbytes:
        raise CheckpointFormatError(
            f"{bad}: {offsets[1] - offsets[0]:,} bytes stored but {dtype} x {shape} needs {info.nbytes:,}"
        )
    return info, (offsets[0], offsets[1])


@dataclass
class Checkpoint:
    """A resolved checkpoint: its files, header-level tensor table and config. Reads one tensor at a time."""

    label: str
    source: str
    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def float_tensors(self) -> dict[str, TensorInfo]:
        return {n: t for n, t in self.tensors.items() if t.is_float}

    @property
    def skipped_tensors(self) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if not t.is_float)

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def architecture(self) -> str | None:
        if not self.config:
            return None
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        model_type = self.config.get("model_type")
        return str(model_type) if model_type else None

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, memory-mapped from disk, upcast to float32 on `device`."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(str(info.file), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise CheckpointFormatError(f"{self.label}: cannot open {info.file.name}: {exc}") from None
            self._handles[info.file] = handle
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointFormatError(f"{self.label}: cannot read tensor {name!r}: {exc}") from None
        return tensor.to(device=device, dtype=torch.float32)

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(
    source: str, label: str, *, guard: PathGuard | None = None, limits: Limits | None = None
) -> Checkpoint:
    """Resolve `source` (folder, .safetensors file, sharded folder or Hub id) and read its headers."""
    limits = limits or Limits()
    local = _resolve_local(source, label, guard)
    if local is None:
        local = _resolve_hub(source, label, guard)
    files, root = _safetensors_files(local, label)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f, limits, label).items():
            if name in tensors:
                raise CheckpointFormatError(f"{label}: tensor {name!r} appears in two shards of {root}")
            tensors[name] = info
    if not tensors:
        raise CheckpointFormatError(f"{label}: {local} holds no tensors")
    limits.check_tensor_count(len(tensors), label)
    return Checkpoint(label, source, root, files, tensors, _read_config(root, label))


def _resolve_local(source: str, label: str, guard: PathGuard | None) -> Path | None:
    if "\x00" in source:
        return guard.check(source, label) if guard else None
    candidate = Path(source).expanduser()
    if not candidate.exists() and not candidate.is_symlink():
        if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
            return None
        raise CheckpointNotFoundError(
            f"{label}: {source!r} is neither an existing path nor a Hugging Face Hub id (owner/name[@revision])"
        )
    return guard.check(source, label) if guard else candidate.resolve()


def _resolve_hub(source: str, label: str, guard: PathGuard | None) -> Path:
    match = HUB_ID.match(source)
    assert match is not None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            match["repo"], revision=match["rev"], allow_patterns=HUB_PATTERNS, token=os.environ.get("HF_TOKEN")
        )
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{label}: Hub model {source!r} is not in the local cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network); download it first or pass a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(f"{label}: cannot fetch Hub model {source!r}: {type(exc).__name__}: {exc}") from None
    folder_path = Path(str(folder))
    return guard.check(folder_path, label) if guard else folder_path.resolve()


def _safetensors_files(path: Path, label: str) -> tuple[list[Path], Path]:
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path], path.parent
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointFormatError(_pickle_message(label, path))
        raise CheckpointFormatError(f"{label}: {path} is not a .safetensors file")
    index = path / INDEX_NAME
    if index.is_file():
        return _shards_from_index(index, label), path
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files, path
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointFormatError(_pickle_message(label, pickles[0]))
    raise CheckpointFormatError(
        f"{label}: {path} holds no .safetensors files; point at a folder with model.safetensors, "
        f"a sharded folder with {INDEX_NAME}, or a single .safetensors file"
    )


def _shards_from_index(index: Path, label: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointFormatError(f"{label}: {index} is not a valid safetensors index (no 'weight_map')") from None
    shards = []
    for name in names:
        shard = (index.parent / str(name)).resolve()
        if shard.parent != index.parent.resolve() and not shard.is_relative_to(index.parent.resolve()):
            raise CheckpointFormatError(f"{label}: {index.name} points outside its folder ({name!r}); refused")
        if not shard.is_file():
            raise CheckpointFormatError(f"{label}: shard {name!r} listed in {index.name} is missing")
        shards.append(shard)
    return shards


def _pickle_message(label: str, path: Path) -> str:
    return (
        f"{label}: {path.name} is a pickle-based checkpoint, which mergelens never loads (unpickling runs code); "
        "convert it to safetensors first, e.g. `model.save_pretrained(dir, safe_serialization=True)` in a "
        "trusted environment"
    )


def _read_config(root: Path, label: str) -> dict[str, Any] | None:
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        log.warning("%s: config.json is not valid JSON; architecture checks use tensor names only", label)
        return None
    return config if isinstance(config, dict) else None
