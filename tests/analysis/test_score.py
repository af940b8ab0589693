"""The MCI: components, layer scores and the overall score by hand, and the verdict thresholds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelens_mcp.analysis import score
from mergelens_mcp.analysis.score import components, layer_score, overall_score, verdict_for
from mergelens_mcp.models import Verdict


@pytest.mark.parametrize(
    ("value", "verdict"),
    [
        (100.0, Verdict.HIGHLY_COMPATIBLE), (75.0, Verdict.HIGHLY_COMPATIBLE), (74.99, Verdict.COMPATIBLE),
        (55.0, Verdict.COMPATIBLE), (54.99, Verdict.RISKY), (35.0, Verdict.RISKY),
        (34.99, Verdict.INCOMPATIBLE), (0.0, Verdict.INCOMPATIBLE), (None, Verdict.INCOMPATIBLE),
    ],
)
def test_verdicts_change_at_75_55_and_35(value: float | None, verdict: Verdict) -> None:
    assert verdict_for(value) is verdict


def test_components_transform_each_metric_as_the_table_says() -> None:
    metrics = {
        "cosine_similarity": -0.2, "l2_distance": 0.3, "spectral_overlap": 0.9, "effective_rank_ratio": 0.8,
        "kl_divergence": math.log(2), "task_cosine": -0.5, "sign_disagreement": 0.25, "tsv_interference": 0.6,
        "magnitude_ratio": 0.7, "task_drift": 0.5,
    }
    assert components(metrics) == pytest.approx({
        "direction": 0.0,  # clamp(-0.2, 0, 1)
        "distance": math.exp(-0.3 / score.DISTANCE_SCALE),  # exp(-l2 / scale): 0.0498 at scale 0.1
        "subspace": 0.9,
        "rank": 0.8,
        "distribution": 0.5,  # exp(-ln 2)
        "alignment": 0.25,  # (1 - 0.5) / 2
        "sign_agreement": 0.75,
        "interference": 1 - 0.6 * 0.75,  # 1 - tsv (1 - cos) / 2 = 0.55
        "balance": 0.7,
        "drift": 1 - (1 - math.exp(-0.5 / score.DRIFT_SCALE)) * 0.75,
    })


def test_components_skip_what_the_metrics_do_not_allow() -> None:
    assert components({"cosine_similarity": 0.5}) == {"direction": 0.5}
    assert "interference" not in components({"tsv_interference": 0.5})  # needs task_cosine too
    assert "drift" not in components({"task_drift": 0.5})


def test_layer_score_by_hand() -> None:
    perfect = {"direction": 1.0, "distance": 1.0, "subspace": 1.0, "rank": 1.0, "distribution": 1.0}
    assert layer_score(perfect) == pytest.approx(1.0)
    # weights direction 0.5, distance 0.8, subspace 0.3:
    # origin = (0.5 x 0.5 + 1 x 0.8 + 1 x 0.3) / 1.6 = 1.35 / 1.6 = 0.84375; no shape components -> 0.84375
    assert layer_score({"direction": 0.5, "distance": 1.0, "subspace": 1.0}) == pytest.approx(0.84375)
    # shape = (0.25 x 0.6 + 0.25 x 0.4) / 1.0 = 0.25 -> 0.84375 x sqrt(0.25) = 0.421875
    parts = {"direction": 0.5, "distance": 1.0, "subspace": 1.0, "rank": 0.25, "distribution": 0.25}
    assert layer_score(parts) == pytest.approx(0.421875)
    # task = (0.5 x 0.25 + 1 x 0.2) / 0.45 = 0.7222...; layer = min(1, 1^0.3 x task^0.7)
    task = (0.5 * 0.25 + 1.0 * 0.20) / 0.45
    assert layer_score({**perfect, "alignment": 0.5, "sign_agreement": 1.0}) == pytest.approx(task**0.7)


def test_task_evidence_can_only_lower_a_layer_score() -> None:
    weights = {"direction": 0.6, "distance": 0.6, "subspace": 0.6}
    perfect_task = dict.fromkeys(("alignment", "sign_agreement", "interference", "balance", "drift"), 1.0)
    assert layer_score({**weights, **perfect_task}) == pytest.approx(layer_score(weights))
    # weights alignment 0.25, sign 0.2, interference 0.25, balance 0.1, drift 0.4 (sum 1.2):
    # task = (0 + 0 + 0 + 0.1 + 0.4) / 1.2 = 0.41667 -> 0.6^0.3 x 0.41667^0.7 = 0.465 < 0.6
    conflicting = {**weights, **perfect_task, "alignment": 0.0, "sign_agreement": 0.0, "interference": 0.0}
    assert layer_score(conflicting) == pytest.approx(0.6**0.3 * (0.5 / 1.2) ** 0.7)
    assert layer_score(conflicting) < layer_score(weights)


def test_overall_score_mixes_the_weighted_mean_and_the_worst_layer() -> None:
    # equal sizes: mean 0.75, worst 0.5 -> 100 x (0.6 x 0.75 + 0.4 x 0.5) = 65
    assert overall_score([1.0, 0.5], [100, 100]) == 65.0
    # sqrt(size) weights: (1 x 10 + 0.5 x 20) / 30 = 2/3 -> 100 x (0.4 + 0.2) = 60
    assert overall_score([1.0, 0.5], [100, 400]) == 60.0


def test_a_layer_under_1_percent_of_the_median_size_cannot_be_the_worst() -> None:
    # the 50-value layer scores 0 but is under 1% of the median (10,000): worst = 1; it counts in the mean
    mean = (1.0 * 100 + 1.0 * 100 + 0.0 * math.sqrt(50)) / (200 + math.sqrt(50))
    assert overall_score([1.0, 1.0, 0.0], [10_000, 10_000, 50]) == round(100 * (0.6 * mean + 0.4), 2)
    assert overall_score([1.0, 1.0, 0.0], [10_000, 10_000, 100]) < 60  # at 1% it counts


def test_no_layers_score_zero() -> None:
    assert overall_score([], []) == 0.0


PARTS = st.dictionaries(st.sampled_from(score.COMPONENT_NAMES), st.floats(0.0, 1.0), min_size=1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(parts=PARTS, name=st.sampled_from(score.COMPONENT_NAMES), raised=st.floats(0.0, 1.0))
def test_layer_scores_stay_in_0_1_and_never_drop_when_a_component_improves(
    parts: dict[str, float], name: str, raised: float
) -> None:
    before = layer_score(parts)
    assert 0.0 <= before <= 1.0
    better = {**parts, name: max(parts.get(name, 0.0), raised)}
    if name not in parts:
        return  # adding a component changes which table entries count; only improving one is monotone
    assert layer_score(better) >= before - 1e-12


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 10**6)), min_size=1, max_size=12))
def test_the_overall_score_lies_between_the_worst_and_the_best_layer(layers: list[tuple[float, int]]) -> None:
    scores, sizes = [s for s, _ in layers], [n for _, n in layers]
    value = overall_score(scores, sizes)
    assert 100 * min(scores) - 0.01 <= value <= 100 * max(scores) + 0.01
