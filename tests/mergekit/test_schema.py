from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

import mergelens_mcp
from fixtures.configs import broken_configs, linear_config, passthrough_slices, slerp_config, ties_config
from mergelens_mcp import diagnose_config
from mergelens_mcp.mergekit.schema import (
    BOUNDS,
    METHODS,
    SLERP_LINEAR_FALLBACK,
    InputModel,
    MergeConfig,
    ModelReference,
    method_spec,
)
from mergelens_mcp.models import FindingLevel, MergeMethod


def validate(config: dict[str, Any]) -> MergeConfig:
    return MergeConfig.model_validate(yaml.safe_load(yaml.safe_dump(config)))


def test_every_method_mergelens_recommends_is_in_the_method_table() -> None:
    assert {m.value for m in MergeMethod} <= set(METHODS)


def test_the_table_says_which_methods_need_a_base_and_how_many_models() -> None:
    assert [name for name in ("linear", "slerp", "ties", "dare_ties", "model_stock", "passthrough")
            if METHODS[name].needs_base] == ["slerp", "ties", "dare_ties", "model_stock"]
    assert (METHODS["slerp"].min_inputs, METHODS["slerp"].max_inputs) == (2, 2)
    assert METHODS["model_stock"].min_inputs == 3
    ties = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask")
    assert METHODS["ties"].parameter_names == ties
    assert "epsilon" in METHODS["della"].parameter_names
    assert "gamma" in METHODS["breadcrumbs_ties"].parameter_names
    assert METHODS["model_stock"].parameter_names == ("filter_wise",)


def test_an_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown merge_method 'tie'.*ties"):
        method_spec("tie")


def test_sound_configs_of_each_shape_validate() -> None:
    assert validate(ties_config("a", "b", "base")).merge_method == "ties"
    assert validate(slerp_config("a", "b", t=[0.0, 0.5, 1.0])).parameters == {"t": [0.0, 0.5, 1.0]}
    assert validate(linear_config("a", "b", "c")).models is not None
    assert validate(passthrough_slices("a", "b", ((0, 2), (1, 4)))).slices is not None


def test_filtered_lists_gradients_and_model_reference_forms_validate() -> None:
    config = slerp_config("org/a@main", "org/b+org/lora", t=[
        {"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5},
    ])
    parsed = validate(config)
    assert parsed.models is not None and parsed.models[1].model.lora == "org/lora"
    assert parsed.models[0].model.key == "org/a@main"
    mapping = validate({**linear_config("a", "b"), "models": [
        {"model": {"model": {"path": "org/a", "revision": "v1"}}, "parameters": {"weight": 1.0}},
        {"model": "b", "parameters": {"weight": 1.0}},
    ]})
    assert mapping.models is not None and mapping.models[0].model.key == "org/a@v1"


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(models=[{"model": "a"}, {"model": "b"}, {"model": "c"}]),
     "model_count at models: slerp takes exactly 2 input models"),
    (lambda c: c.pop("base_model"), "missing_base at base_model: slerp needs a base_model"),
    (lambda c: c["parameters"].update(density=0.5),
     "unknown_parameter at parameters.density: slerp takes no parameter 'density'"),
    (lambda c: c.update(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}]),
     "models_and_slices at slices: the config has both models and slices"),
    (lambda c: c.update(tokenizer_source="union", tokenizer={"source": "union"}), "tokenizer_conflict"),
    (lambda c: c.update(dtype="fp8"), "unknown_dtype at dtype: dtype 'fp8'"),
    (lambda c: c.update(paramters={}), "unknown_key at paramters.*did you mean 'parameters'"),
    (lambda c: c.pop("parameters"), "missing_parameter at models: slerp needs `t` for a, b"),
    (lambda c: c["parameters"].update(t=1.5), "out_of_range at parameters.t: t = 1.5 is outside"),
])
def test_the_mirror_refuses_what_mergekit_would_ignore_or_fail_on_late(change: Any, message: str) -> None:
    config = slerp_config("a", "b")
    change(config)
    with pytest.raises(ValidationError, match=message):
        validate(config)


def test_slices_need_ordered_ranges_of_one_length_and_the_base_among_their_sources() -> None:
    with pytest.raises(ValidationError, match="invalid_layer_range at slices.0..sources.0..layer_range"):
        validate(passthrough_slices("a", "b", ((3, 1), (0, 2))))
    uneven = {"merge_method": "linear", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": "b", "layer_range": [0, 3], "parameters": {"weight": 1.0}},
    ]}]}
    with pytest.raises(ValidationError, match="slice_length_mismatch at slices.0..sources"):
        validate(uneven)
    no_base = {"merge_method": "ties", "base_model": "base", "parameters": {"weight": 0.5}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]},
    ]}
    with pytest.raises(ValidationError, match="base_not_in_slice at slices.0..sources"):
        validate(no_base)


def test_model_stock_needs_two_finetunes_besides_the_base() -> None:
    config = {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}]}
    with pytest.raises(ValidationError, match="at least 3"):
        validate(config)
    config["models"].append({"model": "b"})
    assert validate(config).merge_method == "model_stock"


def test_weight_must_reach_every_model_from_the_model_or_the_top_level() -> None:
    config = ties_config("a", "b", "base")
    del config["models"][1]["parameters"]["weight"]
    with pytest.raises(ValidationError, match="missing_parameter at models: ties needs `weight` for b"):
        validate(config)
    config["parameters"]["weight"] = 0.5
    assert validate(config).parameters == {"normalize": True, "weight": 0.5}


@pytest.mark.parametrize("code", sorted(broken_configs()))
def test_the_mirror_refuses_exactly_what_the_diagnosis_reports_above_info(code: str) -> None:
    """One rulebook: our YAML (MergeConfig) and a user's (diagnose_config) are held to the same rules."""
    text = broken_configs()[code]
    reported = {f.code for f in diagnose_config(text).findings if f.level is not FindingLevel.INFO}
    if not reported:  # rules that need the model files (layer counts): the mirror has no files
        assert code in ("gradient_too_long", "slice_out_of_range")
        assert MergeConfig.model_validate(yaml.safe_load(text)).merge_method
        return
    with pytest.raises(ValidationError) as info:
        MergeConfig.model_validate(yaml.safe_load(text))
    assert code in reported
    assert {c for c in reported if f"{c} at " in str(info.value)} == reported


def test_a_parameters_range_is_declared_once_and_read_by_both_paths() -> None:
    density = BOUNDS["density"]
    assert METHODS["ties"].parameter("density").bounds is density  # type: ignore[union-attr]
    assert (density.contains(1.0), density.contains(0.0), density.contains(0.5)) == (True, False, True)
    config = ties_config("a", "b", "base")
    config["models"][0]["parameters"]["density"] = 0.0
    with pytest.raises(ValidationError, match="density_out_of_range at models.0..parameters.density"):
        validate(config)
    found = diagnose_config(yaml.safe_dump(config)).findings
    assert [(f.code, f.path) for f in found] == [("density_out_of_range", "models[0].parameters.density")]


PACKAGE = Path(mergelens_mcp.__file__).parent


def _module_constants(path: Path) -> dict[str, object]:
    """Module-level NAME = literal assignments of one module."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            found.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return found


def test_mergekit_constants_and_model_keys_have_one_home_in_the_package() -> None:
    homes: dict[object, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for literal in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(literal, ast.Constant) and literal.value == SLERP_LINEAR_FALLBACK:
                homes.setdefault(SLERP_LINEAR_FALLBACK, []).append(path.relative_to(PACKAGE).as_posix())
        assert "def model_key" not in path.read_text(encoding="utf-8"), path
    assert homes == {0.9995: ["mergekit/schema.py"]}
    assert _module_constants(PACKAGE / "mergekit" / "schema.py")["SLERP_LINEAR_FALLBACK"] == 0.9995
    for module in ("simulate.py", "recommend.py", "diagnose.py"):
        assert "SLERP_LINEAR_FALLBACK" not in _module_constants(PACKAGE / "mergekit" / module)


def test_a_config_built_from_objects_is_held_to_the_same_rules() -> None:
    def slerp(*names: str) -> MergeConfig:
        models = [InputModel(model=ModelReference.model_validate(n)) for n in names]
        return MergeConfig(merge_method="slerp", base_model=ModelReference(model="a"), models=models,
                           parameters={"t": 0.5})

    assert slerp("a", "b+org/lora").models[1].model.key == "b+org/lora"  # type: ignore[index]
    with pytest.raises(ValidationError, match="model_count at models: slerp takes exactly 2"):
        slerp("a", "b", "c")
