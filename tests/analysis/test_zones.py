"""Conflict zones from per-layer scores: which runs of layers, how severe, driven by what, and what to do."""

from __future__ import annotations

import pytest

from mergelens_mcp.analysis.score import CATALOGUE
from mergelens_mcp.analysis.zones import detect_conflict_zones, severity_for
from mergelens_mcp.models import LayerMetrics, Severity

GOOD = {"direction": 1.0, "distance": 0.9, "alignment": 1.0, "sign_agreement": 0.95}


def layer(name: str, score: float, components: dict[str, float] | None = None) -> LayerMetrics:
    index = int(name.split(".")[1]) if name.startswith("layers.") else None
    return LayerMetrics(
        model_a="model_a", model_b="model_b", layer_name=name, layer_index=index,
        kind="block" if index is not None else name, n_params=100, tensor_names=[name + ".weight"],
        metrics={}, components=components or GOOD, score=score,
    )


def positions(n_blocks: int) -> dict[str, int]:
    return {"embed": -1, **{f"layers.{i}": i for i in range(n_blocks)}, "norm": n_blocks, "lm_head": n_blocks}


@pytest.mark.parametrize(
    ("score", "severity"),
    [(5.0, Severity.CRITICAL), (19.99, Severity.CRITICAL), (20.0, Severity.HIGH), (34.99, Severity.HIGH),
     (35.0, Severity.MEDIUM), (54.99, Severity.MEDIUM), (55.0, Severity.LOW), (90.0, Severity.LOW)],
)
def test_severity_follows_the_lowest_score_of_the_zone(score: float, severity: Severity) -> None:
    assert severity_for(score) is severity


def test_a_contiguous_run_of_low_layers_is_one_zone_with_its_worst_score() -> None:
    conflict = {"direction": 1.0, "alignment": 0.1, "sign_agreement": 0.4, "balance": 0.95}
    layers = [layer("layers.0", 90), layer("layers.1", 40, conflict), layer("layers.2", 30, conflict),
              layer("layers.3", 88)]
    [zone] = detect_conflict_zones(layers, positions(4))
    assert (zone.start_layer, zone.end_layer) == (1, 2)
    assert zone.layer_names == ["layers.1", "layers.2"]
    assert zone.score == 30
    assert zone.severity is Severity.HIGH
    assert zone.driving_metrics == ["alignment", "sign_agreement"]  # losses 0.9, 0.6 per layer
    assert zone.recommendation.startswith("layers.1 to layers.2 (score 30): ")
    assert CATALOGUE["alignment"].advice in zone.recommendation
    assert CATALOGUE["sign_agreement"].advice in zone.recommendation


def test_separate_low_layers_make_separate_zones_in_depth_order() -> None:
    layers = [layer("layers.3", 10), layer("layers.0", 50), layer("layers.1", 90), layer("layers.2", 90)]
    zones = detect_conflict_zones(layers, positions(4))
    assert [(z.start_layer, z.end_layer, z.severity) for z in zones] == [
        (0, 0, Severity.MEDIUM), (3, 3, Severity.CRITICAL)
    ]


def test_a_layer_far_below_the_median_is_a_zone_even_above_the_threshold() -> None:
    layers = [layer(f"layers.{i}", 95) for i in range(5)] + [layer("layers.5", 70)]  # 70 < 95 - 15
    [zone] = detect_conflict_zones(layers, positions(6))
    assert (zone.start_layer, zone.end_layer, zone.severity) == (5, 5, Severity.LOW)


def test_layers_within_the_outlier_margin_are_not_zones() -> None:
    layers = [layer(f"layers.{i}", 95) for i in range(5)] + [layer("layers.5", 81)]
    assert detect_conflict_zones(layers, positions(6)) == []


def test_embeddings_sit_before_block_0_and_join_its_zone() -> None:
    layers = [layer("embed", 30), layer("layers.0", 30), layer("layers.1", 90), layer("norm", 90)]
    [zone] = detect_conflict_zones(layers, positions(2))
    assert (zone.start_layer, zone.end_layer, zone.layer_names) == (-1, 0, ["embed", "layers.0"])


def test_a_zone_whose_components_all_look_fine_still_names_its_biggest_loss() -> None:
    mild = {"direction": 0.9, "distance": 0.95}  # losses 0.1 and 0.05: under the 0.15 bar
    [zone] = detect_conflict_zones([layer("layers.0", 40, mild), layer("layers.1", 90)], positions(2))
    assert zone.driving_metrics == ["direction"]
    assert CATALOGUE["direction"].advice in zone.recommendation


def test_no_layers_no_zones() -> None:
    assert detect_conflict_zones([], {}) == []


def test_a_zone_over_every_layer_says_the_whole_model() -> None:
    low = {"direction": 0.1, "distance": 0.1}
    names = ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    [zone] = detect_conflict_zones([layer(n, 10, low) for n in names], positions(2))
    assert zone.recommendation.startswith("the whole model (score 10): ")


def test_opposed_task_vectors_get_the_keep_one_advice_never_ties() -> None:
    conflict = {"direction": 1.0, "alignment": 0.0, "sign_agreement": 0.0, "interference": 0.0}
    opposed = layer("layers.1", 30, conflict).model_copy(update={"metrics": {"task_cosine": -1.0}})
    [zone] = detect_conflict_zones([layer("layers.0", 90), opposed, layer("layers.2", 90)], positions(3))
    assert "sign_agreement" in zone.driving_metrics
    assert zone.recommendation == f"layers.1 (score 30): {CATALOGUE['alignment'].advice}."
    assert "ties" not in zone.recommendation
