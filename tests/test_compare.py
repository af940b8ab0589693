from __future__ import annotations

from fixtures.checkpoints import Family
from mergelens_mcp import Verdict, compare_models


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
    assert result.mci.score is not None and result.mci.score < 55
    assert result.mci.verdict in (Verdict.RISKY, Verdict.INCOMPATIBLE)


def test_a_flipped_layer_becomes_a_conflict_zone_driven_by_task_vector_conflict(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.flipped)], base=str(family.base))
    assert [(z.start_layer, z.end_layer) for z in result.conflict_zones] == [(2, 2)]
    zone = result.conflict_zones[0]
    assert {"alignment", "sign_agreement"} <= set(zone.driving_metrics)
    layer2 = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.2")
    assert layer2.task_cosine is not None and layer2.task_cosine < -0.5
