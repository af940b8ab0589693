"""preview_merge and verify_merge through mcp's in-process `Client`: schemas, structured results, progress,
path guards and `detail`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from mcp import Client
from safetensors.torch import load_file

from fixtures.checkpoints import Family, Shape, save
from mergelens_mcp.mergekit.methods import merge_tensors
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings

TIMEOUT_S = 120
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def call(client: Client, tool: str, arguments: dict[str, Any], **kwargs: Any) -> Any:
    with anyio.fail_after(TIMEOUT_S):
        return await client.call_tool(tool, arguments, **kwargs)


@pytest.fixture(scope="module")
def probes(scratch: Path) -> str:
    path = scratch / "probes.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\ndef add(a, b): return a + b\n2 + 2 = 4\n")
    return str(path)


@pytest.fixture(scope="module")
def nan_merge(family: Family, scratch: Path) -> str:
    a = load_file(str(family.finetune_a / "model.safetensors"))
    b = load_file(str(family.finetune_b / "model.safetensors"))
    merged = {n: merge_tensors("linear", [a[n], b[n]], parameters={"weight": [0.5, 0.5]}) for n in a}
    merged["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("nan")
    return str(save(merged, scratch / "nan_merge", Shape()))


async def test_preview_and_verify_are_listed_read_only_with_output_schemas(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    for name in ("preview_merge", "verify_merge"):
        tool = tools[name]
        assert tool.annotations.read_only_hint is True and tool.annotations.destructive_hint is False
        assert tool.output_schema is not None and "detail" in tool.input_schema["properties"]
    assert tools["preview_merge"].input_schema["properties"]["models"]["minItems"] == 2
    assert "probe_file" in tools["verify_merge"].input_schema["properties"]


async def test_verify_merge_fails_a_merge_with_a_nan_tensor_and_names_its_layer(
    settings: Settings, family: Family, nan_merge: str, probes: str,
) -> None:
    arguments = {"merged_model": nan_merge, "sources": [str(family.finetune_a), str(family.finetune_b)],
                 "base_model": str(family.base), "probe_file": probes}
    async with Client(build_server(settings)) as client:
        compact = await call(client, "verify_merge", arguments)
        full = await call(client, "verify_merge", arguments | {"detail": True})
    assert not compact.is_error, compact.content
    data = compact.structured_content
    assert data["verdict"] == "failed" and data["detail"] is None
    nonfinite = [f for f in data["findings"] if f["code"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["path"] == "model.layers.2.self_attn.q_proj.weight"
    assert [s["source"] for s in data["behaviour"]] == ["finetune_a", "finetune_b"]
    detail = full.structured_content["detail"]
    assert len(detail["layers"]) == Shape().layers + 3 and detail["verdict"] == "failed"


async def test_preview_merge_ranks_candidates_and_reports_monotonic_progress(
    settings: Settings, family: Family, probes: str,
) -> None:
    updates: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total))

    arguments = {"models": [str(family.finetune_a), str(family.finetune_b)], "base_model": str(family.base),
                 "methods": ["linear", "ties"], "probe_file": probes}
    async with Client(build_server(settings)) as client:
        result = await call(client, "preview_merge", arguments, progress_callback=on_progress)
    assert not result.is_error, result.content
    data = result.structured_content
    assert sorted(r["method"] for r in data["ranking"]) == ["linear", "ties"]
    assert [r["rank"] for r in data["ranking"]] == [1, 2] and data["best"] == data["ranking"][0]["method"]
    assert set(data["ranking"][0]["per_source"]) == {"finetune_a", "finetune_b"}
    assert f"merge_method: {data['best']}" in data["best_mergekit_yaml"]
    assert data["probes"] == 3 and data["kind"] == "causal_lm"
    steps = [p for p, _ in updates]
    assert len(steps) > 10 and steps == sorted(steps) and {t for _, t in updates} == {updates[0][1]}


async def test_preview_merge_previews_the_users_own_config_as_written_without_comparing_first(
    settings: Settings, family: Family, probes: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mergelens_mcp.service as service

    def no_compare(*args: object, **kwargs: object) -> None:
        raise AssertionError("a preview of configs alone must not compare the weights")

    monkeypatch.setattr(service, "compare_checkpoints", no_compare)
    yaml = (f"merge_method: linear\nmodels:\n- model: {family.finetune_a}\n  parameters: {{weight: 0.9}}\n"
            f"- model: {family.finetune_b}\n  parameters: {{weight: 0.1}}\ndtype: float32\n")
    arguments = {"models": [str(family.finetune_a), str(family.finetune_b)], "configs": [yaml],
                 "probe_file": probes}
    async with Client(build_server(settings)) as client:
        result = await call(client, "preview_merge", arguments)
    assert not result.is_error, result.content
    data = result.structured_content
    assert [r["method"] for r in data["ranking"]] == ["linear"]
    assert data["best_mergekit_yaml"] == yaml
    kept = data["ranking"][0]["per_source"]
    assert kept["finetune_a"] > kept["finetune_b"]  # 0.9 of a: a's behaviour kept more than b's


async def test_verify_merge_refuses_a_merged_model_outside_the_allowed_folders(
    settings: Settings, family: Family, tmp_path: Path,
) -> None:
    outside = save({"model.norm.weight": torch.ones(4)}, tmp_path / "elsewhere", Shape(hidden=4, layers=1))
    async with Client(build_server(settings)) as client:
        result = await call(client, "verify_merge", {"merged_model": str(outside),
                                                     "sources": [str(family.finetune_a)]})
    assert result.is_error
    assert "allowed" in " ".join(c.text for c in result.content)


async def test_cancelling_verify_merge_stops_it_between_tensors(
    settings: Settings, family: Family, nan_merge: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from mergelens_mcp import probe
    from mergelens_mcp.errors import AnalysisCancelledError

    stopped = threading.Event()
    outcome: list[BaseException | None] = []
    real = probe.verify_merge

    def watched(*args: Any, **kwargs: Any) -> Any:
        try:
            result = real(*args, **kwargs)
        except AnalysisCancelledError as exc:
            outcome.append(exc)
            raise
        else:
            outcome.append(None)
            return result
        finally:
            stopped.set()

    monkeypatch.setattr(probe, "verify_merge", watched)
    arguments = {"merged_model": nan_merge, "sources": [str(family.finetune_a), str(family.finetune_b)],
                 "base_model": str(family.base)}
    in_threads = settings.model_copy(update={"worker_processes": False})  # where the patched function runs
    async with Client(build_server(in_threads)) as client:
        with anyio.CancelScope() as scope:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                scope.cancel()

            await call(client, "verify_merge", arguments, progress_callback=on_progress)
        assert scope.cancelled_caught
        assert await anyio.to_thread.run_sync(stopped.wait, TIMEOUT_S)
    assert isinstance(outcome[0], AnalysisCancelledError)
