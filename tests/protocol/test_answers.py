"""Answers an assistant can act on, through the in-process client: one decision (`merge_advised`, `answer`) said
the same way by every tool, the should_i_merge conversation played on the fixture cases, and the size of every
tool's default answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import Client
from mcp.server.mcpserver import MCPServer

from fixtures.checkpoints import Family, Shape, make_gpt2, random_model, save
from fixtures.configs import linear_config, ties_config
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools.runtime import AppState

TIMEOUT_S = 60
MAX_ANSWER = 4_000
ADVISING_TOOLS = ("compare_models", "get_compatibility_score", "get_conflict_zones")

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def shared(settings: Settings) -> MCPServer[AppState]:
    return build_server(settings)


def cases(f: Family) -> dict[str, tuple[list[str], str | None]]:
    """The fixture cases of the conversation: models and base."""
    a, b = str(f.finetune_a), str(f.finetune_b)
    return {
        "two fine-tunes": ([a, b], str(f.base)),
        "opposed": ([a, str(f.opposed)], str(f.base)),
        "unrelated": ([a, str(f.unrelated)], str(f.base)),
        "three models": ([a, b, str(f.flipped)], str(f.base)),
        "base given as a model": ([str(f.base), a], str(f.base)),
        "the same model twice": ([a, a], str(f.base)),
    }


# merge_advised, and what suggest_strategy says: a method, or an error naming why
EXPECTED = {
    "two fine-tunes": ("yes", {"slerp", "linear"}),
    "opposed": ("no", {"passthrough"}),
    "unrelated": ("no", {"passthrough"}),
    "three models": ("with_care", {"model_stock", "ties", "linear"}),
    "base given as a model": ("no", "is the base model itself"),
    "the same model twice": ("no", "are the same checkpoint"),
}


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    with anyio.fail_after(TIMEOUT_S):
        return await client.call_tool(tool, arguments)


def text_of(result: Any) -> str:
    return " ".join(c.text for c in result.content)


async def play(client: Client, models: list[str], base: str | None) -> dict[str, Any]:
    """Follow the should_i_merge prompt as an assistant would; return what it would tell the user."""
    prompt = await client.get_prompt("should_i_merge", {"models": ", ".join(models), "base_model": base or ""})
    steps = prompt.messages[0].content.text
    assert steps.index("compare_models") < steps.index("suggest_strategy")
    args: dict[str, Any] = {"models": models, "base_model": base}
    compared = (await call(client, "compare_models", args)).structured_content
    told: dict[str, Any] = {"advised": compared["merge_advised"], "answer": compared["answer"], "method": None}
    strategy = await call(client, "suggest_strategy", args)  # the prompt says: whatever the decision
    if strategy.is_error:
        told["refusal"] = text_of(strategy)
    else:
        told["method"] = strategy.structured_content["method"]
        assert strategy.structured_content["merge_advised"] == told["advised"]
    if told["advised"] == "with_care":
        told["zones"] = (await call(client, "get_conflict_zones", args)).structured_content["zones"]
    return told


async def test_the_should_i_merge_conversation_ends_at_the_right_advice_in_every_fixture_case(
    shared: MCPServer[AppState], family: Family
) -> None:
    async with Client(shared) as client:
        for name, (models, base) in cases(family).items():
            told = await play(client, models, base)
            advised, strategy = EXPECTED[name]
            assert told["advised"] == advised, (name, told)
            assert told["answer"].lower().startswith({"yes": "yes", "with_care": "with care", "no": "no"}[advised])
            if isinstance(strategy, set):
                assert told["method"] in strategy, (name, told)
            else:
                assert strategy in told["refusal"] and told["refusal"].count("\n") == 0, (name, told)
            if advised == "with_care":
                assert told["zones"] and "layers.2" in told["answer"], (name, told)


async def test_every_analysis_tool_says_the_same_decision_and_answer(
    shared: MCPServer[AppState], family: Family
) -> None:
    models, base = cases(family)["opposed"]
    async with Client(shared) as client:
        outs = [(await call(client, tool, {"models": models, "base_model": base})).structured_content
                for tool in ADVISING_TOOLS]
        strategy = (await call(client, "suggest_strategy", {"models": models, "base_model": base}))
        report = (await call(client, "generate_report", {"models": models, "base_model": base}))
    decisions = {(o["merge_advised"], o["answer"])
                 for o in [*outs, strategy.structured_content, report.structured_content]}
    [(advised, answer)] = decisions
    assert advised == "no" and "undo each other" in answer
    compared, _, zones = outs
    assert compared["strategy"]["method"] == "passthrough"
    assert "undo each other" in compared["strategy"]["why"] and compared["strategy"]["warnings"]
    assert strategy.structured_content["runner_up"] is None  # no method rescues task vectors that cancel
    for zone in [*compared["conflict_zones"], *zones["zones"]]:
        assert "ties" not in zone["recommendation"] and "keep one model" in zone["recommendation"]


async def test_the_text_content_starts_with_the_answer_then_compact_json(
    shared: MCPServer[AppState], family: Family
) -> None:
    models, base = cases(family)["two fine-tunes"]
    async with Client(shared) as client:
        result = await call(client, "compare_models", {"models": models, "base_model": base})
    headline, _, body = text_of(result).partition("\n")
    assert headline == result.structured_content["answer"] and headline.startswith("Yes (MCI ")
    assert "\n" not in body and "  " not in body
    assert json.loads(body)["merge_advised"] == "yes"


async def test_the_same_model_twice_and_the_base_as_a_model_are_findings_not_scores_to_trust(
    shared: MCPServer[AppState], family: Family
) -> None:
    async with Client(shared) as client:
        twice = await call(client, "get_compatibility_score", {"models": [str(family.finetune_a)] * 2})
        as_base = await call(client, "compare_models",
                             {"models": [str(family.base), str(family.finetune_b)], "base_model": str(family.base)})
    assert not twice.is_error and twice.structured_content["merge_advised"] == "no"
    assert "same checkpoint" in twice.structured_content["answer"]
    out = as_base.structured_content
    assert out["merge_advised"] == "no" and out["strategy"] is None
    assert [f["code"] for f in out["findings"]] == ["model_is_base"]


async def test_models_without_a_finite_weight_get_no_score(shared: MCPServer[AppState], scratch: Path) -> None:
    import torch

    shape = Shape(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, vocab=32)
    for name in ("nan_a", "nan_b"):
        state = {k: torch.full_like(v, float("nan")) for k, v in random_model(shape, 0).items()}
        save(state, scratch / name, shape, dtype=torch.float32)
    async with Client(shared) as client:
        result = await call(client, "get_compatibility_score",
                            {"models": [str(scratch / "nan_a"), str(scratch / "nan_b")]})
    out = result.structured_content
    assert out["score"] is None and out["verdict"] == "incompatible" and out["merge_advised"] == "no"
    assert "no finite weight" in out["answer"]


async def test_explain_layer_takes_the_zone_numbering_and_names_in_any_case(
    shared: MCPServer[AppState], family: Family
) -> None:
    args = {"models": [str(family.finetune_a), str(family.flipped)], "base_model": str(family.base)}
    async with Client(shared) as client:
        embed = await call(client, "explain_layer", args | {"layer": -1})
        named = await call(client, "explain_layer", args | {"layer": "Layers.2"})
        head = await call(client, "explain_layer", args | {"layer": 4})  # the block count: norm and lm_head
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert embed.structured_content["layer"] == "embed"
    assert named.structured_content["layer"] == "layers.2"
    assert [e["layer_name"] for e in head.structured_content["explanations"]] == ["norm", "lm_head"]
    assert "-1 the embeddings" in json.dumps(tools["explain_layer"].input_schema)


async def test_detail_is_paged(shared: MCPServer[AppState], family: Family) -> None:
    models, base = cases(family)["three models"]
    async with Client(shared) as client:
        first = await call(client, "compare_models", {"models": models, "base_model": base, "detail": True})
        last = await call(client, "compare_models",
                          {"models": models, "base_model": base, "detail": True, "page": 99})
    one, end = first.structured_content, last.structured_content
    assert one["page"] == 1 and one["pages"] == end["page"] == -(-21 // 8)  # 3 pairs x 7 layers
    assert len(one["layers"]) == 8 and len(end["layers"]) == 21 - 8 * 2


async def test_every_tool_default_answer_stays_under_4000_characters(
    shared: MCPServer[AppState], family: Family, scratch: Path
) -> None:
    gpt2 = make_gpt2(scratch / "gpt2")
    smaller = save(random_model(Shape(hidden=32, layers=6, intermediate=64), 5), scratch / "smaller",
                   Shape(hidden=32, layers=6, intermediate=64))  # every tensor's shape differs: 43 findings
    all_cases = cases(family) | {
        "other architecture": ([str(family.finetune_a), str(gpt2)], None),
        "other shape": ([str(family.finetune_a), str(smaller)], None),
    }
    f = family
    configs = {
        "ties": ties_config(str(f.finetune_a), str(f.finetune_b), str(f.base)),
        "linear opposed": linear_config(str(f.finetune_a), str(f.opposed)),
    }
    sizes: dict[tuple[str, str], int] = {}
    async with Client(shared) as client:
        for name, (models, base) in all_cases.items():
            args = {"models": models, "base_model": base}
            for tool in ("compare_models", "get_compatibility_score", "get_conflict_zones", "suggest_strategy"):
                sizes[(name, tool)] = len(text_of(await call(client, tool, args)))
            sizes[(name, "explain_layer")] = len(text_of(await call(client, "explain_layer", args | {"layer": 2})))
        for name, config in configs.items():
            result = await call(client, "diagnose_merge", {"config": yaml.safe_dump(config)})
            sizes[(name, "diagnose_merge")] = len(text_of(result))
        shapes = (await call(client, "compare_models", {"models": all_cases["other shape"][0]})).structured_content
    mismatches = [f["message"] for f in shapes["findings"] if f["code"] == "shape_mismatch"]
    assert len(mismatches) == 4 and mismatches[-1].startswith("... and ")  # three examples, then a count
    for (case, tool), size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{size:6d}  {tool:24s} {case}")
    assert max(sizes.values()) < MAX_ANSWER, max(sizes.items(), key=lambda kv: kv[1])


async def test_a_misspelt_method_does_not_hide_the_other_findings(shared: MCPServer[AppState]) -> None:
    config = ("merge_method: tie\nbase_model: org/base\nmodels:\n"
              "  - model: org/a\n    parameters: {weight: 0.5, density: 1.5}\n"
              "  - model: org/b\n    parameters: {weight: \"1e-3\", densty: 0.5}\n")
    async with Client(shared) as client:
        result = await call(client, "diagnose_merge", {"config": config})
    out = result.structured_content
    codes = {f["code"]: f for f in out["findings"]}
    assert {"unknown_method", "density_out_of_range", "string_number", "unknown_parameter"} <= set(codes)
    assert "checked against ties's parameters" in codes["unknown_method"]["message"]
    assert out["valid"] is False and text_of(result).startswith("Will fail or misbehave: 2 error(s)")


@pytest.mark.parametrize(
    "config, line",
    [("merge_method: ties\nx: 2001-02-30\n", 2), ("merge_method: !!int abc\n", 1),
     ("merge_method: ties\nx: !!float abc\n", 2), ("merge_method: ties\nx: " + "9" * 5000 + "\n", 2)],
    ids=["impossible-date", "int-tag", "float-tag", "5000-digits"],
)
async def test_hostile_yaml_is_a_one_line_error_with_its_line(
    shared: MCPServer[AppState], config: str, line: int
) -> None:
    async with Client(shared) as client:
        result = await call(client, "diagnose_merge", {"config": config})
    assert result.is_error
    message = text_of(result)
    assert f"invalid YAML at line {line}" in message and "\n" not in message and len(message) < 400


async def test_diagnose_merge_takes_a_base_hint_and_warns_when_the_merge_cancels_the_fine_tunes(
    shared: MCPServer[AppState], family: Family
) -> None:
    config = yaml.safe_dump(linear_config(str(family.finetune_a), str(family.opposed)))
    async with Client(shared) as client:
        blind = (await call(client, "diagnose_merge", {"config": config})).structured_content
        seen = (await call(client, "diagnose_merge",
                           {"config": config, "base_model": str(family.base)})).structured_content
    assert [f["code"] for f in blind["findings"]] == ["no_base_for_cancellation"]
    assert blind["overall_interference"] < 0.05
    assert seen["overall_interference"] > 0.9
    assert [f["code"] for f in seen["findings"]] == ["high_interference"]


@pytest.mark.parametrize(
    "tool, arguments, expected",
    [
        ("compare_models", {"models": ["only-one"]}, "compare_models: invalid arguments: models: list should have "
                                                     "at least 2 items after validation, not 1 (expected: two or more"),
        ("explain_layer", {"models": ["a", "b"]}, "explain_layer: invalid arguments: layer: field required "
                                                  "(expected: the layer to explain: layers are numbered"),
        ("diagnose_merge", {}, "diagnose_merge: invalid arguments: config: field required (expected: a mergekit"),
    ],
)
async def test_invalid_arguments_get_a_one_line_fix_not_pydantic_s_report(
    shared: MCPServer[AppState], tool: str, arguments: dict[str, Any], expected: str
) -> None:
    async with Client(shared) as client:
        result = await call(client, tool, arguments)
    message = text_of(result)
    assert result.is_error and message.startswith(expected)
    assert "\n" not in message and "pydantic.dev" not in message and "input_value" not in message


async def test_a_path_typo_shaped_like_a_hub_id_gets_both_readings_and_near_matches(
    settings: Settings, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(family.base.parent.parent)
    folder = family.base.parent.name
    async with Client(build_server(settings)) as client:
        result = await call(client, "get_compatibility_score",
                            {"models": [f"{folder}/finetune_a", f"{folder}/finetune_bb"]})
        tools = {t.name: t for t in (await client.list_tools()).tools}
    message = text_of(result)
    assert result.is_error and "\n" not in message
    assert "is a Hub id" in message
    assert f"relative paths resolve against the server's folder '{Path.cwd()}'" in message
    assert f"did you mean '{family.finetune_b}'" in message
    schema = json.dumps(tools["compare_models"].input_schema)
    assert "relative ones resolve against the server's working folder" in schema


async def test_the_note_about_a_missing_base_names_the_tool_parameter_not_the_cli_flag(
    shared: MCPServer[AppState], family: Family
) -> None:
    async with Client(shared) as client:
        result = await call(client, "compare_models", {"models": [str(family.finetune_a), str(family.finetune_b)]})
    notes = result.structured_content["notes"]
    assert any("pass base_model for them" in n for n in notes) and not any("--base" in n for n in notes)


async def test_models_are_named_by_their_folders_with_the_full_paths_in_one_map(
    shared: MCPServer[AppState], family: Family
) -> None:
    models, base = cases(family)["three models"]
    async with Client(shared) as client:
        out = (await call(client, "compare_models", {"models": models, "base_model": base})).structured_content
        twice = (await call(client, "compare_models", {"models": [models[0], models[0]]})).structured_content
    assert [(p["model_a"], p["model_b"]) for p in out["pairwise"]] == [
        ("finetune_a", "finetune_b"), ("finetune_a", "flipped"), ("finetune_b", "flipped")]
    assert {m["label"]: m["source"] for m in out["models"]} == dict(zip(
        ["finetune_a", "finetune_b", "flipped"], models, strict=True))
    assert out["base"]["label"] == "base"
    assert [m["label"] for m in twice["models"]] == ["finetune_a", "finetune_a-2"]



async def test_the_prompt_refuses_fewer_than_two_models_and_the_score_tool_promises_the_decision(
    shared: MCPServer[AppState],
) -> None:
    from mcp.shared.exceptions import MCPError

    async with Client(shared) as client:
        with pytest.raises(MCPError, match="should_i_merge needs two or more models, got 1"):
            await client.get_prompt("should_i_merge", {"models": "org/only-one"})
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert (tools["get_compatibility_score"].description or "").startswith("The quick yes/no: merge_advised")
