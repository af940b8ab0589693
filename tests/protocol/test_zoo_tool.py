"""rank_merge_partners through mcp's in-process `Client` on a generated 12-model zoo: a compact answer, progress
per model, cancellation, and tools/list answering while it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from fixtures.zoo import Zoo, make_zoo
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings

TIMEOUT_S = 300
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def zoo12(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return make_zoo(tmp_path_factory.mktemp("zoo12"), n=12)


@pytest.fixture
def zoo_settings(zoo12: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("MERGELENS_SKETCH_CACHE", str(tmp_path / "sketches"))
    return Settings(allowed_roots=[zoo12.base.parent], include_hf_cache=False)


async def test_rank_merge_partners_answers_compactly_with_progress_per_model_while_tools_list_stays_fast(
    zoo12: Zoo, zoo_settings: Settings, tmp_path: Path
) -> None:
    updates: list[tuple[float, float | None, str | None]] = []
    first = anyio.Event()
    listed: list[float] = []
    out: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))
        first.set()

    async with Client(build_server(zoo_settings)) as client:

        async def run() -> None:
            with anyio.fail_after(TIMEOUT_S):
                out.append(await client.call_tool(
                    "rank_merge_partners", {"models": [str(zoo12.folder)], "base_model": str(zoo12.base)},
                    progress_callback=on_progress))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(TIMEOUT_S):
                await first.wait()
            started = time.perf_counter()
            tools = await client.list_tools()
            listed.append(time.perf_counter() - started)
    [result] = out
    assert not result.is_error, result.content
    assert "rank_merge_partners" in {t.name for t in tools.tools}
    assert listed[0] < 0.2
    assert [u[0] for u in updates] == list(range(1, 13)) and {u[1] for u in updates} == {12}
    assert {u[2] for u in updates} == {f"sketched ft_{i}" for i in range(12)}
    answer = result.structured_content
    assert len(json.dumps(answer)) <= 4000 and len(result.content[0].text) <= 4000
    assert answer["models"] == 12 and answer["best_sets"] and answer["cached_sketches"] == 0
    assert ["ft_0", "ft_10"] in answer["near_duplicates"]  # ft_10 copies ft_0 (ft_11 is its opposite)
    best = answer["best_sets"][0]
    assert best["mci"] <= best["mean_mci"] and best["mci_low"] <= best["mci"]


async def test_cancelling_rank_merge_partners_stops_it_before_every_model_is_sketched(
    zoo12: Zoo, zoo_settings: Settings, tmp_path: Path
) -> None:
    async with Client(build_server(zoo_settings)) as client:
        with anyio.CancelScope() as scope:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                scope.cancel()

            with anyio.fail_after(TIMEOUT_S):
                await client.call_tool("rank_merge_partners",
                                       {"models": [str(zoo12.folder)], "base_model": str(zoo12.base)},
                                       progress_callback=on_progress)
        assert scope.cancelled_caught
        with anyio.fail_after(TIMEOUT_S):
            again = await client.call_tool("rank_merge_partners", {
                "models": [str(m) for m in zoo12.models[:3]], "base_model": str(zoo12.base), "target": "ft_1"})
    sketched = len(list((tmp_path / "sketches").glob("*.safetensors")))
    assert not again.is_error
    assert sketched < 12  # the rest were never drawn
    assert all("ft_1" in s["models"] for s in again.structured_content["best_sets"])


async def test_a_zoo_path_outside_the_allowed_roots_is_refused_with_a_message(
    zoo12: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGELENS_SKETCH_CACHE", str(tmp_path / "sketches"))
    settings = Settings(allowed_roots=[tmp_path], include_hf_cache=False)
    async with Client(build_server(settings)) as client:
        with anyio.fail_after(TIMEOUT_S):
            result = await client.call_tool("rank_merge_partners", {"models": [str(m) for m in zoo12.models[:2]]})
    assert result.is_error
    assert "outside" in result.content[0].text
