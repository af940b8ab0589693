"""The one MCI component catalogue: every consumer knows every entry, and `representation` is complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.checkpoints import Family
from mergelens_mcp.analysis import engine
from mergelens_mcp.analysis.explain import explain
from mergelens_mcp.analysis.metrics import REGISTRY
from mergelens_mcp.analysis.score import CATALOGUE, Component
from mergelens_mcp.analysis.zones import detect_conflict_zones
from mergelens_mcp.models import LayerMetrics
from mergelens_mcp.report import heatmap_figure
from mergelens_mcp.service import compare
from mergelens_mcp.tools.views import Comparison, LayerBrief, weak_components

ENTRIES = [pytest.param(c, id=c.name) for c in CATALOGUE]
ACTIVATION_METRICS = {"activation_cka"}  # measured by analysis/activations.py, not by the metric registry
POSITIONS = {"layers.0": 0, "layers.1": 1, "layers.2": 2}


def weak_layer(c: Component, name: str = "layers.1", score: float = 30.0) -> LayerMetrics:
    """A layer in which `c` alone is weak (0.1) and every other component is ideal."""
    components = {other.name: 1.0 for other in CATALOGUE} | {c.name: 0.1}
    return LayerMetrics(
        model_a="model_a", model_b="model_b", layer_name=name, layer_index=int(name.split(".")[1]), kind="block",
        n_params=100, tensor_names=[f"model.{name}.weight"], metrics=dict.fromkeys(c.metrics, 0.5),
        components=components, score=score,
    )


def test_the_catalogue_holds_eleven_components_in_scoring_order_with_todays_weights() -> None:
    assert [(c.name, c.group, c.weight) for c in CATALOGUE] == [
        ("direction", "origin", 0.50), ("distance", "origin", 0.80), ("subspace", "origin", 0.30),
        ("representation", "origin", 0.40), ("rank", "shape", 0.60), ("distribution", "shape", 0.40),
        ("alignment", "task", 0.25), ("sign_agreement", "task", 0.20), ("interference", "task", 0.25),
        ("balance", "task", 0.10), ("drift", "task", 0.40),
    ]


@pytest.mark.parametrize("c", ENTRIES)
def test_every_entry_reads_known_metrics_and_has_every_word_its_consumers_show(c: Component) -> None:
    assert set(c.metrics) <= set(REGISTRY) | ACTIVATION_METRICS
    for field in ("label", "description", "meaning", "matters", "advice", "formula"):
        assert getattr(c, field).strip(), f"{c.name} has no {field}"
    assert CATALOGUE.feeding(c.metrics[0]) is c  # explanations attribute its first metric to it


@pytest.mark.parametrize("c", ENTRIES)
def test_explain_reads_every_entrys_meaning_why_and_advice(c: Component) -> None:
    lm = weak_layer(c)
    found = explain(lm)
    reading = next(r for r in found.readings if r.name == c.metrics[0])
    assert reading.component == c.name
    assert reading.assessment == "bad" and reading.component_score == pytest.approx(0.1)
    assert c.matters in reading.why and c.description in reading.why
    assert found.advice == [f"{c.name}: {c.advice}"]
    assert c.description in found.summary


@pytest.mark.parametrize("c", ENTRIES)
def test_a_zone_driven_by_any_entry_gives_its_advice(c: Component) -> None:
    good = {other.name: 1.0 for other in CATALOGUE}
    layers = [
        weak_layer(c, "layers.0", 100.0).model_copy(update={"components": good}),
        weak_layer(c, "layers.1", 30.0),
        weak_layer(c, "layers.2", 100.0).model_copy(update={"components": good}),
    ]
    [zone] = detect_conflict_zones(layers, POSITIONS)
    assert zone.driving_metrics == [c.name]
    assert c.advice in zone.recommendation


@pytest.mark.parametrize("c", ENTRIES)
def test_the_report_labels_every_entry_and_shows_its_metrics(c: Component) -> None:
    heat = heatmap_figure([weak_layer(c)]).data[0]
    row = list(heat.y).index(c.label)
    assert heat.z[row][0] == pytest.approx(0.1)
    assert all(f"{m} = 0.5000" in heat.customdata[row][0] for m in c.metrics)


@pytest.mark.parametrize("c", ENTRIES)
def test_the_mcp_views_and_the_mci_reasons_know_every_entry(c: Component) -> None:
    schema = Comparison.model_json_schema()["properties"]["components"]["description"]
    assert f"{c.name}: {c.description}" in schema
    assert weak_components(weak_layer(c).components) == [c.name]
    assert "0.55" in LayerBrief.model_json_schema()["properties"]["weak_components"]["description"]
    means = {other.name: 1.0 for other in CATALOGUE} | {c.name: 0.1}
    assert engine._component_reasons(means)[0] == f"weakest: {c.description} at 0.10 (1 = ideal)"


def test_a_tuned_copy_changes_the_score_and_leaves_the_catalogue_as_it_was() -> None:
    from mergelens_mcp.analysis.score import components, layer_score

    metrics = {"cosine_similarity": 0.9, "l2_distance": 0.2}
    tuned = CATALOGUE.replace("distance", scale=1.0)
    assert components(metrics, tuned)["distance"] == pytest.approx(0.8187, abs=1e-4)  # exp(-0.2 / 1)
    assert components(metrics)["distance"] == pytest.approx(0.1353, abs=1e-4)  # exp(-0.2 / 0.1)
    heavier = CATALOGUE.replace("direction", weight=100.0)
    parts = {"direction": 1.0, "distance": 0.0}
    assert layer_score(parts, heavier) == pytest.approx(100 / 100.8)
    assert layer_score(parts) == pytest.approx(0.5 / 1.3)
    assert CATALOGUE["distance"].scale == 0.1 and CATALOGUE["direction"].weight == 0.5
    with pytest.raises(KeyError, match="not an MCI component"):
        CATALOGUE.replace("nonsense", weight=1.0)
    with pytest.raises(ValueError, match="positive weight"):
        CATALOGUE.replace("balance", weight=0.0)


def test_a_component_declared_after_the_catalogue_is_refused() -> None:
    from mergelens_mcp.analysis.score import TASK, component

    def late(task_cosine: float) -> float:
        return task_cosine

    with pytest.raises(ValueError, match="before CATALOGUE"):
        component("late", group=TASK, metrics=("task_cosine",), weight=1.0, label="l", description="d",
                  meaning="m", matters="w", advice="a")(late)


def _probe_with_different_behaviour_in(layer: int, n_layers: int) -> object:
    """A probe whose first model and second model agree on every hidden state but `layer`'s."""
    g = torch.Generator().manual_seed(7)
    shared = [torch.randn(40, 8, generator=g) for _ in range(n_layers + 1)]
    other = [t.clone() for t in shared]
    other[layer + 1] = torch.randn(40, 8, generator=g)
    calls = iter([shared, other])
    return lambda folder: next(calls)


def test_a_layer_that_behaves_differently_is_a_zone_driven_by_representation_and_explained(
    family: Family,
) -> None:
    models = [str(family.finetune_a), str(family.finetune_a)]
    result = compare(models, activations=_probe_with_different_behaviour_in(2, 4))  # type: ignore[arg-type]
    layer2 = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.2")
    assert layer2.metrics["activation_cka"] < 0.5 and layer2.components["representation"] < 0.5
    [zone] = result.conflict_zones
    assert zone.layer_names == ["layers.2"] and zone.driving_metrics == ["representation"]
    assert CATALOGUE["representation"].advice in zone.recommendation
    reading = next(r for r in explain(layer2).readings if r.name == "activation_cka")
    assert reading.component == "representation" and reading.assessment != "informational"
    assert reading.meaning == CATALOGUE["representation"].meaning


def test_a_metric_that_cannot_be_computed_is_absent_with_its_reason(
    family: Family, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mergelens_mcp.analysis.metrics import Metric

    # a metric that breaks (NaN) on the 1-D norm weights and gives 0.5 on every matrix
    broken = Metric("broken", lambda a, b: float("nan") if a.tensor.dim() == 1 else 0.5, (0.0, 1.0), None,
                    False, False, "A metric that fails on vectors.")
    monkeypatch.setitem(REGISTRY, "broken", broken)
    result = compare([str(family.finetune_a), str(family.finetune_b)])
    norm = next(lm for lm in result.layer_metrics if lm.layer_name == "norm")
    assert "broken" not in norm.metrics
    assert norm.unavailable == {"broken": "its computation gave NaN or Inf on 1 of the layer's 1 tensors; left out"}
    block = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.0")
    assert block.metrics["broken"] == 0.5  # the two norms add nothing; the 7 matrices give 0.5
    assert block.unavailable["broken"].startswith("its computation gave NaN or Inf on 2 of the layer's 9 tensors")
    assert "cosine_similarity" in norm.metrics and "cosine_similarity" not in norm.unavailable
    assert any(note.startswith("broken could not be computed on some tensors of 5 layer(s)") for note in result.notes)
