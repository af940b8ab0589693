"""A checkpoint that cannot be memory-mapped (larger than the address space or the memory the kernel will
commit) is read in bounded chunks instead, with the same results."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fixtures.checkpoints import Shape, make_checkpoint, make_finetune
from mergelens_mcp import service
from mergelens_mcp.analysis import loading
from mergelens_mcp.errors import CheckpointFormatError
from mergelens_mcp.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SMALL = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256)
LARGE = Shape(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=2048, vocab=4096)  # ~50 MB in bf16


@pytest.fixture
def trio(tmp_path: Path) -> dict[str, str]:
    return {
        "base": str(make_checkpoint(tmp_path / "base", SMALL, 0)),
        "a": str(make_finetune(tmp_path / "a", SMALL, 0, task_seed=1)),
        "b": str(make_finetune(tmp_path / "b", SMALL, 0, task_seed=2)),
    }


@pytest.fixture
def no_mapping(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every mapping of a file fails as it does for a file larger than memory; records the attempts."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> mmap.mmap:
        attempts.append("mmap")
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(loading.mmap, "mmap", refuse)
    return attempts


def compare(trio: dict[str, str], **kwargs: Any) -> Any:
    settings = Settings(allowed_roots=[Path(trio["a"]).parent], include_hf_cache=False, device="cpu")
    return service.compare([trio["a"], trio["b"]], trio["base"], settings=settings, **kwargs)


def test_a_checkpoint_that_cannot_be_mapped_is_read_in_chunks_with_the_same_results(
    trio: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mapped = compare(trio)
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> mmap.mmap:
        attempts.append("mmap")
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(loading.mmap, "mmap", refuse)
    monkeypatch.setattr(loading, "READ_BLOCK_BYTES", 3 * loading.PAGE + 2)  # many chunks per tensor
    chunked = compare(trio)
    assert attempts == ["mmap"] * 3  # once per file, then never again
    assert chunked.mci.score == mapped.mci.score
    assert chunked.layer_metrics == mapped.layer_metrics


def test_a_file_cut_short_while_it_is_read_in_chunks_is_a_format_error(
    trio: dict[str, str], no_mapping: list[str]
) -> None:
    victim = Path(trio["b"]) / "model.safetensors"

    def truncate(done: int, total: int, message: str) -> None:
        if done == 1:
            os.truncate(victim, 4096)

    with pytest.raises(CheckpointFormatError, match="b: model.safetensors is shorter than its header says"):
        compare(trio, progress=truncate)


def test_a_checkpoint_larger_than_the_address_space_left_is_compared(tmp_path: Path) -> None:
    a = make_finetune(tmp_path / "a", LARGE, 0, task_seed=1)
    b = make_finetune(tmp_path / "b", LARGE, 0, task_seed=2)
    size = (a / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import resource
        from mergelens_mcp import service
        from mergelens_mcp.settings import Settings
        settings = Settings(allowed_roots=[{str(tmp_path)!r}], include_hf_cache=False, device="cpu", threads=1)
        service.compare([{str(a)!r}, {str(b)!r}], settings=settings)  # warm: every library loaded
        with open("/proc/self/status") as fh:
            used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        room = {size} // 2  # less than one file: no mapping of it fits
        resource.setrlimit(resource.RLIMIT_AS, (used + room, used + room))
        result = service.compare([{str(a)!r}, {str(b)!r}], settings=settings)
        print(result.mci.score)
    """)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) > 0
