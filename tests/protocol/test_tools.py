"""Every tool through mcp's in-process `Client`: schemas, structured results, progress, errors, the cache.

Analyses are slow on a loaded machine, so tests that only read results share one server (and its cache) per
module; tests about the cache, progress or cancellation build their own."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import Client
from mcp.server.mcpserver import MCPServer

from fixtures.checkpoints import Family, Shape, random_model, save
from fixtures.configs import broken_configs, ties_config
from mergelens_mcp import service
from mergelens_mcp.analysis.score import verdict_for
from mergelens_mcp.errors import AnalysisCancelledError
from mergelens_mcp.models import MergeMethod
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools import TOOL_NAMES
from mergelens_mcp.tools.runtime import AppState

TIMEOUT_S = 60
ANALYSIS_TOOLS = ("compare_models", "get_compatibility_score", "get_conflict_zones", "suggest_strategy",
                  "explain_layer", "generate_report")

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def shared(settings: Settings) -> MCPServer[AppState]:
    """One server for the tests that only read results: its cache makes repeated analyses free."""
    return build_server(settings)


def in_threads(settings: Settings) -> Settings:
    """The settings with analyses in threads of the test process, where a patched `service.compare` runs."""
    return settings.model_copy(update={"worker_processes": False})


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records every comparison that reads weights (service.compare_checkpoints), with its models."""
    calls: list[list[str]] = []
    real = service.compare_checkpoints

    def counting(models: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([m.source for m in models])
        return real(models, *args, **kwargs)

    monkeypatch.setattr(service, "compare_checkpoints", counting)
    return calls


async def call(client: Client, tool: str, arguments: dict[str, Any], **kwargs: Any) -> Any:
    with anyio.fail_after(TIMEOUT_S):
        return await client.call_tool(tool, arguments, **kwargs)


def error_text(result: Any) -> str:
    assert result.is_error, result.structured_content
    return " ".join(c.text for c in result.content)


async def test_the_server_lists_nine_tools_each_with_schemas_a_title_and_annotations(
    shared: MCPServer[AppState],
) -> None:
    async with Client(shared) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert sorted(tools) == sorted(TOOL_NAMES)
    for name, tool in tools.items():
        assert tool.title and len(tool.description or "") > 80, name
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", name
        assert tool.annotations is not None and tool.annotations.destructive_hint is False, name
        assert tool.annotations.read_only_hint is (name != "generate_report"), name
    for name in ANALYSIS_TOOLS:
        schema = tools[name].input_schema
        assert schema["properties"]["models"]["minItems"] == 2, name
        assert "models" in schema["required"] and "base_model" not in schema["required"], name
    assert "layers" in tools["compare_models"].output_schema["properties"]


async def test_compare_models_returns_a_compact_structured_answer_with_the_flipped_layer_as_a_zone(
    shared: MCPServer[AppState], flipped_pair: dict[str, Any], family: Family
) -> None:
    async with Client(shared) as client:
        result = await call(client, "compare_models", flipped_pair)
    assert not result.is_error
    out = result.structured_content
    assert out["pairwise"] == [{"model_a": "finetune_a", "model_b": "flipped", "score": out["score"],
                                "verdict": out["verdict"], "task_cosine": out["pairwise"][0]["task_cosine"]}]
    assert 0 < out["pairwise"][0]["task_cosine"] < 0.9  # a shared update, reversed in one layer of four
    assert out["verdict"] == verdict_for(out["score"]).value
    # the MCI: a predicted retention, capped at the composite outside the fitted range (these fixtures)
    assert out["score"] == min(100 * out["predictions"][out["score_method"]][0], out["composite"])
    assert list(out["predictions"]) and all(low <= r <= high for r, low, high in out["predictions"].values())
    assert out["composite"] < 75 and out["merge_advised"] == "with_care"  # the reversed layer, where it shows
    assert [(z["start_layer"], z["end_layer"]) for z in out["conflict_zones"]] == [(2, 2)]
    assert out["worst_layers"][0]["layer_name"] == "layers.2"
    assert "alignment" in out["worst_layers"][0]["weak_components"]
    assert [m["source"] for m in out["models"]] == flipped_pair["models"]
    assert out["base"]["source"] == str(family.base) and out["used_base"] is True
    assert out["layers"] is None


async def test_compare_models_with_detail_returns_every_layer_of_the_pair(
    shared: MCPServer[AppState], flipped_pair: dict[str, Any]
) -> None:
    async with Client(shared) as client:
        result = await call(client, "compare_models", flipped_pair | {"detail": True})
    layers = result.structured_content["layers"]
    assert [lm["layer_name"] for lm in layers] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3",
                                                   "norm", "lm_head"]
    assert layers[3]["metrics"]["task_cosine"] < -0.5


async def test_an_analysis_reports_progress_once_per_tensor(
    settings: Settings, flipped_pair: dict[str, Any]
) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with Client(build_server(settings)) as client:
        result = await call(client, "get_compatibility_score", flipped_pair, progress_callback=on_progress)
    tensors = len(Shape().tensor_shapes())
    assert not result.is_error
    assert [u[0] for u in updates] == list(range(1, tensors + 1))
    assert {u[1] for u in updates} == {tensors}
    assert {u[2] for u in updates} == set(Shape().tensor_shapes())


async def test_a_second_tool_on_the_same_models_is_answered_from_the_cache_without_reading_weights(
    settings: Settings, flipped_pair: dict[str, Any], engine_calls: list[list[str]]
) -> None:
    async with Client(build_server(in_threads(settings))) as client:
        first = await call(client, "compare_models", flipped_pair)
        zones = await call(client, "get_conflict_zones", flipped_pair)
        score = await call(client, "get_compatibility_score", flipped_pair)
        other = await call(client, "get_compatibility_score", {"models": flipped_pair["models"]})
    assert first.structured_content["cached"] is False
    assert zones.structured_content["cached"] is True and score.structured_content["cached"] is True
    assert zones.structured_content["zones"] == first.structured_content["conflict_zones"]
    assert other.structured_content["cached"] is False, "without the base it is another analysis"
    assert engine_calls == [flipped_pair["models"], flipped_pair["models"]]


async def test_rewriting_a_checkpoint_invalidates_its_cached_analysis(
    family: Family, scratch: Path, settings: Settings, engine_calls: list[list[str]]
) -> None:
    shape = Shape()
    ckpt = save(random_model(shape, seed=7), scratch / "changing", shape)
    args = {"models": [str(family.finetune_a), str(ckpt)]}
    async with Client(build_server(in_threads(settings))) as client:
        before = await call(client, "get_compatibility_score", args)
        weights = ckpt / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        after = await call(client, "get_compatibility_score", args)
    assert before.structured_content["cached"] is False and after.structured_content["cached"] is False
    assert len(engine_calls) == 2


async def test_get_conflict_zones_with_detail_returns_the_metrics_of_the_layers_inside_zones(
    shared: MCPServer[AppState], flipped_pair: dict[str, Any]
) -> None:
    async with Client(shared) as client:
        result = await call(client, "get_conflict_zones", flipped_pair | {"detail": True})
    out = result.structured_content
    assert [z["layer_names"] for z in out["zones"]] == [["layers.2"]]
    assert [lm["layer_name"] for lm in out["layers"]] == ["layers.2"]
    assert out["layers_scored"] == 7


async def test_compatible_finetunes_have_no_conflict_zones_and_a_high_score(
    shared: MCPServer[AppState], family: Family
) -> None:
    args = {"models": [str(family.finetune_a), str(family.finetune_b)], "base_model": str(family.base)}
    async with Client(shared) as client:
        zones = await call(client, "get_conflict_zones", args)
        score = await call(client, "get_compatibility_score", args)
    assert zones.structured_content["zones"] == []
    assert score.structured_content["score"] >= 55
    assert score.structured_content["verdict"] in ("compatible", "highly_compatible")


async def test_explain_layer_says_in_words_why_the_flipped_layer_is_bad_for_merging(
    shared: MCPServer[AppState], flipped_pair: dict[str, Any]
) -> None:
    async with Client(shared) as client:
        result = await call(client, "explain_layer", flipped_pair | {"layer": "2", "detail": True})
    out = result.structured_content
    assert out["layer"] == "layers.2" and len(out["explanations"]) == 1
    layer = out["explanations"][0]
    readings = {r["name"]: r for r in layer["readings"]}
    assert readings["task_cosine"]["value"] < -0.5 and readings["task_cosine"]["assessment"] == "bad"
    assert out["definitions"]["task_cosine"].startswith("Cosine of the two task vectors")
    assert readings["task_cosine"]["meaning"] is None  # said once, in `definitions`
    assert "opposite ones cancel" in readings["task_cosine"]["why"]
    assert readings["cosine_similarity"]["assessment"] == "good"
    assert readings["task_l2_distance"]["assessment"] == "informational"
    assert layer["verdict"] == "risky" and "task-vector alignment" in layer["summary"]
    assert layer["advice"][0].startswith("alignment: the task vectors pull in opposite directions")
    # the headline is a prediction for the whole pair: what pushed it, beside this layer's composite score
    assert "'s predicted retention for the whole pair" in layer["prediction"]
    assert "pushed up by" in layer["prediction"] or "down by" in layer["prediction"]


async def test_explain_layer_accepts_layer_names_and_lists_the_layers_when_it_does_not_know_one(
    shared: MCPServer[AppState], flipped_pair: dict[str, Any]
) -> None:
    async with Client(shared) as client:
        named = await call(client, "explain_layer", flipped_pair | {"layer": "lm_head"})
        number = await call(client, "explain_layer", flipped_pair | {"layer": 1})
        unknown = await call(client, "explain_layer", flipped_pair | {"layer": "layers.99"})
    assert named.structured_content["explanations"][0]["kind"] == "lm_head"
    assert number.structured_content["layer"] == "layers.1"
    assert "'layers.99' is not in these models" in error_text(unknown)
    assert "embed, layers.0" in error_text(unknown)


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (["/etc/passwd", "{a}"], "outside the allowed roots"),
        (["{tmp}/missing", "{a}"], "is neither an existing path nor a Hugging Face Hub id"),
        (["{tmp}/weights.bin", "{a}"], "pickle-based checkpoint"),
        (["{tmp}/notes.txt", "{a}"], "is not a .safetensors file"),
        (["{tmp}/truncated.safetensors", "{a}"], "too short for a safetensors header"),
        (["{a}"], "at least 2 items"),
    ],
    ids=["outside-roots", "missing", "pickle", "not-safetensors", "truncated", "one-model"],
)
async def test_bad_requests_come_back_as_tool_errors_the_model_can_act_on_and_the_server_keeps_serving(
    shared: MCPServer[AppState], family: Family, scratch: Path, models: list[str], expected: str
) -> None:
    (scratch / "weights.bin").write_bytes(b"\x80\x02}q\x00.")
    (scratch / "notes.txt").write_text("not weights")
    (scratch / "truncated.safetensors").write_bytes(b"\x10\x00")
    args = {"models": [m.format(a=family.finetune_a, tmp=scratch) for m in models]}
    async with Client(shared) as client:
        bad = await call(client, "compare_models", args)
        own_base = {"models": [str(family.finetune_a), str(family.base)]}
        good = await call(client, "get_compatibility_score", own_base)
    assert expected in error_text(bad)
    assert not good.is_error and good.structured_content["verdict"] == "highly_compatible"


async def test_models_of_different_shapes_are_answered_as_incompatible_with_the_reasons(
    shared: MCPServer[AppState], family: Family, scratch: Path
) -> None:
    small = Shape(hidden=32, layers=2, intermediate=64)
    save(random_model(small, seed=3), scratch / "small", small)
    async with Client(shared) as client:
        args = {"models": [str(family.finetune_a), str(scratch / "small")]}
        result = await call(client, "compare_models", args)
    out = result.structured_content
    assert not result.is_error and out["score"] is None and out["verdict"] == "incompatible"
    assert any("hidden_size=32" in reason for reason in out["reasons"])
    assert out["conflict_zones"] == [] and out["worst_layers"] == []


async def test_cancelling_a_call_stops_the_analysis_between_tensors(
    settings: Settings, flipped_pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped = threading.Event()
    outcome: list[BaseException | None] = []
    real = service.compare_checkpoints

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

    monkeypatch.setattr(service, "compare_checkpoints", watched)
    async with Client(build_server(in_threads(settings))) as client:
        with anyio.CancelScope() as scope:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                scope.cancel()

            await call(client, "compare_models", flipped_pair, progress_callback=on_progress)
        assert scope.cancelled_caught
        assert await anyio.to_thread.run_sync(stopped.wait, TIMEOUT_S)
        after = await call(client, "get_compatibility_score", flipped_pair)
    assert isinstance(outcome[0], AnalysisCancelledError)
    assert not after.is_error and after.structured_content["cached"] is False


async def test_the_should_i_merge_prompt_walks_through_the_tools(shared: MCPServer[AppState]) -> None:
    async with Client(shared) as client:
        prompts = await client.list_prompts()
        args = {"models": "org/a, org/b", "base_model": "org/base"}
        prompt = await client.get_prompt("should_i_merge", args)
    assert [p.name for p in prompts.prompts] == ["should_i_merge"]
    text = prompt.messages[0].content.text
    assert "'org/a', 'org/b'" in text and "'org/base'" in text
    assert text.index("compare_models") < text.index("suggest_strategy") < text.index("generate_report")


async def test_suggest_strategy_recommends_a_method_with_a_mergekit_config_for_these_models(
    shared: MCPServer[AppState], family: Family
) -> None:
    args = {"models": [str(family.finetune_a), str(family.finetune_b)], "base_model": str(family.base)}
    async with Client(shared) as client:
        result = await call(client, "suggest_strategy", args)
    assert not result.is_error, result.content
    out = result.structured_content
    config = yaml.safe_load(out["mergekit_yaml"])
    assert config["merge_method"] == out["method"] and out["method"] in {m.value for m in MergeMethod}
    assert 0 < out["confidence"] <= 1 and out["rationale"]
    assert out["verdict"] in ("compatible", "highly_compatible")
    assert str(family.finetune_b) in out["mergekit_yaml"]
    # the method is the best prediction, and every method's prediction comes with it, best first
    assert out["rationale"][0].startswith(f"predicted: {out['method']} keeps")
    assert out["predictions"][out["method"]][0] == max(r for r, _, _ in out["predictions"].values())
    assert out["score"] <= 100 * out["predictions"][out["method"]][0]  # capped outside the fitted range


async def test_suggest_strategy_for_models_that_cannot_be_compared_is_an_error_with_the_reasons(
    shared: MCPServer[AppState], family: Family, scratch: Path
) -> None:
    small = Shape(hidden=32, layers=2, intermediate=64)
    save(random_model(small, seed=3), scratch / "small2", small)
    async with Client(shared) as client:
        args = {"models": [str(family.finetune_a), str(scratch / "small2")]}
        result = await call(client, "suggest_strategy", args)
    message = error_text(result)
    assert "cannot be merged tensor by tensor" in message and "hidden_size=32" in message


async def test_diagnose_merge_checks_a_config_given_as_text_or_as_a_path(
    shared: MCPServer[AppState], family: Family, scratch: Path
) -> None:
    text = yaml.safe_dump(ties_config(str(family.finetune_a), str(family.finetune_b), str(family.base)))
    (scratch / "merge.yaml").write_text(text)
    broken = broken_configs(str(family.finetune_a), str(family.finetune_b), str(family.base))["unknown_key"]
    async with Client(shared) as client:
        inline = await call(client, "diagnose_merge", {"config": text})
        path_args = {"config": str(scratch / "merge.yaml"), "detail": True}
        by_path = await call(client, "diagnose_merge", path_args)
        bad = await call(client, "diagnose_merge", {"config": broken})
        unparsable = await call(client, "diagnose_merge", {"config": "merge_method: ties\nmodels: [a, b"})
        outside = await call(client, "diagnose_merge", {"config": "/etc/mergekit.yaml"})
    out = inline.structured_content
    assert out["valid"] is True and out["merge_method"] == "ties" and out["layers"] is None
    assert out["overall_interference"] is not None and 0 <= out["overall_interference"] <= 1
    assert 0 < len(out["worst_layers"]) <= 5
    detailed = by_path.structured_content
    assert detailed["overall_interference"] == out["overall_interference"] and len(detailed["layers"]) >= 4
    assert "unknown_key" in {f["code"] for f in bad.structured_content["findings"]}
    assert "invalid YAML" in error_text(unparsable)
    assert "outside the allowed roots" in error_text(outside)


async def test_generate_report_writes_an_html_file_into_the_output_folder(
    shared: MCPServer[AppState], settings: Settings, flipped_pair: dict[str, Any]
) -> None:
    async with Client(shared) as client:
        result = await call(client, "generate_report", flipped_pair | {"filename": "flipped"})
    assert not result.is_error, result.content
    out = result.structured_content
    path = Path(out["path"])
    assert path == settings.reports_dir / "flipped.html" and path.stat().st_size == out["bytes"] > 10_000
    assert "<html" in path.read_text(encoding="utf-8")[:500].lower()
    assert out["summary"].startswith(f"MCI {out['score']:.1f}/100") and "1 conflict zone" in out["summary"]


async def test_generate_report_refuses_folders_in_the_name_and_files_that_are_not_reports(
    shared: MCPServer[AppState], settings: Settings, flipped_pair: dict[str, Any]
) -> None:
    settings.reports_dir.mkdir(parents=True, exist_ok=True)
    notes = settings.reports_dir / "notes.html"
    notes.write_text("my own notes")
    async with Client(shared) as client:
        escape = await call(client, "generate_report", flipped_pair | {"filename": "../escape.html"})
        clobber = await call(client, "generate_report", flipped_pair | {"filename": "notes.html"})
    assert "is not a plain file name" in error_text(escape)
    assert not (settings.reports_dir.parent / "escape.html").exists()
    assert "is not a mergelens report" in error_text(clobber) and notes.read_text() == "my own notes"


async def test_two_tools_called_at_once_on_the_same_models_read_the_weights_once(
    settings: Settings, flipped_pair: dict[str, Any], engine_calls: list[list[str]]
) -> None:
    results: dict[str, Any] = {}
    async with Client(build_server(in_threads(settings))) as client:

        async def run(tool: str) -> None:
            results[tool] = await call(client, tool, flipped_pair)

        async with anyio.create_task_group() as group:
            group.start_soon(run, "compare_models")
            group.start_soon(run, "get_conflict_zones")
    assert len(engine_calls) == 1
    assert sorted(r.structured_content["cached"] for r in results.values()) == [False, True]


async def test_compare_models_reads_the_base_of_lora_adapters_only_when_asked_with_read_base(
    settings: Settings, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fixtures.adapters import make_adapter_family

    base, adapters, _ = make_adapter_family(scratch / "lora")
    options: list[bool] = []
    real = service.compare_checkpoints

    def recording(models: Any, base_ckpt: Any, opts: Any, **kwargs: Any) -> Any:
        options.append(opts.read_base)
        return real(models, base_ckpt, opts, **kwargs)

    monkeypatch.setattr(service, "compare_checkpoints", recording)
    pair = {"models": [str(p) for p in adapters[:2]], "base_model": str(base)}
    async with Client(build_server(in_threads(settings))) as client:
        plain = await call(client, "compare_models", pair)
        full = await call(client, "compare_models", {**pair, "read_base": True})
    assert options == [False, True]  # another analysis, not the cached one
    async with Client(build_server(in_threads(settings))) as client:
        report = await call(client, "generate_report", {**pair, "read_base": True, "filename": "lora"})
    assert not report.is_error and options == [False, True, True]  # the report's comparison reads it too
    assert plain.structured_content["cached"] is False and full.structured_content["cached"] is False
