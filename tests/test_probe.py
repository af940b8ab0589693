"""Preview and verify (probe.py): written merges checked in their weights and behaviour, candidate merges
measured on probe inputs. Checkpoints are the demo family (tiny Llama-shaped, seeded) and merges of it written
by the product's methods, some deliberately broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.checkpoints import Family, Shape, make_family, save
from mergelens_mcp.errors import LimitExceededError
from mergelens_mcp.mergekit.methods import merge_tensors
from mergelens_mcp.probe import read_probes, verify_merge
from mergelens_mcp.settings import Settings

SHAPE = Shape()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family"))


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def linear(a: dict, b: dict, weights: tuple[float, float] = (0.5, 0.5)) -> dict[str, torch.Tensor]:
    return {n: merge_tensors("linear", [a[n], b[n]], parameters={"weight": list(weights)}) for n in a}


def linear_yaml(family: Family, weights: tuple[float, float] = (0.5, 0.5)) -> str:
    return (f"merge_method: linear\nmodels:\n- model: {family.finetune_a}\n  parameters: {{weight: {weights[0]}}}\n"
            f"- model: {family.finetune_b}\n  parameters: {{weight: {weights[1]}}}\ndtype: bfloat16\n")


def verify(family: Family, merged: Path, config: str | None = None, base: bool = True):
    return verify_merge(str(merged), [str(family.finetune_a), str(family.finetune_b)],
                        str(family.base) if base else None, config=config, behaviour=False)


def test_a_linear_merge_written_by_our_methods_verifies_ok_with_half_of_each_task_vector(family, tmp_path):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b)), tmp_path / "m", SHAPE)
    result = verify(family, merged, linear_yaml(family))
    assert result.verdict == "ok", result.reasons
    blocks = [lm for lm in result.layers if lm.layer_name.startswith("layers.")]
    assert len(blocks) == SHAPE.layers
    for lm in blocks:
        assert lm.coefficients["model_a"] == pytest.approx(0.5, abs=0.02)
        assert lm.coefficients["model_b"] == pytest.approx(0.5, abs=0.02)
        assert lm.residual < 0.02 and lm.matches == "all"
        assert lm.config_error is not None and lm.config_error < 0.05


def test_a_layer_swapped_in_from_another_model_is_caught_with_the_layer_named(family, tmp_path):
    good = linear(state(family.finetune_a), state(family.finetune_b))
    other = state(family.unrelated)
    swapped = {n: other[n] if ".layers.1." in n else t for n, t in good.items()}
    merged = save(swapped, tmp_path / "m", SHAPE)
    without = verify(family, merged)
    assert without.verdict == "warning"
    assert [lm.layer_name for lm in without.layers if lm.matches == "none"] == ["layers.1"]
    assert "layers.1" in without.reasons[0]
    with_config = verify(family, merged, linear_yaml(family))
    assert with_config.verdict == "failed"
    mismatch = next(f for f in with_config.findings if f.code == "config_mismatch")
    assert mismatch.path == "layers.1" and mismatch.message.startswith("1 layer(s)")


def test_weights_of_point_nine_and_point_one_against_a_half_and_half_config_are_caught(family, tmp_path):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b), (0.9, 0.1)), tmp_path / "m", SHAPE)
    result = verify(family, merged, linear_yaml(family))
    assert result.verdict == "failed"
    mismatch = next(f for f in result.findings if f.code == "config_mismatch")
    assert f"{SHAPE.layers} layer(s)" in mismatch.message or "layers.0" in mismatch.message
    layer0 = next(lm for lm in result.layers if lm.layer_name == "layers.0")
    assert layer0.coefficients["model_a"] == pytest.approx(0.9, abs=0.02)
    assert layer0.coefficients["model_b"] == pytest.approx(0.1, abs=0.02)


def test_a_nan_tensor_fails_the_merge_with_its_layer_named(family, tmp_path):
    good = linear(state(family.finetune_a), state(family.finetune_b))
    good["model.layers.2.mlp.up_proj.weight"][0, :3] = float("nan")
    result = verify(family, save(good, tmp_path / "m", SHAPE))
    assert result.verdict == "failed"
    nonfinite = next(f for f in result.findings if f.code == "nonfinite")
    assert nonfinite.path == "model.layers.2.mlp.up_proj.weight" and "layer layers.2" in nonfinite.message
    assert "3 NaN/Inf" in nonfinite.message


def test_a_task_arithmetic_merge_made_on_the_wrong_base_is_caught_in_every_layer(family, tmp_path):
    a, b, wrong = state(family.finetune_a), state(family.finetune_b), state(family.flipped)
    merged = {n: merge_tensors("task_arithmetic", [a[n], b[n]], base=wrong[n], parameters={"weight": [1.0, 1.0]})
              for n in a}
    config = (f"merge_method: task_arithmetic\nbase_model: {family.base}\nmodels:\n"
              f"- model: {family.finetune_a}\n  parameters: {{weight: 1.0}}\n"
              f"- model: {family.finetune_b}\n  parameters: {{weight: 1.0}}\ndtype: bfloat16\n")
    result = verify(family, save(merged, tmp_path / "m", SHAPE), config)
    assert result.verdict == "failed"
    mismatch = next(f for f in result.findings if f.code == "config_mismatch")
    assert mismatch.message.startswith(f"{SHAPE.layers + 3} layer(s)")  # embed, the blocks, norm, lm_head
    assert all(lm.config_error > 0.5 for lm in result.layers)


def test_a_slice_off_by_one_is_caught_in_the_layers_it_shifted(family, tmp_path):
    a, b = state(family.finetune_a), state(family.finetune_b)
    def renumber(name: str, offset: int) -> str:
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + offset)
        return ".".join(parts)
    merged = {n: t for n, t in a.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    for n in b:  # layers 2, 3 should come from b's layers 2, 3: the merge took b's 1, 2
        if n.startswith("model.layers.") and int(n.split(".")[2]) in (1, 2):
            merged[renumber(n, 1)] = b[n]
    merged["lm_head.weight"], merged["model.norm.weight"] = b["lm_head.weight"], b["model.norm.weight"]
    config = (f"merge_method: passthrough\nslices:\n- sources:\n  - model: {family.finetune_a}\n"
              f"    layer_range: [0, 2]\n- sources:\n  - model: {family.finetune_b}\n    layer_range: [2, 4]\n"
              "dtype: bfloat16\n")
    result = verify(family, save(merged, tmp_path / "m", SHAPE), config)
    assert result.verdict == "failed"
    bad = sorted(lm.layer_name for lm in result.layers if (lm.config_error or 0) > 0.1)
    assert bad == ["layers.2", "layers.3"]


def test_probe_files_read_text_lines_and_jsonl_records_with_their_source(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first line\n\nsecond\\nline\n")
    assert [r.text for r in read_probes(str(lines))] == ["first line", "second\nline"]
    records = tmp_path / "p.jsonl"
    records.write_text(json.dumps({"text": "a", "source": "model_a"}) + "\n"
                       + json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n")
    got = read_probes(str(records))
    assert [(r.prompt, r.text, r.source) for r in got] == [("", "a", "model_a"), ("Q: 2+2?", " 4", None)]


def test_a_model_over_the_memory_cap_is_refused_before_it_is_built(family):
    with pytest.raises(LimitExceededError, match="over the cap max_probe_model_bytes"):
        verify_merge(str(family.finetune_a), [str(family.finetune_a), str(family.finetune_b)],
                     settings=Settings(max_probe_model_bytes=100_000), behaviour=True)


def test_the_verify_command_exits_1_on_a_failed_merge_and_names_the_layer(family, tmp_path, capsys):
    from mergelens_mcp.cli import main

    good = linear(state(family.finetune_a), state(family.finetune_b))
    good["model.layers.3.self_attn.o_proj.weight"][1, 1] = float("inf")
    merged = save(good, tmp_path / "m", SHAPE)
    out = tmp_path / "verify.json"
    code = main(["verify", str(merged), "--sources", str(family.finetune_a), str(family.finetune_b),
                 "--base", str(family.base), "--weights-only", "--json", str(out)])
    assert code == 1
    assert "failed" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["verdict"] == "failed" and "layer layers.3" in saved["reasons"][0]
