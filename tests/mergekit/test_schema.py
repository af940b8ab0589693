from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fixtures.configs import linear_config, passthrough_slices, slerp_config, ties_config
from mergelens_mcp.mergekit.schema import METHODS, MergeConfig, method_spec
from mergelens_mcp.models import MergeMethod


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
    (lambda c: c.update(models=[{"model": "a"}, {"model": "b"}, {"model": "c"}]), "exactly 2 input models"),
    (lambda c: c.pop("base_model"), "needs a base_model"),
    (lambda c: c["parameters"].update(density=0.5), "takes no parameter density"),
    (lambda c: c.update(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}]), "exactly one of"),
    (lambda c: c.update(tokenizer_source="union", tokenizer={"source": "union"}), "not both"),
    (lambda c: c.update(dtype="fp8"), "dtype 'fp8'"),
    (lambda c: c.update(paramters={}), "Extra inputs are not permitted"),
    (lambda c: c.pop("parameters"), "needs 't'"),
])
def test_the_mirror_refuses_what_mergekit_would_ignore_or_fail_on_late(change: Any, message: str) -> None:
    config = slerp_config("a", "b")
    change(config)
    with pytest.raises(ValidationError, match=message):
        validate(config)


def test_slices_need_ordered_ranges_of_one_length_and_the_base_among_their_sources() -> None:
    with pytest.raises(ValidationError, match="0 <= start <= end"):
        validate(passthrough_slices("a", "b", ((3, 1), (0, 2))))
    uneven = {"merge_method": "linear", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": "b", "layer_range": [0, 3], "parameters": {"weight": 1.0}},
    ]}]}
    with pytest.raises(ValidationError, match="same number of layers"):
        validate(uneven)
    no_base = {"merge_method": "ties", "base_model": "base", "parameters": {"weight": 0.5}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]},
    ]}
    with pytest.raises(ValidationError, match="must be one of the sources"):
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
    with pytest.raises(ValidationError, match="needs 'weight' for models\\[1\\]"):
        validate(config)
    config["parameters"]["weight"] = 0.5
    assert validate(config).parameters == {"normalize": True, "weight": 0.5}
