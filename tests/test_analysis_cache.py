from __future__ import annotations

import threading

import pytest

from mergelens_mcp.errors import AnalysisCancelledError
from mergelens_mcp.tools.runtime import AnalysisCache

WAIT_S = 30


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
