from __future__ import annotations

import math
from dataclasses import replace

import pytest

from fixtures.checkpoints import Family
from mergelens_mcp import compare_models
from mergelens_mcp.analysis.predict import (
    FEATURES,
    MethodModel,
    Motion,
    Predictor,
    best_method,
    load_predictor,
    outside_fit,
    pair_features,
    raw_distance,
)
from mergelens_mcp.models import MethodPrediction

SIX = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"}


def average_pair(*models: MethodModel) -> dict[str, float]:
    """The fit's average pair: every feature of these models at its fitted mean."""
    return {f: m for model in models for f, m in zip(model.features, model.mean, strict=True)}


# features that are the log of a norm: scaling every task vector by e^d shifts each by d (moved_product by 2d)
LOG_NORMS = {"moved_sum": 1, "moved_product": 2, "moved_far": 1, "moved_near": 1, "first_moved_sum": 1,
             "first_moved_far": 1, "whole_averaging_gap": 1, "whole_summed_energy": 1, "first_far": 1,
             "first_near": 1, "far_drift": 1, "near_drift": 1, "drift": 1, "averaging_gap": 1,
             "first_averaging_gap": 1, "summed_energy": 1, "first_summed_energy": 1, "sign_energy": 1}
# features that scaling every task vector leaves as they are (cosines, shares, ratios)
SCALE_FREE = {"task_cosine", "conflict", "sign_conflict_top", "mass_fraction", "balance", "averaging_shrink",
              "whole_averaging_shrink"}


def test_the_shipped_coefficients_load_with_their_provenance() -> None:
    p = load_predictor()
    assert set(p.with_base) == SIX and set(p.without_base) == SIX
    for key in ("settings", "fit_commit", "results_commit", "date", "n_pairs", "scope"):
        assert p.provenance[key], key
    assert p.provenance["n_pairs"] >= 98
    for model in (*p.with_base.values(), *p.without_base.values()):
        assert set(model.features) <= set(FEATURES)
        assert all(s > 0 for s in model.scale)
        assert model.residual_low <= 0 <= model.residual_high


@pytest.mark.parametrize("shift", [-10.0, -2.0, 0.0, 2.0, 10.0])
def test_every_prediction_is_in_0_1_with_low_le_retention_le_high(shift: float) -> None:
    p = load_predictor()
    for with_base, models in ((True, p.with_base), (False, p.without_base)):
        for model in models.values():
            x = {f: m + shift * s for f, m, s in zip(model.features, model.mean, model.scale, strict=True)}
            for pred in p.predict(x, with_base=with_base).values():
                assert 0.0 <= pred.low <= pred.retention <= pred.high <= 1.0


def test_fine_tunes_that_moved_further_are_predicted_to_merge_worse_with_every_method() -> None:
    p = load_predictor()
    for method, model in p.with_base.items():
        assert set(model.features) <= set(LOG_NORMS) | SCALE_FREE, f"{method}: classify the new feature above"
        assert set(model.features) & set(LOG_NORMS), method  # it sees how far the models moved
        x = average_pair(model)
        # every task vector scaled by e^d: the log norms shift, the cosines and shares stay
        retentions = [p.predict(x | {f: v + LOG_NORMS[f] * d for f, v in x.items() if f in LOG_NORMS})[method].retention
                      for d in (-1.0, -0.5, 0.0, 0.5, 1.0)]
        assert retentions == sorted(retentions, reverse=True), method
        assert retentions[0] > retentions[-1], method


def test_without_a_base_the_intervals_are_wider() -> None:
    p = load_predictor()
    for method in SIX:
        with_base, without = p.with_base[method], p.without_base[method]
        assert (without.residual_high - without.residual_low) > (with_base.residual_high - with_base.residual_low)


def test_a_model_merged_with_itself_is_predicted_to_keep_everything_by_linear_and_slerp() -> None:
    p = load_predictor()
    x = average_pair(*p.with_base.values())
    near = p.predict(x, distance=0.0)
    assert near["linear"].retention == 1.0 and near["slerp"].retention == 1.0
    assert near["linear"].low == 1.0
    halfway = p.predict(x, distance=p.nearest_distance / 2)["linear"].retention
    far = p.predict(x, distance=p.nearest_distance)["linear"].retention
    assert far < halfway < 1.0
    assert halfway == pytest.approx(1 - (1 - far) / 2, abs=1e-3)


def test_contributions_add_up_to_the_prediction_before_clipping() -> None:
    p = load_predictor()
    model = p.with_base["ties"]
    x = {f: m + 0.3 * s for f, m, s in zip(model.features, model.mean, model.scale, strict=True)}
    pred = p.predict(x)["ties"]
    raw = model.intercept + sum(pred.contributions.values())
    assert pred.retention == pytest.approx(min(1.0, max(0.0, raw)), abs=1e-3)
    assert list(pred.contributions) == sorted(pred.contributions, key=lambda k: -abs(pred.contributions[k]))


def test_pair_features_weight_layers_by_parameters_and_recover_each_fine_tunes_drift() -> None:
    # layer 1: drift 0.1, ratio 1 -> both moved 0.1; layer 2 (3x the parameters): drift 0.2, ratio 0.5
    layers = [("layers.0", 100, {"task_drift": 0.1, "magnitude_ratio": 1.0, "l2_distance": 0.1}),
              ("layers.1", 300, {"task_drift": 0.2, "magnitude_ratio": 0.5, "l2_distance": 0.3})]
    f = pair_features(layers)
    far = (0.1 + 3 * (2 * 0.2 / 1.5)) / 4
    near = (0.1 + 3 * (2 * 0.2 * 0.5 / 1.5)) / 4
    assert f["far_drift"] == pytest.approx(math.log(far))
    assert f["near_drift"] == pytest.approx(math.log(near))
    assert f["drift"] == pytest.approx(math.log(0.175))
    assert f["first_far"] == pytest.approx(math.log(0.1)) and f["first_near"] == pytest.approx(math.log(0.1))
    assert raw_distance(layers) == pytest.approx(0.25)
    assert "task_cosine" not in f


def test_merge_mechanism_features_follow_from_the_norms_and_the_task_cosine() -> None:
    # both fine-tunes moved 0.1 of the base; cosine 0.5: |t_a - t_b| / 2 = 0.1 * sqrt(2 - 1) / 2 = 0.05
    same_way = [("layers.0", 10, {"task_drift": 0.1, "magnitude_ratio": 1.0, "task_cosine": 0.5,
                                  "sign_disagreement_top": 0.25})]
    f = pair_features(same_way)
    assert f["averaging_gap"] == pytest.approx(math.log(0.05))
    assert f["first_averaging_gap"] == pytest.approx(math.log(0.05))
    assert f["summed_energy"] == pytest.approx(math.log(0.1 * math.sqrt(2)))
    assert f["sign_energy"] == pytest.approx(math.log(0.1 * math.sqrt(2) * 0.25))
    assert f["averaging_shrink"] == pytest.approx(0.75)
    # opposed fine-tunes (base + d vs base - d): averaging takes all of each, and keeps none of it
    opposed = [("layers.0", 10, {"task_drift": 0.1, "magnitude_ratio": 1.0, "task_cosine": -1.0})]
    g = pair_features(opposed)
    assert g["averaging_gap"] == pytest.approx(math.log(0.1))
    assert g["averaging_shrink"] == pytest.approx(0.0)
    # identical fine-tunes: averaging takes nothing (down to the log floor)
    twins = [("layers.0", 10, {"task_drift": 0.1, "magnitude_ratio": 1.0, "task_cosine": 1.0})]
    assert pair_features(twins)["averaging_gap"] == pytest.approx(math.log(1e-6))


def test_best_method_prefers_the_simpler_one_within_the_tolerance() -> None:
    def pred(r: float) -> MethodPrediction:
        return MethodPrediction(retention=r, low=r, high=r, used_base=True)

    assert best_method({"ties": pred(0.70), "linear": pred(0.698), "slerp": pred(0.5)}) == "linear"
    assert best_method({"ties": pred(0.70), "linear": pred(0.60)}) == "ties"
    # two points apart is still a tie (TIE); three is not
    assert best_method({"ties": pred(0.70), "linear": pred(0.68)}) == "linear"
    assert best_method({"ties": pred(0.70), "linear": pred(0.67)}) == "ties"
    assert best_method({}) is None


def test_compare_with_a_base_carries_task_vector_predictions_for_every_method(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.finetune_b)], base=str(family.base))
    assert set(result.predictions) == SIX
    assert all(p.used_base for p in result.predictions.values())
    assert any("predicted retention" in n for n in result.notes)


def test_compare_without_a_base_says_its_predictions_rest_on_weight_space_evidence(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.finetune_b)])
    assert set(result.predictions) == SIX
    assert not any(p.used_base for p in result.predictions.values())
    assert any("weight-space evidence alone" in n for n in result.notes)


def test_identical_models_are_predicted_to_keep_everything_and_unrelated_ones_almost_nothing(
    family: Family
) -> None:
    same = compare_models([str(family.finetune_a), str(family.finetune_a)], base=str(family.base))
    assert same.predictions["linear"].retention == 1.0
    unrelated = compare_models([str(family.finetune_a), str(family.unrelated)])
    assert max(p.retention for p in unrelated.predictions.values()) < 0.35


def test_opposed_fine_tunes_are_predicted_to_merge_worse_by_averaging_than_compatible_ones(
    family: Family
) -> None:
    # base + d vs base - d: averaging cancels both task vectors: the averaging gap sees it, drift alone did not
    compatible = compare_models([str(family.finetune_a), str(family.finetune_b)], base=str(family.base))
    opposed = compare_models([str(family.finetune_a), str(family.opposed)], base=str(family.base))
    # (the fixtures moved far less than any fitted pair, so both clip to 1: the push is what differs)
    for method in ("linear", "slerp"):
        gap = [r.predictions[method].contributions["averaging_gap"] for r in (compatible, opposed)]
        assert gap[1] < gap[0] - 0.3, method
        assert opposed.predictions[method].low < compatible.predictions[method].low, method


def test_three_models_get_no_pair_predictions(family: Family) -> None:
    result = compare_models([str(family.finetune_a), str(family.finetune_b), str(family.base)])
    assert result.predictions == {}


def test_a_predictor_round_trips_through_its_dict() -> None:
    p = load_predictor()
    assert Predictor.from_dict(p.to_dict()) == p


def test_a_pair_far_outside_the_fitted_range_is_said_to_be_extrapolated(
    family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp.analysis import predict

    shipped = load_predictor()
    result = compare_models([str(family.finetune_a), str(family.finetune_b)], base=str(family.base))
    # a fit whose pairs spread ten times more: the fixture pair lies within 3 deviations of them
    wide = replace(shipped, with_base={m: replace(v, scale=tuple(s * 10 for s in v.scale))
                                       for m, v in shipped.with_base.items()})
    assert outside_fit(result, wide) is None
    # a fit whose pairs spread ten times less: the same pair is now far outside
    narrow = replace(shipped, with_base={m: replace(v, scale=tuple(s / 10 for s in v.scale))
                                         for m, v in shipped.with_base.items()})
    feature, sd = outside_fit(result, narrow)
    assert abs(sd) > 3 and any(feature in model.features for model in narrow.with_base.values())
    monkeypatch.setattr(predict, "load_predictor", lambda: narrow)
    noted = predict.with_predictions(result.model_copy(update={"predictions": {}}))
    assert any(f"outside the fitted range ({feature} {sd:+.1f} sd" in n for n in noted.notes)


def test_per_model_features_come_from_how_far_each_model_moved_and_need_both() -> None:
    layers = [("layers.0", 100, {"task_drift": 0.1, "magnitude_ratio": 1.0})]
    motion = Motion((0.2, 0.05), ({"layers.0": 0.1, "layers.1": 0.3, "embed": 0.5}, {"layers.0": 0.4, "embed": 0.0}),
                    cosine=0.5)
    f = pair_features(layers, motion)
    assert f["moved_sum"] == pytest.approx(math.log(0.25))
    assert f["moved_product"] == pytest.approx(math.log(0.2) + math.log(0.05))
    assert f["moved_far"] == pytest.approx(math.log(0.2)) and f["moved_near"] == pytest.approx(math.log(0.05))
    # the first decoder block: layers.0 of each model, whatever the others hold
    assert f["first_moved_sum"] == pytest.approx(math.log(0.5))
    assert f["first_moved_far"] == pytest.approx(math.log(0.4))
    swapped = Motion((0.05, 0.2), tuple(reversed(motion.by_layer)), cosine=0.5)  # type: ignore[arg-type]
    assert pair_features(layers, swapped) == pytest.approx(f)  # symmetric
    # over the whole models: |t_a - t_b| / 2 = sqrt(0.04 + 0.0025 - 2 * 0.5 * 0.01) / 2
    assert f["whole_averaging_gap"] == pytest.approx(math.log(math.sqrt(0.0325) / 2))
    assert f["whole_summed_energy"] == pytest.approx(math.log(math.sqrt(0.0425)))
    assert f["whole_averaging_shrink"] == pytest.approx(((1 + 0.5 * 0.25) / 2 + (1 + 0.5 * 4) / 2) / 2)
    without = pair_features(layers)
    assert not any(name.startswith(("moved", "first_moved", "whole_")) for name in without)
    assert "first_far" in without  # the layer features do not depend on them
    no_cosine = pair_features(layers, Motion(motion.moved, motion.by_layer))
    assert "moved_sum" in no_cosine and "whole_averaging_gap" not in no_cosine


def test_opposed_fine_tunes_move_equally_far_in_opposite_directions_and_averaging_takes_all_of_each(
    family: Family,
) -> None:
    result = compare_models([str(family.finetune_a), str(family.opposed)], base=str(family.base))
    a, b = result.models
    assert a.moved is not None and b.moved is not None
    assert a.moved == pytest.approx(b.moved, rel=0.02)  # base + d and base - d (stored in bfloat16)
    assert result.pairwise[0].task_cosine is not None and result.pairwise[0].task_cosine < -0.98
    f = pair_features([(lm.layer_name, lm.n_params, lm.metrics) for lm in result.layer_metrics],
                      Motion((a.moved, b.moved), (a.moved_by_layer, b.moved_by_layer), result.pairwise[0].task_cosine))
    assert f["whole_averaging_gap"] == pytest.approx(math.log(a.moved), abs=0.02)  # |t_a - t_b| / 2 = |t|
    twins = compare_models([str(family.finetune_a), str(family.finetune_a)], base=str(family.base))
    assert twins.pairwise[0].task_cosine == pytest.approx(1.0)


def test_methods_whose_features_were_not_measured_are_named_or_fall_back_to_weight_space(family: Family) -> None:
    from mergelens_mcp.analysis.predict import load_predictor, with_predictions

    result = compare_models([str(family.finetune_a), str(family.finetune_b)], base=str(family.base))
    assert not any("not predicted" in n for n in result.notes)  # every method, with the motion measured
    # no whole-model task cosine: the methods whose models read it are named, the others predicted
    pair = result.pairwise[0].model_copy(update={"task_cosine": None})
    partial = with_predictions(result.model_copy(update={"pairwise": [pair], "predictions": {}, "notes": []}))
    needs = sorted(m for m, model in load_predictor().with_base.items() if "whole_averaging_gap" in model.features)
    assert needs and partial.predictions and not set(needs) & set(partial.predictions)
    assert all(p.used_base for p in partial.predictions.values())
    note = next(n for n in partial.notes if n.startswith("predicted retention per method"))
    assert f"not predicted: {', '.join(needs)}" in note
    # no motion at all: every task-vector model lacks a feature, so the weight-space models answer, and say so
    unmoved = result.model_copy(update={
        "models": [m.model_copy(update={"moved": None}) for m in result.models], "predictions": {}, "notes": []})
    weights_only = with_predictions(unmoved)
    assert set(weights_only.predictions) == set(load_predictor().without_base)
    assert not any(p.used_base for p in weights_only.predictions.values())
    note = next(n for n in weights_only.notes if n.startswith("predicted retention per method"))
    assert "the task-vector features were not measured: weight-space evidence alone" in note
