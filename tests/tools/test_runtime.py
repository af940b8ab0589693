"""What every tool shares: the analysis cache, its key, and the one reading of each header per call."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from fixtures.checkpoints import Family, Shape, random_model, save
from mergelens_mcp.analysis import loading, types
from mergelens_mcp.errors import AnalysisCancelledError
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools.runtime import AnalysisCache

WAIT_S = 30


@pytest.fixture
def headers_read(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each checkpoint file's header was read."""
    counts: Counter[str] = Counter()
    real = loading.read_header

    def counting(path: Path, *args: Any, **kwargs: Any) -> Any:
        counts[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading, "read_header", counting)
    return counts


def server_settings(family: Family, scratch: Path, **changes: Any) -> Settings:
    return Settings(allowed_roots=[family.base.parent, scratch], include_hf_cache=False, **changes)


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    with anyio.fail_after(120):
        return await client.call_tool(tool, arguments)


async def test_an_uncached_and_a_cached_call_each_read_every_checkpoint_header_once(
    family: Family, tmp_path: Path, headers_read: Counter[str]
) -> None:
    args = {"models": [str(family.finetune_a), str(family.finetune_b)], "base_model": str(family.base)}
    files = [str(p / "model.safetensors") for p in (family.finetune_a, family.finetune_b, family.base)]
    async with Client(build_server(server_settings(family, tmp_path))) as client:
        first = await call(client, "get_compatibility_score", args)
        assert first.structured_content["cached"] is False
        assert dict(headers_read) == dict.fromkeys(files, 1)
        second = await call(client, "get_compatibility_score", args)
    assert second.structured_content["cached"] is True
    assert dict(headers_read) == dict.fromkeys(files, 2)


async def test_a_checkpoint_rewritten_in_place_with_its_size_and_mtime_kept_gets_a_fresh_answer(
    family: Family, tmp_path: Path
) -> None:
    shape = Shape()
    changing = save(random_model(shape, seed=7), tmp_path / "changing", shape)
    other = save(random_model(shape, seed=8), tmp_path / "other", shape)
    weights = changing / "model.safetensors"
    replacement = (other / "model.safetensors").read_bytes()
    assert len(replacement) == weights.stat().st_size and replacement != weights.read_bytes()
    args = {"models": [str(family.finetune_a), str(changing)]}
    async with Client(build_server(server_settings(family, tmp_path))) as client:
        before = await call(client, "get_compatibility_score", args)
        stat = weights.stat()
        with weights.open("r+b") as fh:  # same inode, same size; only the ctime tells
            fh.write(replacement)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        after = await call(client, "get_compatibility_score", args)
        (tmp_path / "new.safetensors").write_bytes(weights.read_bytes())  # a new inode, size and mtime kept
        os.replace(tmp_path / "new.safetensors", weights)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        replaced = await call(client, "get_compatibility_score", args)
    assert before.structured_content["cached"] is False and after.structured_content["cached"] is False
    assert replaced.structured_content["cached"] is False
    assert after.structured_content["score"] != before.structured_content["score"]


async def test_the_server_device_setting_is_refused_before_any_header_is_read(
    family: Family, tmp_path: Path, headers_read: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(types, "cuda_available", lambda: False)
    args = {"models": [str(family.finetune_a), str(family.finetune_b)]}
    async with Client(build_server(server_settings(family, tmp_path, device="cuda"))) as client:
        refused = await call(client, "get_compatibility_score", args)
    assert refused.is_error and "no CUDA GPU" in " ".join(c.text for c in refused.content)
    assert headers_read == Counter()


def test_the_analysis_cache_keeps_only_the_most_recently_used_results() -> None:
    cache = AnalysisCache(2)
    a, b, c = (object() for _ in range(3))
    cache.put("a", a)  # type: ignore[arg-type]
    cache.put("b", b)  # type: ignore[arg-type]
    assert cache.get("a") is a
    cache.put("c", c)  # type: ignore[arg-type]
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert len(cache) == 2 and (cache.hits, cache.misses) == (3, 1)
    off = AnalysisCache(0)
    off.put("a", a)  # type: ignore[arg-type]
    assert off.get("a") is None


def test_callers_asking_for_the_same_analysis_at_once_share_one_computation() -> None:
    cache = AnalysisCache(4)
    started, release = threading.Event(), threading.Event()
    computed: list[str] = []
    results: list[tuple[object, bool]] = []

    def compute() -> object:
        computed.append("x")
        started.set()
        assert release.wait(WAIT_S)
        return "result"

    def ask() -> None:
        results.append(cache.get_or_compute("k", compute, lambda: False))

    first = threading.Thread(target=ask)
    first.start()
    assert started.wait(WAIT_S)
    second = threading.Thread(target=ask)
    second.start()
    release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert computed == ["x"]
    assert sorted(results, key=lambda r: r[1]) == [("result", False), ("result", True)]
    assert cache._gates == {}


def test_a_caller_waiting_for_an_identical_analysis_can_be_cancelled() -> None:
    cache = AnalysisCache(4)
    started, release = threading.Event(), threading.Event()

    def slow() -> object:
        started.set()
        assert release.wait(WAIT_S)
        return "result"

    first = threading.Thread(target=lambda: cache.get_or_compute("k", slow, lambda: False))
    first.start()
    assert started.wait(WAIT_S)
    with pytest.raises(AnalysisCancelledError, match="identical analysis"):
        cache.get_or_compute("k", slow, lambda: True)
    release.set()
    first.join(WAIT_S)
    assert cache.get("k") == "result"
