"""Diagnosis of mergekit configs whose models are `base+adapter`: resolved, simulated with the deltas applied,
and checked (missing adapter, another base, different targets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures.adapters import make_adapter, make_base, make_dense
from fixtures.checkpoints import TINY, variant
from fixtures.configs import ties_config
from mergelens_mcp import diagnose_config

SHAPE = variant(TINY, hidden=32, intermediate=48)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_diagnose")
    base = make_base(root / "base", SHAPE)
    a = make_adapter(root / "a", base, seed=1, r=4, targets=("q_proj", "v_proj"))
    b = make_adapter(root / "b", base, seed=2, r=8, targets=("q_proj", "v_proj", "down_proj"))
    other = make_base(root / "other", variant(SHAPE, hidden=48), seed=5)
    paths = {"base": base, "a": a, "b": b, "a_dense": make_dense(root / "a_dense", base, a),
             "b_dense": make_dense(root / "b_dense", base, b), "other": other, "root": root}
    return {k: str(v) for k, v in paths.items()}


def test_a_ties_merge_of_two_adapters_is_simulated_as_the_merge_of_their_dense_models(made: dict[str, str]) -> None:
    base = made["base"]
    lora = diagnose_config(yaml.safe_dump(ties_config(f"{base}+{made['a']}", f"{base}+{made['b']}", base)))
    dense = diagnose_config(yaml.safe_dump(ties_config(made["a_dense"], made["b_dense"], base)))
    assert lora.valid and lora.layers, lora.findings
    assert f"{base}+{made['a']}" in lora.models_checked and f"{base}+{made['b']}" in lora.models_checked
    assert lora.overall_interference == pytest.approx(dense.overall_interference, abs=1e-4)
    for x, y in zip(lora.layers, dense.layers, strict=True):
        assert x.layer_name == y.layer_name and x.interference == pytest.approx(y.interference, abs=1e-4)
    codes = {f.code for f in lora.findings}
    assert "adapter_target_mismatch" in codes and "adapter_rank_mismatch" in codes


def test_a_missing_adapter_is_a_finding_named_after_it(made: dict[str, str]) -> None:
    base = made["base"]
    missing = str(Path(made["root"]) / "no_such_adapter")
    result = diagnose_config(yaml.safe_dump(ties_config(f"{base}+{made['a']}", f"{base}+{missing}", base)))
    found = [f for f in result.findings if f.code == "adapter_missing"]
    assert len(found) == 1 and missing in found[0].message
    assert any("not simulated" in n for n in result.notes)


def test_an_adapter_over_the_wrong_base_is_unreadable_with_the_reason(made: dict[str, str]) -> None:
    base, other = made["base"], made["other"]
    result = diagnose_config(yaml.safe_dump(ties_config(f"{base}+{made['a']}", f"{other}+{made['b']}", base)))
    unreadable = [f for f in result.findings if f.code == "model_unreadable"]
    assert len(unreadable) == 1 and "made for another base" in unreadable[0].message
