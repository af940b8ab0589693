"""The Merge Compatibility Index (MCI): per-layer metrics -> 0..1 components -> layer scores -> 0-100.

Components (1 = good for merging), with their weights:

| side   | component      | from                                         | weight | why                              |
|--------|----------------|----------------------------------------------|--------|----------------------------------|
| weight | direction      | clamp(cosine_similarity, 0, 1)               | 0.50   | shared origin                    |
| weight | distance       | exp(-l2_distance / DISTANCE_SCALE)           | 0.80   | how far apart the weights are    |
| weight | subspace       | spectral_overlap                             | 0.30   | same dominant directions         |
| weight | representation | activation_cka (only when activations ran)   | 0.40   | same behaviour on probe inputs   |
| weight | rank           | effective_rank_ratio                         | 0.60 * | same spectrum shape              |
| weight | distribution   | exp(-kl_divergence)                          | 0.40 * | same value distribution          |
| task   | alignment      | (1 + task_cosine) / 2                        | 0.25   | task vectors pull the same way   |
| task   | sign_agreement | 1 - sign_disagreement                        | 0.20   | TIES' sign conflicts             |
| task   | interference   | 1 - tsv_interference * (1 - task_cosine) / 2 | 0.25   | shared directions used otherwise |
| task   | balance        | magnitude_ratio                              | 0.10   | neither drowns the other         |
| task   | drift          | 1 - (1 - exp(-task_drift / DRIFT_SCALE))     | 0.40   | far-moved fine-tunes merge worse |
|        |                |     x (1 - task_cosine) / 2                  |        | unless they moved the same way   |

(* the shape components multiply: weight_score = origin x shape^0.5, where origin is the weighted mean of
direction, distance and subspace, and shape the weighted mean of rank and distribution: models of similar
shape but unrelated weights must not score as compatible.)

With a base: layer = min(weight_score, weight_score^0.3 x task_score^0.7), so candidate-against-candidate
evidence decides (two fine-tunes pulling in opposite directions from their base score low even though each is
close to it), and models that share no origin stay low whatever their task vectors say.
Without a base: layer = weight_score, and the confidence says that task-vector evidence was unavailable.

MCI = 100 x (0.6 x mean + 0.4 x lowest layer score), the mean weighted by sqrt(parameters) and the lowest
taken over layers of at least 1% of the median layer's size (a 64-value norm is not a layer that breaks a
merge). One broken block breaks a merge.
Verdicts: >= 75 highly compatible, >= 55 compatible, >= 35 risky, else incompatible.

Calibration: DISTANCE_SCALE, DRIFT_SCALE and the distance and drift weights were chosen on the mergeability
benchmark (benchmarks/mergeability/, 112 pairs of fine-tunes of 8 synthetic tasks) from a small grid, selected by
mean Spearman over merge methods; benchmarks/mergeability/README.md gives the leave-one-task-out figures of that
selection. Everything else is fixed by reasoning, not fitted. The benchmark showed what the study behind it did:
how far two fine-tunes are from each other and from their base predicts the merge outcome best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from ..models import Verdict

DRIFT_SCALE = 0.3
DISTANCE_SCALE = 0.1
MEAN_WEIGHT, WORST_WEIGHT = 0.6, 0.4
MIN_WORST_FRACTION = 0.01
WEIGHT_EXPONENT, TASK_EXPONENT = 0.3, 0.7
VERDICTS = ((75.0, Verdict.HIGHLY_COMPATIBLE), (55.0, Verdict.COMPATIBLE), (35.0, Verdict.RISKY))

Component = Callable[[Mapping[str, float]], float | None]


def _get(name: str, transform: Callable[[float], float]) -> Component:
    def component(metrics: Mapping[str, float]) -> float | None:
        value = metrics.get(name)
        return None if value is None else min(1.0, max(0.0, transform(value)))

    return component


def _drift(metrics: Mapping[str, float]) -> float | None:
    drift, cosine = metrics.get("task_drift"), metrics.get("task_cosine")
    if drift is None or cosine is None:
        return None
    return min(1.0, max(0.0, 1.0 - (1.0 - math.exp(-drift / DRIFT_SCALE)) * (1.0 - cosine) / 2.0))


def _interference(metrics: Mapping[str, float]) -> float | None:
    tsv, cosine = metrics.get("tsv_interference"), metrics.get("task_cosine")
    if tsv is None or cosine is None:
        return None
    return min(1.0, max(0.0, 1.0 - tsv * (1.0 - cosine) / 2.0))


ORIGIN: dict[str, tuple[Component, float]] = {
    "direction": (_get("cosine_similarity", lambda c: c), 0.50),
    "distance": (_get("l2_distance", lambda d: math.exp(-d / DISTANCE_SCALE)), 0.80),
    "subspace": (_get("spectral_overlap", lambda s: s), 0.30),
    "representation": (_get("activation_cka", lambda c: c), 0.40),
}
SHAPE: dict[str, tuple[Component, float]] = {
    "rank": (_get("effective_rank_ratio", lambda r: r), 0.60),
    "distribution": (_get("kl_divergence", lambda k: math.exp(-k)), 0.40),
}
TASK: dict[str, tuple[Component, float]] = {
    "alignment": (_get("task_cosine", lambda c: (1.0 + c) / 2.0), 0.25),
    "sign_agreement": (_get("sign_disagreement", lambda s: 1.0 - s), 0.20),
    "interference": (_interference, 0.25),
    "balance": (_get("magnitude_ratio", lambda r: r), 0.10),
    "drift": (_drift, 0.40),
}
COMPONENT_NAMES = (*ORIGIN, *SHAPE, *TASK)


def components(metrics: Mapping[str, float]) -> dict[str, float]:
    """Every component that the available metrics allow, each 0..1 (1 = good for merging)."""
    out: dict[str, float] = {}
    for table in (ORIGIN, SHAPE, TASK):
        for name, (fn, _) in table.items():
            value = fn(metrics)
            if value is not None:
                out[name] = value
    return out


def _weighted(parts: Mapping[str, float], table: Mapping[str, tuple[Component, float]]) -> float | None:
    pairs = [(parts[name], weight) for name, (_, weight) in table.items() if name in parts]
    total = sum(w for _, w in pairs)
    return None if total == 0 else sum(v * w for v, w in pairs) / total


def layer_score(parts: Mapping[str, float]) -> float:
    """0..1 compatibility of one layer from its components."""
    origin = _weighted(parts, ORIGIN)
    shape = _weighted(parts, SHAPE)
    weight_score = (origin if origin is not None else 1.0) * math.sqrt(shape if shape is not None else 1.0)
    task_score = _weighted(parts, TASK)
    if task_score is None:
        return weight_score
    return min(weight_score, weight_score**WEIGHT_EXPONENT * task_score**TASK_EXPONENT)


def overall_score(layer_scores: list[float], layer_params: list[int]) -> float:
    """0-100 MCI from 0..1 layer scores and each layer's parameter count."""
    if not layer_scores:
        return 0.0
    weights = [math.sqrt(max(n, 1)) for n in layer_params]
    mean = sum(s * w for s, w in zip(layer_scores, weights, strict=True)) / sum(weights)
    median = sorted(layer_params)[len(layer_params) // 2]
    worst = min(s for s, n in zip(layer_scores, layer_params, strict=True) if n >= MIN_WORST_FRACTION * median)
    return round(100.0 * (MEAN_WEIGHT * mean + WORST_WEIGHT * worst), 2)


def verdict_for(score: float | None) -> Verdict:
    if score is None:
        return Verdict.INCOMPATIBLE
    for threshold, verdict in VERDICTS:
        if score >= threshold:
            return verdict
    return Verdict.INCOMPATIBLE
