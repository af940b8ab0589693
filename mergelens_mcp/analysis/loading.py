"""Checkpoints: where they are, what their headers say, and one float32 tensor at a time.

Headers are parsed and validated by us before `safe_open` sees the file, so caps and hostile layouts
(offsets past the end, overlaps, byte counts that do not match dtype x shape) are refused before any
tensor byte is read. Pickle-based formats are never opened.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError, CheckpointNotFoundError, InputError, PathNotAllowedError
from ..security.limits import Limits
from ..security.paths import PathGuard, looks_like_hub_id, open_regular, parse_hub_id, shown
from ..security.redact import redact

log = logging.getLogger(__name__)

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PAGE = mmap.PAGESIZE
READ_BLOCK_BYTES = 4 << 20  # converted per step, then its pages are dropped
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 * 2**20  # config.json and the shard index; real ones are a few hundred KB at most
HUB_PATTERNS = ["*.safetensors", INDEX_NAME, "config.json", "adapter_config.json"]
UNMAPPABLE = frozenset({errno.ENOMEM, errno.EOVERFLOW, errno.EFBIG})  # mapping impossible: read in chunks instead


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
    with open_regular(path, where) as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(
                f"{where}: {path.name} is {size} bytes, too short for a safetensors header"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        limits.check_header(header_len, f"{where}: {path.name}")
        if 8 + header_len > size:
            raise CheckpointFormatError(  # the declared length is the file's own bytes: never shown
                f"{where}: {path.name} declares a header longer than the file ({size:,} bytes); the file is "
                "truncated or not safetensors"
            )
        raw = fh.read(header_len)
    header = _parse_json(raw, f"{where}: {path.name} has an unreadable header")
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: {path.name} header is not a JSON object")
    header.pop("__metadata__", None)
    limits.check_tensor_count(len(header), f"{where}: {path.name}")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info, span = _tensor_entry(name, entry, path, data_len, 8 + header_len, where, limits)
        infos[name] = info
        spans.append((*span, name))
    spans.sort()
    for (_s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise CheckpointFormatError(
                f"{where}: {path.name}: tensors {shown(n1)} and {shown(n2)} overlap in the file"
            )
    return infos


def _parse_json(raw: bytes, problem: str) -> Any:
    """JSON from untrusted bytes: any decoding failure, absurd nesting or huge number is a format error."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
        kind = type(exc).__name__
        raise CheckpointFormatError(f"{problem} ({kind}); the file is corrupt or not safetensors") from None


def _tensor_entry(
    name: str, entry: Any, path: Path, data_len: int, data_start: int, where: str, limits: Limits
) -> tuple[TensorInfo, tuple[int, int]]:
    bad = _Described(where, path, name)  # the redacted name is made only for an error (0.07 ms a tensor)
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"{bad} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointFormatError(f"{bad} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{bad} has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise CheckpointFormatError(
            f"{bad} has data offsets {_short(offsets)} outside the file's {data_len:,} data bytes"
        )
    limits.check_shape(name, shape, where)
    info = TensorInfo(name, tuple(shape), dtype, path, data_start + offsets[0])
    if offsets[1] - offsets[0] != info.nbytes:
        raise CheckpointFormatError(
            f"{bad}: {offsets[1] - offsets[0]:,} bytes stored but {dtype} x {_short(shape)} "
            f"needs {info.nbytes:,}"
        )
    return info, (offsets[0], offsets[1])


class _Described:
    """'{where}: {file}: tensor {name}' for a header error, the name redacted only when it is shown."""

    def __init__(self, where: str, path: Path, name: str) -> None:
        self.where, self.path, self.name = where, path, name

    def __format__(self, spec: str) -> str:
        return f"{self.where}: {self.path.name}: tensor {shown(self.name)}"


def _short(value: Any) -> str:
    """A header value for an error message, cut short (headers are untrusted and may be huge or deep)."""
    try:
        text = repr(value)
    except RecursionError:
        return "(too deeply nested)"
    text = redact(text)  # before the cut, so no half token survives it
    return text if len(text) <= 80 else text[:80] + "..."


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
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _unmapped: set[Path] = field(default_factory=set, repr=False)  # files that cannot be mapped: read in chunks
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @functools.cached_property
    def float_tensors(self) -> dict[str, TensorInfo]:
        """The tensors the metrics can use: floating point, with at least one element. Built once (the table
        never changes): callers ask per tensor name, and a rebuild per name made planning quadratic."""
        return {n: t for n, t in self.tensors.items() if t.is_float and t.numel > 0}

    @property
    def skipped_tensors(self) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if not (t.is_float and t.numel > 0))

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def model_root(self) -> Path:
        """The folder of the model's config.json and tokenizer: this checkpoint's (an adapter's: its base's)."""
        return self.root

    @property
    def architecture(self) -> str | None:
        if not self.config:
            return None
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        model_type = self.config.get("model_type")
        return str(model_type) if model_type else None

    def read(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """One tensor on `device` as `dtype` (None: as stored), converted straight from the mapped file.

        The stored bytes are viewed in place and converted once, a block at a time (see `blocks`), so resident
        memory follows the tensor being read, not the file.
        """
        info = self.tensors[name]
        device = torch.device(device)
        if info.dtype not in TORCH_DTYPES or info.numel == 0:
            tensor = self._read_with_safetensors(name, device)
            return tensor if dtype is None else tensor.to(dtype)
        out = torch.empty(info.shape, dtype=dtype or TORCH_DTYPES[info.dtype], device=device)
        flat, start = out.view(-1), 0
        for block in self.blocks(name):
            flat[start:start + block.numel()].copy_(block)
            start += block.numel()
        return out

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored, viewed in place in the mapped file: no copy, its pages load as they are
        touched (`release` drops them again). Dtypes torch cannot view are read as float32 through safetensors.
        The mapping is private: a write would stay in this process, and nothing here writes. A file that cannot
        be mapped (ENOMEM: larger than the address space or the memory the kernel will commit) is read instead,
        in bounded chunks, into a tensor of its own.
        """
        info = self.tensors[name]
        if info.dtype not in TORCH_DTYPES or info.numel == 0:
            return self._read_with_safetensors(name, torch.device("cpu"))
        return self._mapped(name, info.numel)[1].view(info.shape)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (sorted, of the tensor as a matrix: its first dimension, the rest flattened) as float32,
        copied out of the mapped file: only those rows' pages are touched, and dropped from the mapping after.
        A file that cannot be mapped is read row by row."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        cols = info.numel // max(rows, 1)
        if info.dtype not in TORCH_DTYPES or info.numel == 0:
            return self._read_with_safetensors(name, torch.device("cpu")).reshape(rows, cols)[index].float()
        if self._map(info.file) is None:
            picked = [self._read_values(info, r * cols, (r + 1) * cols) for r in index.tolist()]
            return torch.stack(picked).float() if picked else torch.empty(0, cols)
        mapped, flat = self._mapped(name, info.numel)
        assert mapped is not None
        start = info.offset - info.offset % PAGE
        mapped.madvise(mmap.MADV_RANDOM, start, info.offset + info.nbytes - start)  # no read-around of the rows
        out = flat.view(rows, cols)[index.cpu()].float()
        self._release(mapped, info.offset, info.offset + info.nbytes)
        return out

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading the tensor's bytes from disk (a no-op for cached files)."""
        info = self.tensors[name]
        if info.dtype in TORCH_DTYPES and info.numel:
            mapped = self._map(info.file)
            if mapped is None:
                return
            start = info.offset - info.offset % PAGE
            mapped.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)

    def release(self, name: str) -> None:
        """Drop the whole pages of a viewed tensor from this process's mapping (they stay in the page cache)."""
        info = self.tensors[name]
        mapped = self._mapping(info.file)
        if mapped is not None and info.numel:
            self._release(mapped, info.offset, info.offset + info.nbytes)

    def blocks(self, name: str, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The tensor's first `limit` (default: all) values, flat and as stored, in consecutive CPU blocks.

        Each block is a view of the memory-mapped file; once the next block is drawn its pages are dropped
        from this process's mapping (they stay in the page cache, and a late access reads them back). Offsets
        and sizes were validated against the file when its header was read.
        """
        info = self.tensors[name]
        count = info.numel if limit is None else min(limit, info.numel)
        if info.dtype not in TORCH_DTYPES or count == 0:
            yield self._read_with_safetensors(name, torch.device("cpu")).reshape(-1)[:count]
            return
        width = DTYPE_BYTES[info.dtype]
        step = max(PAGE, READ_BLOCK_BYTES // width)
        if self._map(info.file) is None:  # no mapping: each block is read on its own
            for start in range(0, count, step):
                yield self._read_values(info, start, min(count, start + step))
            return
        mapped, view = self._mapped(name, count)
        assert mapped is not None
        for start in range(0, count, step):
            stop = min(count, start + step)
            yield view[start:stop]
            self._release(mapped, info.offset + start * width, info.offset + stop * width)

    def _mapped(self, name: str, count: int) -> tuple[mmap.mmap | None, torch.Tensor]:
        """The tensor's first `count` stored values, flat, viewed in its mapped file; and the mapping. For a
        file that cannot be mapped: the values read into memory, in bounded chunks, and no mapping."""
        info = self.tensors[name]
        mapped = self._map(info.file)
        if mapped is None:
            return None, self._read_values(info, 0, count)
        try:
            flat = torch.frombuffer(mapped, dtype=TORCH_DTYPES[info.dtype], count=count, offset=info.offset)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointFormatError(f"{self.label}: cannot read tensor {name!r}: {exc}") from None
        return mapped, flat

    @staticmethod
    def _release(mapped: mmap.mmap, start: int, stop: int) -> None:
        """Drop the whole pages of [start, stop) from the mapping (they stay in the page cache)."""
        first = -(-start // PAGE) * PAGE if start % PAGE else start
        last = stop - stop % PAGE if stop < len(mapped) else len(mapped)
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _mapping(self, path: Path) -> mmap.mmap | None:
        """The file's mapping if it is mapped (None: not mapped, or it cannot be)."""
        return self._maps.get(path)

    def _map(self, path: Path) -> mmap.mmap | None:
        """The file's mapping, or None when it cannot be mapped (larger than the address space or than the
        memory the kernel will commit): its tensors are then read with `_read_values`."""
        with self._lock:  # the engine's reader thread and its main thread may both open a file
            return self._map_locked(path)

    def _map_locked(self, path: Path) -> mmap.mmap | None:
        mapped = self._maps.get(path)
        if mapped is None and path not in self._unmapped:
            try:
                with path.open("rb") as fh:
                    # a private (copy-on-write) mapping is writable for torch.frombuffer, never written back
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                if exc.errno not in UNMAPPABLE:
                    raise CheckpointFormatError(f"{self.label}: cannot open {path.name}: {exc}") from None
                log.info("%s: %s cannot be mapped (%s); reading it in chunks", self.label, path.name, exc.strerror)
                self._unmapped.add(path)
                return None
            except ValueError as exc:
                raise CheckpointFormatError(f"{self.label}: cannot open {path.name}: {exc}") from None
            self._maps[path] = mapped
        return mapped

    def _read_values(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Stored values [start, stop) of a tensor, flat, read from its file in chunks of READ_BLOCK_BYTES (no
        mapping). A file shorter than its header says (changed since) is a format error, never a crash."""
        width = DTYPE_BYTES[info.dtype]
        buffer = bytearray((stop - start) * width)
        view = memoryview(buffer)
        try:
            with open_regular(info.file, self.label) as fh:
                fh.seek(info.offset + start * width)
                done = 0
                while done < len(buffer):
                    got = fh.readinto(view[done:done + READ_BLOCK_BYTES])
                    if not got:
                        raise CheckpointFormatError(
                            f"{self.label}: {info.file.name} is shorter than its header says: the file changed "
                            "while it was read; run again once it stops changing"
                        )
                    done += got
        except OSError as exc:
            raise CheckpointFormatError(f"{self.label}: cannot read {info.file.name}: {exc.strerror}") from None
        return torch.frombuffer(buffer, dtype=TORCH_DTYPES[info.dtype]) if buffer else torch.empty(
            0, dtype=TORCH_DTYPES[info.dtype])

    def _read_with_safetensors(self, name: str, device: torch.device) -> torch.Tensor:
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
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                pass
        self._maps.clear()
        self._handles.clear()
        self._stack.close()

    def reopened(self, label: str | None = None, base: Checkpoint | None = None) -> Checkpoint:
        """A new, unopened checkpoint on the same files and header table (no header is read again): it maps
        the files itself. For another label of the same files, or for another process. `base`: the copy of
        the checkpoint this one is read over (an adapter's base); a full checkpoint has none."""
        return Checkpoint(label or self.label, self.source, self.root, self.files, self.tensors, self.config)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its header table and paths only: the copy maps the files itself when it reads."""
        return (Checkpoint, (self.label, self.source, self.root, self.files, self.tensors, self.config))

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(
    source: str, label: str, *, guard: PathGuard | None = None, limits: Limits | None = None,
    base: Checkpoint | None = None,
) -> Checkpoint:
    """Resolve `source` (folder, .safetensors file, sharded folder, Hub id, a PEFT LoRA adapter folder or
    mergekit's `base+adapter`) and read its headers. An adapter is opened over `base` when given, else over
    the base its adapter_config.json names (analysis/adapters.py); `base` is ignored by full checkpoints.

    Without a guard every path is allowed (the CLI and the Python API act for their user), but symlinks are
    still resolved and devices, FIFOs and sockets still refused.
    """
    from .adapters import is_adapter_folder, open_adapter

    limits = limits or Limits()
    guard = guard or PathGuard([Path(os.sep)])
    if isinstance(source, str) and "+" in source and not os.path.lexists(source):  # mergekit's base+adapter
        base_source, adapter_source = source.rsplit("+", 1)
        explicit = load_checkpoint(base_source, f"{label} base", guard=guard, limits=limits)
        try:
            adapter = load_checkpoint(adapter_source, label, guard=guard, limits=limits, base=explicit)
        except BaseException:
            explicit.close()
            raise
        if not hasattr(adapter, "adapter_config"):
            adapter.close()
            explicit.close()
            raise InputError(f"{label}: {shown(adapter_source)} in {shown(source)} is not a LoRA adapter folder")
        adapter.owns_base = True  # type: ignore[attr-defined]
        return adapter
    local = _resolve_local(source, label, guard)
    if local is None:
        try:
            local = _resolve_hub(source, label, guard)
        except (CheckpointNotFoundError, PathNotAllowedError) as exc:  # 'bf16/ft_a' may be a mistyped path
            raise type(exc)(f"{exc}. {local_reading(source, guard)}") from None
    if is_adapter_folder(local):
        return open_adapter(local, source, label, guard=guard, limits=limits, base=base)
    files, root = _safetensors_files(local, label, guard)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f, limits, label).items():
            if name in tensors:
                raise CheckpointFormatError(f"{label}: tensor {shown(name)} appears in two shards of {root}")
            tensors[name] = info
    if not tensors:
        raise CheckpointFormatError(f"{label}: {local} holds no tensors")
    limits.check_tensor_count(len(tensors), label)
    return Checkpoint(label, source, root, files, tensors, _read_config(root, label, guard))


NEAR_MATCHES = 3
MAX_LISTED = 500  # entries of a folder read to find near matches


def local_reading(source: str, guard: PathGuard) -> str:
    """What `source` would be as a local path: the resolved place (relative paths resolve against the server's
    folder) and near matches that exist there, said only where that place is inside the allowed roots."""
    path = Path(source).expanduser()
    resolved = Path(os.path.abspath(path if path.is_absolute() else Path.cwd() / path))
    if not guard.contains(resolved):
        return (f"Read as a local path it would be {shown(resolved)} (relative paths resolve against the server's "
                f"folder {shown(Path.cwd())}), outside the allowed roots")
    folder, wanted = resolved.parent, resolved.name
    while not folder.is_dir() and guard.contains(folder.parent) and folder != folder.parent:
        wanted, folder = folder.name, folder.parent
    near: list[str] = []
    if folder.is_dir():
        import difflib

        try:
            names = [e.name for _, e in zip(range(MAX_LISTED), os.scandir(folder), strict=False)]
        except OSError:
            names = []
        near = [str(folder / n) for n in difflib.get_close_matches(wanted, names, n=NEAR_MATCHES, cutoff=0.5)]
    hint = f"; did you mean {', '.join(shown(n) for n in near)}?" if near else ""
    return (f"Read as a local path it is {shown(resolved)} (relative paths resolve against the server's folder "
            f"{shown(Path.cwd())}), which does not exist{hint}")


def _resolve_local(source: str, label: str, guard: PathGuard) -> Path | None:
    """The checked local path, or None when `source` is no existing path but has the shape of a Hub id."""
    if not isinstance(source, str):
        raise InputError(f"{label}: expected a path or Hub id as text, got {type(source).__name__}")
    try:
        return guard.check(source, label)
    except CheckpointNotFoundError:
        if looks_like_hub_id(source):
            return None
        raise CheckpointNotFoundError(
            f"{label}: {shown(source)} is neither an existing path nor a Hugging Face Hub id "
            "(owner/name[@revision])"
        ) from None
    except PathNotAllowedError:
        if looks_like_hub_id(source):  # never an oracle for what exists outside the roots
            return None
        raise


def _resolve_hub(source: str, label: str, guard: PathGuard) -> Path:
    hub_id = parse_hub_id(source, label)  # before any network or cache access
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = Path(hub_cache_dir() or constants.HF_HUB_CACHE).expanduser().resolve()
    if not guard.contains(cache):
        raise PathNotAllowedError(
            f"{label}: {shown(source)} is a Hub id but the Hugging Face cache ({cache}) is not an allowed "
            "root; pass a local path, or allow the cache"
        )
    try:
        folder = snapshot_download(
            hub_id.repo, revision=hub_id.revision, allow_patterns=HUB_PATTERNS,
            token=os.environ.get("HF_TOKEN"), cache_dir=cache, local_files_only=_env_flag("HF_HUB_OFFLINE"),
        )
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{label}: Hub model {shown(source)} is not in the local cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network); download it first or pass a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(
            f"{label}: cannot fetch Hub model {shown(source)}: {type(exc).__name__}: {exc}"
        ) from None
    return guard.check(Path(str(folder)), label)


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, as the environment says now (huggingface_hub reads both once, at import)."""
    cache = os.environ.get("HF_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expanduser(home), "hub") if home else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _safetensors_files(path: Path, label: str, guard: PathGuard) -> tuple[list[Path], Path]:
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path], path.parent
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointFormatError(_pickle_message(label, path))
        raise CheckpointFormatError(f"{label}: {path} is not a .safetensors file")
    index = path / INDEX_NAME
    if index.is_file() or index.is_symlink():
        return _shards_from_index(guard.check_file(index, label), path, label, guard), path
    # every file found in the folder is checked again: a symlink inside an allowed folder may point out of it
    found = [p for p in path.glob("*.safetensors") if p.is_file() or p.is_symlink()]
    files = sorted(guard.check_file(p, label) for p in found)
    if files:
        return files, path
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointFormatError(_pickle_message(label, pickles[0]))
    raise CheckpointFormatError(
        f"{label}: {path} holds no .safetensors files; point at a folder with model.safetensors, "
        f"a sharded folder with {INDEX_NAME}, or a single .safetensors file"
    )


def _read_json_file(path: Path, label: str) -> Any:
    with open_regular(path, label) as fh:  # sized first: a read of the cap would allocate the cap
        raw = fh.read(min(os.fstat(fh.fileno()).st_size, MAX_JSON_BYTES) + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointFormatError(f"{label}: {path.name} is over {MAX_JSON_BYTES:,} bytes; refused")
    return _parse_json(raw, f"{label}: {path.name} is not valid JSON")


def _shards_from_index(index: Path, folder: Path, label: str, guard: PathGuard) -> list[Path]:
    weight_map = _read_json_file(index, label)
    try:
        names = sorted({str(v) for v in weight_map["weight_map"].values()})
    except (KeyError, TypeError, AttributeError):
        problem = f"{label}: {index} is not a valid safetensors index (no 'weight_map')"
        raise CheckpointFormatError(problem) from None
    shards = []
    for name in names:  # relative to the folder as given: a Hub snapshot's index may itself link into blobs/
        if "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
            problem = f"{label}: {INDEX_NAME} points outside its folder ({shown(name)}); refused"
            raise CheckpointFormatError(problem)
        candidate = folder / name
        if not (candidate.is_file() or candidate.is_symlink()):
            raise CheckpointFormatError(f"{label}: shard {shown(name)} listed in {INDEX_NAME} is missing")
        shards.append(guard.check_file(candidate, label))
    return shards


def _pickle_message(label: str, path: Path) -> str:
    return (
        f"{label}: {path.name} is a pickle-based checkpoint, which mergelens never loads (unpickling runs code); "
        "convert it to safetensors first, e.g. `model.save_pretrained(dir, safe_serialization=True)` in a "
        "trusted environment"
    )


def _read_config(root: Path, label: str, guard: PathGuard) -> dict[str, Any] | None:
    path = root / "config.json"
    if not (path.is_file() or path.is_symlink()):
        return None
    try:
        config = _read_json_file(guard.check_file(path, label), label)
    except CheckpointFormatError as exc:
        log.warning("%s; architecture checks use tensor names only", exc)
        return None
    return config if isinstance(config, dict) else None
