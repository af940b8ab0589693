"""Which mergekit method to use, with which settings, from a comparison's measurements.

Two models with predictions (`CompareResult.predictions`, analysis/predict.py): after the two guards below
(rules 1 and 2: no shared origin, or fine-tunes that undo each other: keep one model), the method is the one
with the best predicted retention among those this comparison allows (no method needing a base without one),
ties within `predict.TIE` going to the simpler method (`best_method`); the runner-up is the best of the others.
The predictor does not compare parameter settings (its features do not depend on them), so the parameters
still come from the rules below, and the rationale says so. Three or more models, or no predictions (metrics
not measured): the rule table.

The rules, in order; the first that matches picks the method (metrics are parameter-weighted means over
layers and pairs unless marked "min"):

| # | when                                                      | method                 | runner-up     |
|---|-----------------------------------------------------------|------------------------|---------------|
| 1 | cosine_similarity < 0.3 (no shared origin; where measured)| passthrough (keep one) | linear        |
| 2 | base, task_cosine < -0.5 (the fine-tunes undo each other) | passthrough (keep one) | none          |
| 3 | base, 3+ models, task_cosine > 0.2, sign conflict <= 0.3  | model_stock            | ties          |
| 4 | base, sign_disagreement > 0.55 in a block (max) or overall| ties                   | dare_ties     |
|   | (more conflict than independent task vectors show)        |                        |               |
| 5 | min cosine_similarity >= 0.95 (high cosine everywhere)    | slerp; linear for 3+   | linear; slerp |
|   |                                                           | or mostly degenerate   |               |
| 6 | spectral_overlap < 0.5                                    | linear, small weight   | slerp         |
| 7 | otherwise, with a base                                    | linear                 | dare_ties if  |
|   |                                                           |                        | concentrated, |
|   |                                                           |                        | else ties     |
| 8 | otherwise                                                 | slerp (2) / linear (3+)| linear        |

Evidence behind rules 4 and 7 (benchmarks/mergeability/, 112 + 98 pairs of fine-tunes on 8 tasks): task
vectors of unrelated fine-tunes disagree in sign on about half of their shared coordinates (40-51% on every
benchmark pair), so the "about 30%" threshold of common advice fired on every pair and recommended TIES, which
was within 2 points of the best merge on only 44% / 31% of pairs. Plain averaging was within 2 points of the best
on 70% / 74%, task arithmetic (lambda 1, which overshoots) on 26%, DARE on 8-9% (random dropping lost the most on
these small models). So sign conflict counts only above chance (> 0.55, as in opposed layers), and a
concentrated task-vector spectrum makes DARE the runner-up rather than the choice.

No method that needs a base is ever chosen without one (rules 2-4 need `base`).

Parameters come from the measurements:
- `density` (TIES family) = task_mass_fraction: the share of coordinates holding 90% of the task vectors'
  magnitude mass, rounded to 0.05 and clamped to [0.1, 0.9]; random dropping (DARE) keeps at least 0.3.
- `weight`: equal, summing to 1; with low spectral overlap (rule 7) the other models share
  w = clamp(overlap / 2, 0.1, 0.4) and the first model keeps the rest.
- SLERP `t`: 0.5 towards the second model, scaled by the second model's share of the balance when the task
  vectors differ in size (magnitude_ratio).
- Conflict zones: in the zone's layers the later model of the pair gets weight 0 (SLERP: t = 0), as a
  per-layer gradient with one value per layer, so those layers come from the first model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import yaml

from ..analysis.predict import TIE, best_method, capped_score, extrapolated
from ..analysis.score import verdict_for
from ..analysis.zones import OPPOSED_TASK_COSINE
from ..errors import IncompatibleModelsError
from ..models import CompareResult, FindingLevel, LayerMetrics, MergeMethod, MethodPrediction, Strategy
from .adapters import model_reference, peft_snippet
from .schema import METHODS, SLERP_LINEAR_FALLBACK, MergeConfig

NO_ORIGIN_COSINE = 0.3
STOCK_TASK_COSINE = 0.2
SIGN_CONFLICT = 0.30  # model_stock's ceiling
SIGN_CONFLICT_ABOVE_CHANCE = 0.55
CONCENTRATED_ENERGY = 0.5
HIGH_COSINE = 0.95
LOW_OVERLAP = 0.5
MIN_DENSITY, MAX_DENSITY, MIN_DARE_DENSITY = 0.1, 0.9, 0.3
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}


@dataclass(frozen=True)
class Profile:
    """The measurements the rules read."""

    n_models: int
    has_base: bool
    cosine: float | None  # None: not measured (LoRA adapters compared without the base)
    min_cosine: float
    overlap: float | None
    task_cosine: float | None
    sign: float | None
    max_block_sign: float | None
    energy: float | None
    mass_fraction: float | None
    balance: float | None
    n_blocks: int
    degenerate_layers: list[str]
    vocab_mismatch: bool


def _mean(layers: list[LayerMetrics], name: str) -> float | None:
    pairs = [(lm.metrics[name], lm.n_params) for lm in layers if name in lm.metrics]
    total = sum(n for _, n in pairs)
    return None if not pairs or total == 0 else sum(v * n for v, n in pairs) / total


def profile(result: CompareResult) -> Profile:
    layers = result.layer_metrics
    cosines = [lm.metrics["cosine_similarity"] for lm in layers if "cosine_similarity" in lm.metrics]
    indices = [lm.layer_index for lm in layers if lm.layer_index is not None]
    degenerate = list(dict.fromkeys(
        lm.layer_name for lm in layers
        if abs(lm.metrics.get("cosine_similarity", 0.0)) > SLERP_LINEAR_FALLBACK
    ))
    return Profile(
        n_models=len(result.models),
        has_base=result.base is not None and result.mci.used_base,
        cosine=_mean(layers, "cosine_similarity"),
        min_cosine=min(cosines) if cosines else 0.0,
        overlap=_mean(layers, "spectral_overlap"),
        task_cosine=_mean(layers, "task_cosine"),
        sign=_mean(layers, "sign_disagreement"),
        max_block_sign=max(
            (lm.metrics["sign_disagreement"] for lm in layers
             if lm.kind == "block" and "sign_disagreement" in lm.metrics),
            default=None,
        ),
        energy=_mean(layers, "task_vector_energy"),
        mass_fraction=_mean(layers, "task_mass_fraction"),
        balance=_mean(layers, "magnitude_ratio"),
        n_blocks=max(indices) + 1 if indices else 0,
        degenerate_layers=degenerate,
        vocab_mismatch=any(f.code == "vocab_mismatch" for f in result.findings),
    )


@dataclass
class Choice:
    method: MergeMethod
    runner_up: MergeMethod | None
    rule: str
    margin: float  # 0..1: how clearly the deciding measurement passed its threshold
    predicted: bool = False  # chosen by the predictions (margin: the lead over the runner-up)


def choose(p: Profile) -> Choice:
    """The rule table of the module docstring."""
    M = MergeMethod
    pair_alternative = M.SLERP if p.n_models == 2 else None
    sign = p.sign if p.sign is not None else 0.0
    task_cosine = p.task_cosine if p.task_cosine is not None else 0.0
    if p.cosine is not None and p.cosine < NO_ORIGIN_COSINE:
        return Choice(
            M.PASSTHROUGH, M.LINEAR,
            f"rule 1: mean weight cosine {p.cosine:.2f} < {NO_ORIGIN_COSINE}: the models share no origin, so "
            "averaging their weights gives noise; keep one model's layers",
            _margin(NO_ORIGIN_COSINE - p.cosine, NO_ORIGIN_COSINE),
        )
    if p.has_base and p.task_cosine is not None and task_cosine < OPPOSED_TASK_COSINE:
        return Choice(
            M.PASSTHROUGH, None,
            f"rule 2: task-vector cosine {task_cosine:.2f} < {OPPOSED_TASK_COSINE}: the fine-tunes undo each "
            "other, any merge cancels both; keep one",
            _margin(OPPOSED_TASK_COSINE - task_cosine, 0.5),
        )
    if p.has_base and p.n_models >= 3 and task_cosine > STOCK_TASK_COSINE and sign <= SIGN_CONFLICT:
        return Choice(
            M.MODEL_STOCK, M.TIES,
            f"rule 3: {p.n_models} fine-tunes of one base with aligned task vectors (cosine "
            f"{task_cosine:.2f}) and sign conflict {sign:.0%}: model_stock sets the interpolation weight "
            "from their geometry",
            _margin(task_cosine - STOCK_TASK_COSINE, 0.5),
        )
    worst_sign = max(sign, p.max_block_sign or 0.0)
    if p.has_base and worst_sign > SIGN_CONFLICT_ABOVE_CHANCE:
        return Choice(
            M.TIES, M.DARE_TIES,
            f"rule 4: sign disagreement {worst_sign:.0%} > {SIGN_CONFLICT_ABOVE_CHANCE:.0%} (more than unrelated "
            "task vectors show): TIES' trimming and sign election resolve conflicting coordinates",
            _margin(worst_sign - SIGN_CONFLICT_ABOVE_CHANCE, 0.3),
        )
    if p.min_cosine >= HIGH_COSINE:
        margin = _margin(p.min_cosine - HIGH_COSINE, 1 - HIGH_COSINE)
        close = f"rule 5: weight cosine >= {HIGH_COSINE} in every layer (lowest {p.min_cosine:.4f})"
        mostly_degenerate = p.n_blocks > 0 and len(p.degenerate_layers) > p.n_blocks / 2
        if p.n_models == 2 and not mostly_degenerate:
            return Choice(M.SLERP, M.LINEAR, f"{close}: the models are close; SLERP interpolates", margin)
        why = "3 or more models" if p.n_models >= 3 else "most layers have |cos| > 0.9995 (SLERP is linear)"
        return Choice(M.LINEAR, pair_alternative, f"{close} and {why}: a weighted average", margin)
    if p.overlap is not None and p.overlap < LOW_OVERLAP:
        return Choice(
            M.LINEAR, pair_alternative,
            f"rule 6: top singular subspaces overlap {p.overlap:.2f} < {LOW_OVERLAP}: averaging blurs both; "
            "a linear merge with a small weight on the other model(s)",
            _margin(LOW_OVERLAP - p.overlap, LOW_OVERLAP),
        )
    if p.has_base:
        concentrated = p.energy is not None and p.energy > CONCENTRATED_ENERGY
        runner_up = M.DARE_TIES if concentrated else M.TIES
        because = (f"; {p.energy:.0%} of the task vectors' energy lies in their top singular directions, so "
                   "DARE's dropping is the alternative" if concentrated else "")
        return Choice(M.LINEAR, runner_up, f"rule 7: a shared base, sign conflict at chance level ({sign:.0%}) "
                      "and no conflicting layers: a plain average kept most of both fine-tunes on the "
                      "mergeability benchmark" + because, 0.4)
    if p.n_models == 2:
        return Choice(M.SLERP, M.LINEAR, "rule 8: two related models without a base: SLERP", 0.3)
    return Choice(M.LINEAR, None, "rule 8: three or more related models without a base: a weighted average",
                  0.3)


CLEAR_GAP = 0.1  # a predicted lead of this much retention over the runner-up counts as a clear choice


def candidates(result: CompareResult) -> dict[str, MethodPrediction]:
    """The predictions of the methods this comparison may recommend: mergekit methods, and those needing a base
    besides the merged models only when the comparison had one (empty for three or more models)."""
    has_base = result.base is not None and result.mci.used_base
    known = {m.value: m for m in MergeMethod}
    return {name: p for name, p in result.predictions.items()
            if name in known and (has_base or not needs_separate_base(known[name]))}


def choose_predicted(predicted: dict[str, MethodPrediction]) -> Choice:
    """The method with the best predicted retention (ties within TIE to the simpler one); the runner-up, the
    best of the others; the margin, the chosen one's lead over the runner-up in units of CLEAR_GAP."""
    method = best_method(predicted)
    assert method is not None
    chosen = predicted[method]
    others = {m: v for m, v in predicted.items() if m != method}
    runner = best_method(others)
    top = max(predicted, key=lambda m: predicted[m].retention)
    rule = (f"predicted: {method} keeps {chosen.retention:.0%} of each model's accuracy (80% interval "
            f"{chosen.low:.0%}-{chosen.high:.0%}), the best of the {len(predicted)} methods predicted")
    if predicted[top].retention > chosen.retention:
        rule += (f" ({top} at {predicted[top].retention:.0%} is within {100 * TIE:.0f} points: the simpler "
                 "method is preferred)")
    lead = chosen.retention - (others[runner].retention if runner is not None else 0.0)
    return Choice(MergeMethod(method), MergeMethod(runner) if runner is not None else None, rule,
                  _margin(lead, CLEAR_GAP), predicted=True)


def _margin(excess: float, scale: float) -> float:
    return max(0.0, min(1.0, excess / scale)) if scale > 0 else 1.0


def _round(value: float, step: float = 0.05) -> float:
    return round(round(value / step) * step, 4)


def recommend_strategy(result: CompareResult) -> Strategy:
    """The merge method, its settings and a mergekit 0.1.5 YAML for the models of `result`."""
    if result.mci.score is None or not result.layer_metrics:
        raise IncompatibleModelsError(
            "no strategy: the models could not be compared (" + "; ".join(result.mci.reasons[:2]) + ")"
        )
    p = profile(result)
    choice = choose(p)
    predicted = candidates(result) if choice.method is not MergeMethod.PASSTHROUGH else {}
    if predicted:
        choice = choose_predicted(predicted)
    rationale = [choice.rule]
    warnings: list[str] = []
    if predicted:  # every method's prediction is the result's `predictions`
        rationale.append("parameters from the measurement rules (mergelens_mcp/mergekit/recommend.py): the "
                         "predictor does not compare parameter settings (its features do not depend on them)")
    elif result.predictions and choice.method is MergeMethod.PASSTHROUGH:
        rationale.append("the predictions were not used: no merge method undoes this (they were fitted on "
                         "fine-tunes of one base that neither cancel nor lack a shared origin)")
    elif len(result.models) >= 3:
        rationale.append("three or more models: the rule table chose (the predictions cover pairs)")
    elif choice.method is not MergeMethod.PASSTHROUGH:
        rationale.append("no predictions for this pair (see the notes): the rule table chose")
    if not p.has_base:
        rationale.append("no base model: ties, dare, task_arithmetic and model_stock were not considered "
                         "(they need one); pass the base for task-vector evidence")
    params, text = _render(result, choice.method, p, rationale, warnings)
    if p.vocab_mismatch:
        warnings.append("the vocabularies differ: the YAML has a `tokenizer: {source: union}` section so "
                        "mergekit builds a joint vocabulary; check the merged tokenizer before use")
    for method in (choice.method, choice.runner_up):
        if method is MergeMethod.SLERP and p.degenerate_layers:
            warnings.append(
                f"mergekit's SLERP falls back to linear interpolation where |cos| > {SLERP_LINEAR_FALLBACK} "
                f"(mergekit 0.1.5 decides per whole tensor, flattened): "
                f"{len(p.degenerate_layers)} layer(s) here, e.g. {', '.join(p.degenerate_layers[:4])}, are "
                "merged linearly"
            )
            break
    if p.balance is not None and p.balance < 0.5:
        warnings.append(f"one fine-tune moved {1 / max(p.balance, 1e-6):.1f}x farther from the base than the "
                        "other: its task vector dominates; lower its weight if that is not intended")
    outside = bool(predicted) and extrapolated(result) is not None
    expected = predicted[choice.method.value].retention * 100 if predicted else result.mci.score
    composite = result.mci.composite if result.mci.composite is not None else result.mci.score
    if expected is not None:
        expected = capped_score(expected, composite, outside)  # the MCI the headline shows
    verdict = verdict_for(expected)
    if verdict.value in ("risky", "incompatible") and choice.method is not MergeMethod.PASSTHROUGH:
        warnings.append(f"the MCI is {expected:.0f} ({verdict.value}): evaluate the merged model before use")
    confidence = _confidence(choice, p, result, rationale, outside)
    return Strategy(
        method=choice.method, confidence=confidence, rationale=rationale,
        runner_up=choice.runner_up, parameters=params, warnings=warnings, mergekit_yaml=text,
        peft_snippet=peft_snippet(result, choice.method, params),
    )


def needs_separate_base(method: MergeMethod) -> bool:
    """Whether the method needs a base model besides the merged ones (SLERP's base is one of its two)."""
    return METHODS[method.value].needs_base and method is not MergeMethod.SLERP


def mergekit_yaml(result: CompareResult, method: MergeMethod) -> str:
    """The YAML `recommend_strategy` would emit had the rules picked `method` (parameters still measured)."""
    return _render(result, method, profile(result), [], [])[1]


def _render(
    result: CompareResult, method: MergeMethod, p: Profile, rationale: list[str], warnings: list[str]
) -> tuple[dict[str, Any], str]:
    if needs_separate_base(method) and not p.has_base:
        raise ValueError(f"{method.value} needs a base model and this comparison had none")
    labels = [m.label for m in result.models]
    dropped = _zone_layers(result, p.n_blocks, labels)
    params = _parameters(method, p, labels, dropped, rationale, warnings)
    config = _config(result, method, params, p)
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    MergeConfig.model_validate(yaml.safe_load(text))  # our own mirror: a bug here must not reach the user
    return params, text


def _confidence(choice: Choice, p: Profile, result: CompareResult, rationale: list[str],
                outside: bool = False) -> float:
    """0.45, + 0.3 x how clearly the deciding measurement passed its threshold (a prediction: its lead over the
    runner-up, in units of CLEAR_GAP), + 0.15 with task-vector evidence (a base), - 0.05 per warning-level
    finding, - 0.2 when the predictions are extrapolated beyond the fitted range (`outside`), clamped to
    [0.05, 0.95]; reasons join `rationale`."""
    warnings = sum(1 for f in result.findings if f.level is FindingLevel.WARNING)
    value = round(max(0.05, min(0.95, 0.45 + 0.3 * choice.margin + 0.15 * p.has_base - 0.05 * warnings
                                - 0.2 * outside)), 2)
    deciding = ("the prediction leads the runner-up by" if choice.predicted
                else "the deciding measurement cleared its threshold by")
    rationale.append(
        f"confidence {value:.2f}: {deciding} {choice.margin:.0%} of its scale; "
        f"{'task-vector evidence from the base' if p.has_base else 'no base, weights only'}"
        + (f"; {warnings} warning(s) in the comparison" if warnings else "")
        + ("; the pair lies outside the predictor's fitted range" if outside else "")
    )
    return value


def _zone_layers(result: CompareResult, n_blocks: int, labels: list[str]) -> dict[str, list[int]]:
    """Block indices where each model should not contribute: the later model of each conflict zone's pair."""
    dropped: dict[str, set[int]] = {}
    for zone in result.conflict_zones:
        blocks = [i for i in range(zone.start_layer, zone.end_layer + 1) if 0 <= i < n_blocks]
        if blocks and len(blocks) < n_blocks and zone.model_b in labels:
            dropped.setdefault(zone.model_b, set()).update(blocks)
    return {label: sorted(v) for label, v in dropped.items() if len(v) < n_blocks}


def _parameters(
    method: MergeMethod, p: Profile, labels: list[str], dropped: dict[str, list[int]],
    rationale: list[str], warnings: list[str],
) -> dict[str, Any]:
    M = MergeMethod
    params: dict[str, Any] = {}
    if method is M.PASSTHROUGH:
        params["take"] = labels[0]
        warnings.append(f"a merge is not advised: the passthrough config keeps {labels[0]}'s layers "
                        "unchanged; reorder the models to keep another")
        return params
    if method is M.MODEL_STOCK:
        if dropped:
            zone_layers = _spans(sorted({i for blocks in dropped.values() for i in blocks}))
            warnings.append(f"conflict zone(s) at layer(s) {zone_layers}: model_stock cannot exclude a model "
                            "there; consider ties with per-layer weights")
        return params
    if method is M.SLERP:
        t = 0.5 if p.balance is None else _round(0.5 * (0.5 + 0.5 * p.balance), 0.05)
        params["t"] = t
        if labels[1] in dropped:
            params["t_per_layer"] = [0.0 if i in dropped[labels[1]] else t for i in range(p.n_blocks)]
            rationale.append(f"conflict zone(s) at layer(s) {_spans(dropped[labels[1]])}: t = 0 there, so "
                             f"those layers come from {labels[0]} (base_model of the SLERP)")
        return params
    n = len(labels)
    weights = {label: _round(1 / n, 0.01) for label in labels}
    if method is M.LINEAR and p.overlap is not None and p.overlap < LOW_OVERLAP:
        others = max(0.1, min(0.4, _round(p.overlap / 2, 0.05)))
        weights = {label: (round(1 - others, 4) if i == 0 else _round(others / (n - 1), 0.01))
                   for i, label in enumerate(labels)}
        rationale.append(f"weights {weights}: the first model dominates because the subspaces overlap little")
    params["weights"] = weights
    per_layer = {label: [0.0 if i in blocks else weights[label] for i in range(p.n_blocks)]
                 for label, blocks in dropped.items()}
    if per_layer:
        params["weights_per_layer"] = per_layer
        for label, blocks in dropped.items():
            rationale.append(f"conflict zone(s) at layer(s) {_spans(blocks)}: {label} gets weight 0 there (a "
                             f"per-layer gradient), so those layers come from the other model(s)")
    spec = METHODS[method.value]
    if spec.parameter("density") is not None:
        fraction = p.mass_fraction if p.mass_fraction is not None else 0.5
        density = max(MIN_DENSITY, min(MAX_DENSITY, _round(fraction)))
        if spec.sparsification in ("random", "della"):
            density = max(density, MIN_DARE_DENSITY)
        params["density"] = density
        if method is not M.TASK_ARITHMETIC:
            rationale.append(f"density {density}: 90% of the task vectors' magnitude mass lies in "
                             f"{fraction:.0%} of their coordinates")
        else:
            params.pop("density")
    if spec.parameter("normalize") is not None and method is not M.TASK_ARITHMETIC:
        params["normalize"] = True
    return params


def _spans(blocks: list[int]) -> str:
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _dtype(result: CompareResult) -> str:
    counts: Counter[str] = Counter()
    for m in result.models:
        counts.update(m.dtypes)
    name = next((d for d, _ in counts.most_common() if d in DTYPE_NAMES), "BF16")
    return DTYPE_NAMES[name]


def _config(result: CompareResult, method: MergeMethod, params: dict[str, Any], p: Profile) -> dict[str, Any]:
    """The mergekit YAML as a dict, models named as the user gave them."""
    sources = {m.label: model_reference(m) for m in result.models}  # a LoRA adapter: base+adapter
    labels = list(sources)
    config: dict[str, Any] = {"merge_method": method.value}
    M = MergeMethod
    if method is M.PASSTHROUGH and p.n_blocks:
        config["slices"] = [{"sources": [{"model": sources[params["take"]], "layer_range": [0, p.n_blocks]}]}]
    elif method is M.PASSTHROUGH:
        config["models"] = [{"model": sources[params["take"]]}]
    elif method is M.SLERP:
        config["base_model"] = sources[labels[0]]
        config["models"] = [{"model": sources[label]} for label in labels]
        config["parameters"] = {"t": params.get("t_per_layer", params["t"])}
    elif method is M.LINEAR:
        config["models"] = [{"model": sources[label], "parameters": {"weight": _weight(params, label)}}
                            for label in labels]
        config["parameters"] = {"normalize": True}
    else:
        assert result.base is not None
        config["base_model"] = result.base.source
        models = []
        for label in labels:
            entry: dict[str, Any] = {"model": sources[label]}
            if method is not M.MODEL_STOCK:
                entry["parameters"] = {"weight": _weight(params, label)}
                if "density" in params:
                    entry["parameters"]["density"] = params["density"]
            models.append(entry)
        config["models"] = models
        shared = {k: params[k] for k in ("normalize",) if k in params}
        if shared:
            config["parameters"] = shared
    config["dtype"] = _dtype(result)
    if p.vocab_mismatch and method is not M.PASSTHROUGH:
        config["tokenizer"] = {"source": "union"}
    return config


def _weight(params: dict[str, Any], label: str) -> float | list[float]:
    per_layer = params.get("weights_per_layer", {})
    return per_layer.get(label, params["weights"][label])
