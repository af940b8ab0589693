"""The decision, said once: `merge_advised` (yes / with_care / no) and a one-sentence `answer` a model can quote,
derived from the verdict, the findings and the recommended strategy.

The headline MCI is set here (`headline`), once the strategy is known: for two models with predictions, 100 x
the predicted retention of the recommended method (no strategy, e.g. the same checkpoint twice: of the best
predicted method the comparison allows), with the verdict thresholds of analysis/score.py and a confidence from
the prediction's interval and the evidence (analysis/predict.py: `predicted_confidence`). A pair outside the
fitted range (a feature over 3 standard deviations from the fit's pairs) gets the lower of that and the composite:
there the prediction extrapolates, and the composite still reads the weights. Three or more models,
no predictions (metrics not measured), or a recommendation to keep one model (no shared origin, fine-tunes that
undo each other: the fit saw no such pair): the weight-space composite the engine computed, kept in every case as
`mci.composite` (the per-layer scores and conflict zones use it); a note says which one the answer used. Models
without a finite weight get no score.

Before deciding, the findings no metric shows are added: the same checkpoint given twice, a model that is also
the base, a model whose every value is NaN or Inf. Conflict-zone advice is then made to agree with the decision:
where merging is not advised, no zone suggests a merge method.
"""

from __future__ import annotations

import os
from itertools import combinations

from ..analysis.predict import capped_score, drivers, extrapolated, predicted_confidence, predicted_mci
from ..analysis.score import verdict_for
from ..models import (
    MCI,
    CompareResult,
    ConflictZone,
    Finding,
    FindingLevel,
    MergeAdvice,
    MergeMethod,
    ModelInfo,
    PairScore,
    Severity,
    Verdict,
)
from .recommend import candidates, recommend_strategy

SAME_CHECKPOINT = "same_checkpoint"
MODEL_IS_BASE = "model_is_base"
NO_FINITE_WEIGHTS = "no_finite_weights"
BLOCKING = (SAME_CHECKPOINT, MODEL_IS_BASE, NO_FINITE_WEIGHTS)
IDENTICAL_L2 = 1e-12  # a pair whose every layer is this close holds the same weights


def advise(result: CompareResult) -> CompareResult:
    """`result` with the identity findings, its strategy (when one makes sense) and the decision.

    `result` may be an unvalidated draft (`CompareResult.model_construct`): each step makes a new draft, so a
    comparison's result is still validated once, by the engine."""
    findings = [*result.findings, *_new_findings(result)]
    result = result.drafted(findings=findings)
    if any(f.code == NO_FINITE_WEIGHTS for f in findings):
        result = _unscored(result)
    blocked = any(f.code in BLOCKING for f in findings)
    if not blocked and result.mci.score is not None and result.strategy is None:
        result = result.drafted(strategy=recommend_strategy(result))
    if blocked and result.strategy is not None:
        result = result.drafted(strategy=None)
    result = headline(result)
    advised, answer = decide(result)
    keep_one = result.mci.verdict is Verdict.INCOMPATIBLE or (
        result.strategy is not None and result.strategy.method is MergeMethod.PASSTHROUGH
    )
    zones = [_keep_one(z) for z in result.conflict_zones] if keep_one else result.conflict_zones
    names = {m.label: m.source for m in [*result.models, *([result.base] if result.base else [])]}
    return result.drafted(merge_advised=advised, answer=answer, conflict_zones=zones, names=names)


def headline(result: CompareResult) -> CompareResult:
    """`result` with its MCI in predicted outcomes where it can be (the module docstring), and a note saying
    which score the answer uses."""
    mci = result.mci
    if mci.score is None:
        return result
    composite = mci.composite if mci.composite is not None else mci.score
    allowed = candidates(result)
    strategy = result.strategy
    why = None
    if strategy is not None and strategy.method is MergeMethod.PASSTHROUGH:
        why = "keep one model: no fitted pair covers it"
    elif len(result.models) >= 3:
        why = "three or more models: predictions cover pairs"
    elif not allowed:
        why = "no predictions for this pair: see the notes"
    if why is not None:
        return result.drafted(mci=_with(mci, method=None, composite=composite), notes=[
            *result.notes, f"the MCI is the weight-space composite ({why})"])
    best = predicted_mci(allowed)  # no strategy (the same checkpoint twice, ...): the best predicted method
    assert best is not None
    method = strategy.method.value if strategy is not None and strategy.method.value in allowed else best[1]
    predicted = allowed[method]
    score = round(100 * predicted.retention, 2)
    outside = extrapolated(result)
    confidence = predicted_confidence(predicted, mci.confidence, outside is not None)
    capped = capped_score(score, composite, outside is not None) < score
    reasons = [
        f"100 x the predicted retention of {method}: {predicted.retention:.2f} of each model's accuracy "
        f"(80% interval {predicted.low:.2f}-{predicted.high:.2f})"
        + (f", capped at the weight-space composite {composite:.1f}: the pair lies outside the fitted range, where "
           "the prediction extrapolates and the composite reads these weights themselves" if capped else ""),
        f"against the fit's average pair, {drivers(predicted, 2, meanings=False)}",
        f"confidence {confidence}: 80% interval {100 * (predicted.high - predicted.low):.0f} points wide, "
        f"{'task-vector evidence from the base' if predicted.used_base else 'weight-space evidence alone (no base)'}"
        + (f", outside the fitted range ({outside[0]} {outside[1]:+.1f} sd)" if outside else ""),
        *mci.reasons,
    ]
    score = capped_score(score, composite, outside is not None)
    verdict = verdict_for(score)
    pairwise = [p.model_copy(update={"score": score, "verdict": verdict}) for p in result.pairwise]
    chosen = f"{method}, the {'recommended' if strategy is not None else 'best predicted'} method"
    note = (f"the MCI is the weight-space composite, under 100 x the predicted retention of {chosen}: the pair "
            "lies outside the fitted range" if capped else
            f"the MCI is 100 x the predicted retention of {chosen} (`composite`: the weight-space score the layers "
            "use)")
    return result.drafted(
        mci=_with(mci, score=score, verdict=verdict, confidence=confidence, reasons=reasons, method=method,
                  composite=composite),
        pairwise=pairwise, notes=[*result.notes, note],
    )


def _with(mci: MCI, **updates: object) -> MCI:
    return mci.model_copy(update=updates)


def decide(result: CompareResult) -> tuple[MergeAdvice, str]:
    """The decision and its sentence."""
    mci, strategy = result.mci, result.strategy
    blocking = [f for f in result.findings if f.code in (SAME_CHECKPOINT, MODEL_IS_BASE)]
    if blocking and mci.score is not None:
        first = blocking[0]
        return MergeAdvice.NO, f"No: {first.message}" + (f"; {first.fix}" if first.fix else "") + "."
    if mci.score is None:
        why = mci.reasons[0] if mci.reasons else "no tensors could be compared"
        return MergeAdvice.NO, f"No: these models cannot be merged tensor by tensor ({why})."
    score = f"MCI {mci.score:.0f}/100, {mci.verdict.value.replace('_', ' ')}"
    if strategy is not None and strategy.method is MergeMethod.PASSTHROUGH:
        return MergeAdvice.NO, f"No ({score}): {_rule_text(strategy.rationale[0])}."
    if mci.verdict is Verdict.INCOMPATIBLE:
        return MergeAdvice.NO, f"No ({score}): {mci.reasons[0] if mci.reasons else 'the layers disagree'}."
    method = f"merge with {strategy.method.value}" if strategy is not None else "merge"
    if mci.verdict is Verdict.RISKY:
        weakest = mci.reasons[0] if mci.reasons else "some layers conflict"
        return MergeAdvice.WITH_CARE, (f"With care ({score}): {method} and evaluate the merged model before "
                                       f"use; {weakest}.")
    severe = [z for z in result.conflict_zones
              if z.severity in (Severity.HIGH, Severity.CRITICAL) or "alignment" in z.driving_metrics]
    if severe:
        where = ", ".join(dict.fromkeys(name for z in severe for name in z.layer_names))
        return MergeAdvice.WITH_CARE, (f"With care ({score}): {method}, but {where} conflict "
                                       f"({severe[0].model_a} + {severe[0].model_b}); see get_conflict_zones "
                                       "and evaluate the merged model.")
    zones = len(result.conflict_zones)
    caveat = f"; mind {zones} mild conflict zone{'s' if zones != 1 else ''}" if zones else ""
    return MergeAdvice.YES, f"Yes ({score}): {method}{caveat}; suggest_strategy gives the mergekit YAML."


def _rule_text(line: str) -> str:
    """'rule 2: task-vector cosine ...' -> 'task-vector cosine ...'."""
    head, sep, rest = line.partition(": ")
    return rest if sep and head.startswith("rule ") else line


def _keep_one(zone: ConflictZone) -> ConflictZone:
    head = zone.recommendation.split(": ", 1)[0]
    return zone.model_copy(update={
        "recommendation": f"{head}: no merge is advised for these models, so keep one model's layers here."
    })


def _new_findings(result: CompareResult) -> list[Finding]:
    found: list[Finding] = []
    for a, b in combinations(result.models, 2):
        if _same_files(a, b) or _identical_weights(result, a, b):
            found.append(Finding(
                level=FindingLevel.WARNING, code=SAME_CHECKPOINT,
                message=f"{a.label} and {b.label} are the same checkpoint ({a.source}), so there is nothing to "
                        "merge",
                fix="pass two different fine-tunes",
            ))
    if result.base is not None:
        for m in result.models:
            if _same_files(m, result.base):
                found.append(Finding(
                    level=FindingLevel.WARNING, code=MODEL_IS_BASE,
                    message=f"{m.label} ({m.source}) is the base model itself: merging a fine-tune with its own "
                            "base only dilutes the fine-tune",
                    fix="give the base only as base_model and compare the fine-tunes made from it",
                ))
    empty = [m.label for m in result.models if m.n_params and m.nonfinite_values >= m.n_params]
    if empty:
        found.append(Finding(
            level=FindingLevel.ERROR, code=NO_FINITE_WEIGHTS,
            message=f"{', '.join(empty)} hold{'s' if len(empty) == 1 else ''} no finite weight (every value is "
                    "NaN or Inf), so there is nothing to compare or merge",
            fix="re-export the checkpoint from a healthy copy",
        ))
    return found


def _same_files(a: ModelInfo, b: ModelInfo) -> bool:
    try:
        return a.resolved == b.resolved or os.path.samefile(a.resolved, b.resolved)
    except OSError:
        return False


def _identical_weights(result: CompareResult, a: ModelInfo, b: ModelInfo) -> bool:
    """Same tensors, same sizes, and every compared layer at distance 0 (only shared rows are compared when the
    vocabularies differ, hence the sizes)."""
    if (a.n_tensors, a.n_params) != (b.n_tensors, b.n_params):
        return False
    layers = [lm for lm in result.layer_metrics if (lm.model_a, lm.model_b) == (a.label, b.label)]
    return bool(layers) and all(lm.metrics.get("l2_distance", 1.0) <= IDENTICAL_L2 for lm in layers)


def _unscored(result: CompareResult) -> CompareResult:
    reason = next(f.message for f in result.findings if f.code == NO_FINITE_WEIGHTS)
    empty = {m.label for m in result.models if m.n_params and m.nonfinite_values >= m.n_params}
    mci = result.mci.model_copy(update={
        "score": None, "verdict": Verdict.INCOMPATIBLE, "components": {}, "reasons": [reason],
    })
    pairwise = [
        PairScore(model_a=p.model_a, model_b=p.model_b, score=None, verdict=Verdict.INCOMPATIBLE)
        if {p.model_a, p.model_b} & empty else p
        for p in result.pairwise
    ]
    return result.drafted(mci=mci, pairwise=pairwise, conflict_zones=[], strategy=None, predictions={})
