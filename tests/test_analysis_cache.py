from __future__ import annotations

from mergelens_mcp.tools.runtime import AnalysisCache


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
