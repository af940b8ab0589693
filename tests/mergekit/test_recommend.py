from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fixtures.checkpoints import Family, Shape, combine, random_model, save, task_vector
from mergelens_mcp import compare_models
from mergelens_mcp.analysis.metrics import Operand, task_mass_fraction
from mergelens_mcp.analysis.predict import best_method
from mergelens_mcp.errors import IncompatibleModelsError
from mergelens_mcp.mergekit.recommend import (
    candidates,
    choose,
    choose_predicted,
    mergekit_yaml,
    needs_separate_base,
    profile,
    recommend_strategy,
)
from mergelens_mcp.mergekit.schema import MergeConfig
from mergelens_mcp.models import CompareResult, MergeMethod, MethodPrediction
from mergelens_mcp.service import diagnose, suggest_strategy

TASK_METHODS = {m for m in MergeMethod if needs_separate_base(m)}


@pytest.fixture(scope="module")
def with_base(family: Family) -> dict[str, CompareResult]:
    f = family
    return {
        "a_b": compare_models([str(f.finetune_a), str(f.finetune_b)], base=str(f.base)),
        "a_flipped": compare_models([str(f.finetune_a), str(f.flipped)], base=str(f.base)),
        "a_opposed": compare_models([str(f.finetune_a), str(f.opposed)], base=str(f.base)),
        "three": compare_models([str(f.finetune_a), str(f.finetune_b), str(f.flipped)], base=str(f.base)),
    }


@pytest.fixture(scope="module")
def without_base(family: Family) -> dict[str, CompareResult]:
    f = family
    return {
        "a_a": compare_models([str(f.finetune_a), str(f.finetune_a)]),
        "a_b": compare_models([str(f.finetune_a), str(f.finetune_b)]),
        "a_flipped": compare_models([str(f.finetune_a), str(f.flipped)]),
        "a_unrelated": compare_models([str(f.finetune_a), str(f.unrelated)]),
        "three": compare_models([str(f.finetune_a), str(f.finetune_b), str(f.base)]),
    }


def test_a_sign_flipped_layer_with_a_base_leaves_the_flipped_model_out_of_that_layer_whatever_the_method(
    with_base: dict[str, CompareResult], family: Family,
) -> None:
    result = with_base["a_flipped"]
    strategy = result.strategy
    assert strategy is not None
    # two models with predictions: the best predicted method; the rule table alone would have elected signs (TIES)
    assert strategy.method.value == best_method(candidates(result))
    assert choose(profile(result)).method in (MergeMethod.TIES, MergeMethod.DARE_TIES)
    assert strategy.runner_up is not None and strategy.runner_up is not strategy.method
    assert strategy.parameters.get("weights_per_layer", {"flipped": [0.5, 0.5, 0.0, 0.5]}) == {
        "flipped": [0.5, 0.5, 0.0, 0.5]}
    assert strategy.parameters.get("t_per_layer", [0.5, 0.5, 0.0, 0.5])[2] == 0.0  # slerp: t = 0 there
    linear = yaml.safe_load(mergekit_yaml(result, MergeMethod.LINEAR))
    assert [m["model"] for m in linear["models"]] == [str(family.finetune_a), str(family.flipped)]
    assert linear["models"][1]["parameters"]["weight"] == [0.5, 0.5, 0.0, 0.5]
    ties = yaml.safe_load(mergekit_yaml(result, MergeMethod.TIES))  # had TIES been chosen: the same layer left out
    assert ties["base_model"] == str(family.base) and ties["models"][1]["parameters"]["weight"] == [0.5, 0.5, 0.0, 0.5]


def test_two_models_get_the_method_with_the_best_predicted_retention_and_the_rules_parameters(
    with_base: dict[str, CompareResult],
) -> None:
    result = with_base["a_b"]
    retentions = (0.5, 0.55, 0.6, 0.65, 0.7, 0.8)
    predicted = {m: p.model_copy(update={"retention": r, "low": r - 0.1, "high": r + 0.1})
                 for (m, p), r in zip(sorted(result.predictions.items()), retentions, strict=True)}
    # sorted: dare_linear, dare_ties, linear, slerp, task_arithmetic, ties -> ties 0.8 leads task_arithmetic 0.7
    strategy = recommend_strategy(result.model_copy(update={"predictions": predicted}))
    assert (strategy.method, strategy.runner_up) == (MergeMethod.TIES, MergeMethod.TASK_ARITHMETIC)
    assert strategy.rationale[0].startswith("predicted: ties keeps 80% of each model's accuracy (80% interval 70%-90%)")
    assert any("the predictor does not compare parameter settings" in r for r in strategy.rationale)
    assert 0.1 <= strategy.parameters["density"] <= 0.9  # from the measured mass fraction, as the rules set it
    # a lead of a full CLEAR_GAP over the runner-up and a base: the most confident the rules allow, less the
    # extrapolation (these fixtures moved less than any fitted pair)
    assert strategy.confidence == pytest.approx(0.45 + 0.3 + 0.15 - 0.2)
    assert any("outside the predictor's fitted range" in r for r in strategy.rationale)


def test_a_predicted_tie_goes_to_the_simpler_method_and_says_so() -> None:
    def pred(r: float) -> MethodPrediction:
        return MethodPrediction(retention=r, low=r, high=r, used_base=True)

    choice = choose_predicted({"ties": pred(0.71), "linear": pred(0.70), "slerp": pred(0.4)})
    assert (choice.method, choice.runner_up) == (MergeMethod.LINEAR, MergeMethod.TIES)
    assert "ties at 71% is within 2 points: the simpler method is preferred" in choice.rule
    assert choice.margin == 0.0 and choice.predicted


def test_without_a_base_the_candidates_are_the_methods_that_need_none(
    without_base: dict[str, CompareResult], with_base: dict[str, CompareResult],
) -> None:
    assert set(without_base["a_b"].predictions) >= {"ties", "task_arithmetic"}  # predicted, not recommendable
    assert set(candidates(without_base["a_b"])) == {"linear", "slerp"}
    assert set(candidates(with_base["a_b"])) == set(with_base["a_b"].predictions)
    assert candidates(with_base["three"]) == {}


def test_close_compatible_finetunes_get_the_best_predicted_method_and_the_best_of_the_others_as_runner_up(
    with_base: dict[str, CompareResult],
) -> None:
    result = with_base["a_b"]
    strategy = result.strategy
    assert strategy is not None and strategy.method.value == best_method(candidates(result))
    others = {m: p for m, p in candidates(result).items() if m != strategy.method.value}
    assert strategy.runner_up is not None and strategy.runner_up.value == best_method(others)
    assert "weights_per_layer" not in strategy.parameters and "t_per_layer" not in strategy.parameters


def test_unremarkable_finetunes_with_a_base_get_a_plain_average_with_dare_as_runner_up_when_concentrated() -> None:
    from mergelens_mcp.mergekit.recommend import Profile

    profile = Profile(
        n_models=2, has_base=True, cosine=0.93, min_cosine=0.90, overlap=0.85, task_cosine=0.02, sign=0.49,
        max_block_sign=0.51, energy=0.9, mass_fraction=0.6, balance=0.7, n_blocks=2, degenerate_layers=[],
        vocab_mismatch=False,
    )
    choice = choose(profile)
    assert (choice.method, choice.runner_up) == (MergeMethod.LINEAR, MergeMethod.DARE_TIES)
    assert choose(profile.__class__(**{**profile.__dict__, "max_block_sign": 0.7})).method is MergeMethod.TIES


def test_density_is_the_measured_share_of_coordinates_holding_the_task_vector_mass(
    with_base: dict[str, CompareResult],
) -> None:
    result = with_base["a_flipped"]
    pairs = [(lm.metrics["task_mass_fraction"], lm.n_params) for lm in result.layer_metrics]
    measured = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    density = yaml.safe_load(mergekit_yaml(result, MergeMethod.TIES))["models"][0]["parameters"]["density"]
    assert density == pytest.approx(round(measured / 0.05) * 0.05)
    assert 0.1 <= density <= 0.9


def test_finetunes_that_undo_each_other_are_not_averaged(with_base: dict[str, CompareResult]) -> None:
    strategy = with_base["a_opposed"].strategy
    assert strategy is not None and strategy.method is MergeMethod.PASSTHROUGH
    assert any("not advised" in w for w in strategy.warnings)


def test_three_aligned_finetunes_with_a_base_get_model_stock(with_base: dict[str, CompareResult]) -> None:
    strategy = with_base["three"].strategy
    assert strategy is not None and strategy.method is MergeMethod.MODEL_STOCK
    assert len(yaml.safe_load(strategy.mergekit_yaml)["models"]) == 3


def test_near_identical_models_without_base_get_linear_or_slerp_and_identical_ones_linear(
    without_base: dict[str, CompareResult],
) -> None:
    near, same = without_base["a_b"].strategy, recommend_strategy(without_base["a_a"])
    assert near is not None and {near.method, near.runner_up} == {MergeMethod.LINEAR, MergeMethod.SLERP}
    # the same checkpoint twice: the identity prior predicts 1 for both idempotent methods, a tie: the simpler
    assert yaml.safe_load(mergekit_yaml(without_base["a_b"], MergeMethod.SLERP))["parameters"]["t"] == 0.5
    assert same is not None and same.method is MergeMethod.LINEAR and same.runner_up is MergeMethod.SLERP


def test_slerp_linear_fallback_is_warned_where_the_cosine_exceeds_0_9995(
    without_base: dict[str, CompareResult],
) -> None:
    same = recommend_strategy(without_base["a_a"])
    assert same is not None
    warning = next(w for w in same.warnings if "falls back to linear" in w)
    assert "7 layer(s)" in warning


def test_without_a_base_no_method_that_needs_one_is_recommended(
    without_base: dict[str, CompareResult],
) -> None:
    for name, result in without_base.items():
        strategy = recommend_strategy(result)  # the same model twice gets none in the result: nothing to merge
        assert strategy.method not in TASK_METHODS, name
        config = yaml.safe_load(strategy.mergekit_yaml)
        assert "base_model" not in config or strategy.method is MergeMethod.SLERP
        assert any("no base model" in r for r in strategy.rationale)


def test_unrelated_models_get_passthrough_with_low_confidence_and_a_warning(
    without_base: dict[str, CompareResult], family: Family,
) -> None:
    strategy = without_base["a_unrelated"].strategy
    assert strategy is not None and strategy.method is MergeMethod.PASSTHROUGH
    config = yaml.safe_load(strategy.mergekit_yaml)
    assert config["slices"] == [{"sources": [{"model": str(family.finetune_a), "layer_range": [0, 4]}]}]
    assert strategy.confidence < 0.8


@pytest.mark.parametrize("method", list(MergeMethod))
def test_the_yaml_for_every_method_round_trips_through_the_schema_mirror(
    method: MergeMethod, with_base: dict[str, CompareResult],
) -> None:
    result = with_base["three"] if method is MergeMethod.MODEL_STOCK else with_base["a_flipped"]
    text = mergekit_yaml(result, method)
    config = MergeConfig.model_validate(yaml.safe_load(text))
    assert config.merge_method == method.value
    again = yaml.safe_dump(config.model_dump(exclude_none=True, mode="json"), sort_keys=False)
    assert MergeConfig.model_validate(yaml.safe_load(again)).merge_method == method.value


def test_a_method_that_needs_a_base_cannot_be_rendered_without_one(
    without_base: dict[str, CompareResult],
) -> None:
    with pytest.raises(ValueError, match="needs a base"):
        mergekit_yaml(without_base["a_b"], MergeMethod.TIES)


def test_a_vocab_mismatch_adds_a_tokenizer_section(tmp_path: Path) -> None:
    shape = Shape()
    base = random_model(shape, 7)
    a = combine(base, (1.0, task_vector(base, 8)))
    b = dict(a)
    g = torch.Generator().manual_seed(9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        b[name] = torch.cat([a[name], 0.02 * torch.randn(8, shape.hidden, generator=g)])
    save(a, tmp_path / "a", shape)
    save(b, tmp_path / "b", Shape(vocab=shape.vocab + 8))
    result = compare_models([str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.strategy is not None
    assert yaml.safe_load(result.strategy.mergekit_yaml)["tokenizer"] == {"source": "union"}
    assert any("vocabularies differ" in w for w in result.strategy.warnings)


def test_models_that_cannot_be_compared_get_no_strategy(tmp_path: Path, family: Family) -> None:
    other = Shape(hidden=32, intermediate=64)
    save(random_model(other, 1), tmp_path / "small", other)
    result = compare_models([str(family.finetune_a), str(tmp_path / "small")])
    assert result.mci.score is None and result.strategy is None
    with pytest.raises(IncompatibleModelsError):
        recommend_strategy(result)


def test_task_mass_fraction_is_the_share_of_coordinates_holding_90_percent_of_the_mass() -> None:
    sparse = torch.zeros(100)
    sparse[:10] = 1.0  # 9 of the 10 equal values hold 90% of the mass
    skewed = torch.tensor([8.0, 1.0, 0.5, 0.5])  # 8 + 1 = 9 of 10: two coordinates of four
    assert task_mass_fraction(Operand(sparse), Operand(sparse)) == pytest.approx(0.09)
    assert task_mass_fraction(Operand(sparse), Operand(skewed)) == pytest.approx((0.09 + 0.5) / 2)
    assert task_mass_fraction(Operand(torch.zeros(5)), Operand(torch.zeros(5))) == 0.0


def test_the_recommended_yaml_passes_our_own_diagnosis_and_removes_the_conflict_it_was_built_around(
    with_base: dict[str, CompareResult], family: Family,
) -> None:
    strategy = with_base["a_flipped"].strategy
    assert strategy is not None
    diagnosis = diagnose(strategy.mergekit_yaml, base=str(family.base))
    assert diagnosis.valid and diagnosis.findings == []
    scores = diagnosis.interference_scores
    assert scores["layers.2"] == pytest.approx(0.0, abs=1e-6) and scores["layers.1"] > 0.0


def test_suggest_strategy_returns_the_strategy_or_says_why_there_is_none(
    tmp_path: Path, family: Family,
) -> None:
    strategy = suggest_strategy([str(family.finetune_a), str(family.finetune_b)])
    assert strategy.method in (MergeMethod.LINEAR, MergeMethod.SLERP)  # no base: no task-vector method
    assert strategy.rationale[0].startswith(f"predicted: {strategy.method.value}")
    other = Shape(hidden=32, intermediate=64)
    save(random_model(other, 1), tmp_path / "small", other)
    with pytest.raises(IncompatibleModelsError, match="cannot be compared"):
        suggest_strategy([str(family.finetune_a), str(tmp_path / "small")])
