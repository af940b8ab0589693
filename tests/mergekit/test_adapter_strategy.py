"""Strategies for LoRA adapters: mergekit `base+adapter` YAML that our schema accepts, a PEFT snippet that runs
with real peft, and the same through the CLI and an MCP client."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import yaml
from mcp import Client
from safetensors import safe_open

from fixtures.adapters import make_adapter, make_base
from fixtures.checkpoints import TINY, variant
from mergelens_mcp import service
from mergelens_mcp.cli import main
from mergelens_mcp.mergekit.adapters import combination_type, peft_snippet
from mergelens_mcp.mergekit.schema import MergeConfig
from mergelens_mcp.models import MergeMethod
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings

SHAPE = variant(TINY, hidden=32, intermediate=48)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_strategy")
    base = make_base(root / "base", SHAPE)
    return {
        "root": root, "base": base,
        "a": make_adapter(root / "a", base, seed=1, r=4, targets=("q_proj", "v_proj")),
        "b": make_adapter(root / "b", base, seed=2, r=8, alpha=16.0, targets=("q_proj", "v_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def result(pair: dict[str, Path]):  # noqa: ANN201 - a CompareResult
    return service.compare([str(pair["a"]), str(pair["b"])], device="cpu")


def test_the_mergekit_yaml_names_each_adapter_as_base_plus_adapter_and_passes_our_schema(
    pair: dict[str, Path], result: object
) -> None:
    text = result.strategy.mergekit_yaml
    config = yaml.safe_load(text)
    references = [m["model"] for m in config.get("models", [])] or [
        s["model"] for s in config["slices"][0]["sources"]
    ]
    assert f"{pair['base']}+{pair['a']}" in references
    MergeConfig.model_validate(config)


@pytest.mark.parametrize("method", [MergeMethod.TASK_ARITHMETIC, MergeMethod.TIES, MergeMethod.SLERP])
def test_the_peft_snippet_runs_with_real_peft_and_saves_a_merged_adapter(
    pair: dict[str, Path], result: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: MergeMethod
) -> None:
    first, second = (m.label for m in result.models)  # models are named by their folders
    params = {"weights": {first: 0.6, second: 0.4}, "density": 0.3}
    snippet = peft_snippet(result, method, params)
    kind, _ = combination_type(result, method)
    assert f"combination_type={kind!r}" in snippet and "weights=[0.6, 0.4]" in snippet
    assert ("density=0.3" in snippet) == (kind == "ties_svd")  # the ranks differ: the delta-space form
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "peft_snippet", "exec"), {})
    saved = tmp_path / "merged-adapter" / "merged"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("up_proj.lora_A" in k for k in keys)  # a module only the second adapts is in the merge
    expected_rank = 4 + 8 if kind == "cat" else 8
    assert config["r"] == expected_rank


def test_the_recommended_snippet_is_on_the_strategy_and_follows_the_method(result: object) -> None:
    s = result.strategy
    kind, _ = combination_type(result, s.method)
    assert s.peft_snippet is not None and f"combination_type={kind!r}" in s.peft_snippet
    assert "the ranks differ, so `linear` is not available" in s.peft_snippet


def test_full_checkpoints_get_no_peft_snippet(tmp_path: Path) -> None:
    from fixtures.checkpoints import make_checkpoint, make_finetune

    base = make_checkpoint(tmp_path / "base")
    a, b = make_finetune(tmp_path / "a", task_seed=1), make_finetune(tmp_path / "b", task_seed=2)
    strategy = service.compare([str(a), str(b)], str(base), device="cpu").strategy
    assert strategy is not None and strategy.peft_snippet is None


def test_the_cli_compares_two_adapters_without_base_and_prints_the_peft_snippet(
    pair: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["compare", str(pair["a"]), str(pair["b"]), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    names = [pair["a"].name, pair["b"].name]  # models are named by their folders
    assert f"model.add_weighted_adapter(adapters={names!r}, weights=" in out  # one unwrapped line
    assert f"{pair['base']}+{pair['a']}" in out
    out_file = tmp_path / "r.json"
    assert main(["compare", str(pair["a"]), str(pair["b"]), "--device", "cpu", "--json", str(out_file)]) == 0
    data = json.loads(out_file.read_text())
    assert data["models"][0]["adapter"]["ranks"] == [4] and data["coverage"]["low_rank_tensors"] > 0


def test_an_mcp_client_gets_the_adapter_strategy(pair: dict[str, Path]) -> None:
    settings = Settings(allowed_roots=[pair["root"]], include_hf_cache=False, output_dir=pair["root"] / "reports")

    async def ask() -> dict:
        async with Client(build_server(settings)) as client:
            with anyio.fail_after(60):
                answer = await client.call_tool("suggest_strategy", {"models": [str(pair["a"]), str(pair["b"])]})
        assert not answer.is_error, answer.content
        return answer.structured_content

    out = anyio.run(ask)
    assert "add_weighted_adapter" in out["peft_snippet"]
    assert f"{pair['base']}+{pair['b']}" in out["mergekit_yaml"]
