"""The public Python API: `__all__`, the attribute names mergelens users know, frozen results, stable JSON, and
the verdicts `compare_models` gives on the seeded family."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import mergelens_mcp
from fixtures.checkpoints import Family
from mergelens_mcp import CompareResult, Verdict, compare_models
from mergelens_mcp.analysis.score import verdict_for
from mergelens_mcp.models import Severity


@pytest.fixture(scope="module")
def flipped_result(family: Family) -> CompareResult:
    """finetune_a against a fine-tune whose layer 2 update is reversed: one conflict zone."""
    return compare_models([str(family.finetune_a), str(family.flipped)], base=str(family.base))


def test_all_lists_only_names_the_package_has_and_star_import_gives_exactly_them() -> None:
    assert len(set(mergelens_mcp.__all__)) == len(mergelens_mcp.__all__)
    for name in mergelens_mcp.__all__:
        assert hasattr(mergelens_mcp, name), name
    namespace: dict[str, object] = {}
    exec("from mergelens_mcp import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(mergelens_mcp.__all__)


def test_all_holds_the_core_api() -> None:
    assert {
        "compare_models", "CompareResult", "ConflictZone", "LayerMetrics", "MCI", "Verdict", "MergeLensError",
        "errors", "compare_zoo", "ZooResult",
    } <= set(mergelens_mcp.__all__)
    assert issubclass(mergelens_mcp.errors.InputError, mergelens_mcp.MergeLensError)


def test_compare_models_answers_with_the_attribute_names_mergelens_users_know(
    flipped_result: CompareResult,
) -> None:
    result = flipped_result
    assert result.version == mergelens_mcp.__version__
    # two models: the MCI is the recommended method's predicted retention, the weight-space composite beside it
    # (68.2 on this family)
    assert result.strategy is not None and result.mci.method == result.strategy.method.value
    # (capped at the composite: the fixtures lie outside the fitted range)
    assert result.mci.score == min(round(100 * result.predictions[result.mci.method].retention, 2),
                                   result.mci.composite)
    assert result.mci.composite is not None and 55 <= result.mci.composite < 75
    assert result.mci.verdict is verdict_for(result.mci.score)
    layer = result.layer_metrics[0]
    assert layer.layer_name == "embed"
    assert layer.cosine_similarity == layer.metrics["cosine_similarity"]
    assert layer.task_cosine == layer.metrics["task_cosine"]
    names = [lm.layer_name for lm in result.layer_metrics]
    assert names == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    [zone] = result.conflict_zones
    assert (zone.start_layer, zone.end_layer) == (2, 2)
    assert zone.severity is Severity.MEDIUM
    assert zone.recommendation.startswith("layers.2 (score ")


def test_results_are_frozen(flipped_result: CompareResult) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        flipped_result.mci.score = 100.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        flipped_result.conflict_zones[0].recommendation = "merge anyway"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        flipped_result.layer_metrics[0].score = 0.0  # type: ignore[misc]


def test_the_same_comparison_twice_gives_the_same_json_but_for_the_elapsed_time(
    family: Family, flipped_result: CompareResult
) -> None:
    again = compare_models([str(family.finetune_a), str(family.flipped)], base=str(family.base))
    first, second = (r.model_dump_json(exclude={"elapsed_s"}) for r in (flipped_result, again))
    assert first == second
    assert CompareResult.model_validate_json(again.model_dump_json()) == again


def test_results_refuse_unknown_fields(flipped_result: CompareResult) -> None:
    data = flipped_result.model_dump(mode="json") | {"surprise": 1}
    with pytest.raises(ValidationError, match="surprise"):
        CompareResult.model_validate(data)


def test_compare_models_refuses_a_single_path_string_instead_of_iterating_its_characters(
    family: Family,
) -> None:
    with pytest.raises(mergelens_mcp.errors.InputError, match="at least two models"):
        compare_models(str(family.finetune_a))  # type: ignore[arg-type]
    with pytest.raises(mergelens_mcp.errors.InputError, match="at least two models"):
        compare_models([str(family.finetune_a)])


def test_identical_models_score_100(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.finetune_a)], base=str(family.base))
    assert result.mci.score == 100.0
    assert result.mci.verdict is Verdict.HIGHLY_COMPATIBLE
    assert result.conflict_zones == []


def test_unrelated_model_of_same_shape_scores_below_35(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.unrelated)])
    assert result.mci.score is not None and result.mci.score < 35
    assert result.mci.verdict is Verdict.INCOMPATIBLE


def test_finetune_against_its_own_base_is_highly_compatible(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.base)])
    assert result.mci.verdict is Verdict.HIGHLY_COMPATIBLE


def test_finetunes_pulling_in_opposite_directions_are_not_compatible(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.opposed)], base=str(family.base))
    assert result.mci.score is not None and 35 <= result.mci.score < 55  # 40.5 on this family
    assert result.mci.verdict is Verdict.RISKY


def test_a_flipped_layer_becomes_a_conflict_zone_driven_by_task_vector_conflict(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.flipped)], base=str(family.base))
    assert [(z.start_layer, z.end_layer) for z in result.conflict_zones] == [(2, 2)]
    zone = result.conflict_zones[0]
    assert {"alignment", "sign_agreement"} <= set(zone.driving_metrics)
    layer2 = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.2")
    assert layer2.task_cosine is not None and layer2.task_cosine < -0.5
