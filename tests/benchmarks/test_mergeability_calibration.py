"""Leave-one-task-out evaluation of the MCI's constants: faithful recomputation, no leakage."""

import pytest

from benchmarks.mergeability.calibration import (
    Constants,
    current_constants,
    leave_one_task_out,
    recompute_mci,
    select,
)
from mergelens_mcp.analysis import score

LAYERS = [
    {"n_params": 4096, "metrics": {"cosine_similarity": 0.9, "l2_distance": 0.2, "spectral_overlap": 0.8,
                                   "task_cosine": 0.1, "sign_disagreement": 0.4, "task_drift": 0.3}},
    {"n_params": 64, "metrics": {"cosine_similarity": 0.99, "l2_distance": 0.01, "task_cosine": -0.5}},
]


def test_a_tuned_catalogue_changes_the_score_and_leaves_the_products_untouched():
    before = current_constants()
    at_product = recompute_mci(LAYERS)
    tuned = Constants(distance_scale=10.0, distance_weight=5.0, drift_scale=0.3, drift_weight=0.4)
    lenient = recompute_mci(LAYERS, tuned.catalogue())
    assert lenient > at_product
    assert current_constants() == before
    assert recompute_mci(LAYERS) == at_product
    assert (score.CATALOGUE["distance"].scale, score.CATALOGUE["distance"].weight) == (0.1, 0.8)
    assert (tuned.catalogue()["distance"].scale, tuned.catalogue()["distance"].weight) == (10.0, 5.0)


def test_the_products_constants_tuned_back_in_give_the_products_score():
    layers = [{"n_params": 4096 * (i + 1), "metrics": {**LAYERS[0]["metrics"], "l2_distance": 0.05 * i}}
              for i in range(4)]
    assert recompute_mci(layers, current_constants().catalogue()) == recompute_mci(layers)


def test_the_recomputed_mci_follows_the_products_formula_on_a_hand_layer():
    layer = [{"n_params": 100, "metrics": {"cosine_similarity": 0.5}}]
    # only `direction` is available: origin 0.5, no shape or task side: layer 0.5, MCI 100 x (0.6 + 0.4) x 0.5
    assert recompute_mci(layer) == pytest.approx(50.0)


def _pairs(tasks):
    out = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            out.append({"task_a": a, "task_b": b})
    return out


def test_selection_picks_the_point_whose_scores_rank_the_outcome_best():
    good, bad = Constants(1, 1, 1, 1), Constants(2, 2, 2, 2)
    scores = {good: [1.0, 2.0, 3.0, 4.0], bad: [4.0, 3.0, 2.0, 1.0]}
    assert select(scores, {"linear": [0.1, 0.2, 0.3, 0.4]}, range(4)) == good
    assert select(scores, {"linear": [0.4, 0.3, 0.2, 0.1]}, range(4)) == bad


def test_a_held_out_task_never_influences_the_choice_made_for_it():
    pairs = _pairs(["a", "b", "c", "d", "e"])
    y = [float(i) for i in range(len(pairs))]
    honest = Constants(1, 1, 1, 1)
    # `leaky` ranks perfectly only on the pairs with task "a", and backwards elsewhere
    leaky = Constants(2, 2, 2, 2)
    scores = {
        honest: [v + (0.5 if i % 2 else -0.5) for i, v in enumerate(y)],
        leaky: [v if "a" in (p["task_a"], p["task_b"]) else -v for v, p in zip(y, pairs, strict=True)],
    }
    result = leave_one_task_out(pairs, {"linear": y}, scores)
    assert result["folds"]["a"]["chosen"] == honest.label()
    assert result["in_sample_choice"] == honest.label()
