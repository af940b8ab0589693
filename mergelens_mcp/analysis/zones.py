"""Conflict zones: contiguous runs of layers that score badly, why, and what to do about them."""

from __future__ import annotations

from ..models import ConflictZone, LayerMetrics, Severity
from .score import CATALOGUE, COMPATIBLE_AT

ZONE_THRESHOLD = COMPATIBLE_AT  # a layer scoring below a compatible verdict
OUTLIER_DROP = 15.0
OPPOSED_TASK_COSINE = -0.5  # task vectors this opposed cancel: no method recovers them (recommend's rule 2)
OPPOSED_ADVICE = CATALOGUE["alignment"].advice  # the one advice for opposed layers: never TIES
SEVERITIES = ((20.0, Severity.CRITICAL), (35.0, Severity.HIGH), (ZONE_THRESHOLD, Severity.MEDIUM))


def severity_for(score: float) -> Severity:
    for threshold, severity in SEVERITIES:
        if score < threshold:
            return severity
    return Severity.LOW


def detect_conflict_zones(layers: list[LayerMetrics], positions: dict[str, int]) -> list[ConflictZone]:
    """Zones for one pair of models; `layers` come in depth order, `positions` map layer name -> depth."""
    if not layers:
        return []
    ordered = sorted(layers, key=lambda lm: positions[lm.layer_name])
    median = sorted(lm.score for lm in ordered)[len(ordered) // 2]
    flagged = [lm.score < ZONE_THRESHOLD or lm.score < median - OUTLIER_DROP for lm in ordered]
    zones: list[ConflictZone] = []
    run: list[LayerMetrics] = []
    for lm, bad in zip(ordered, flagged, strict=True):
        contiguous = run and positions[lm.layer_name] <= positions[run[-1].layer_name] + 1
        if bad and (not run or contiguous):
            run.append(lm)
            continue
        if run:
            zones.append(_zone(run, positions))
        run = [lm] if bad else []
    if run:
        zones.append(_zone(run, positions))
    return zones


def _zone(run: list[LayerMetrics], positions: dict[str, int]) -> ConflictZone:
    worst = min(lm.score for lm in run)
    totals: dict[str, float] = {}
    for lm in run:
        for name, value in lm.components.items():
            totals[name] = totals.get(name, 0.0) + (1.0 - value)
    drivers = [n for n, loss in sorted(totals.items(), key=lambda kv: -kv[1]) if loss / len(run) > 0.15][:3]
    if not drivers and totals:
        drivers = [max(totals, key=lambda n: totals[n])]
    first, last = positions[run[0].layer_name], positions[run[-1].layer_name]
    span = describe_span([lm.layer_name for lm in run], positions)
    if opposed(run):
        advice = OPPOSED_ADVICE
    else:
        advice = "; ".join(CATALOGUE[d].advice for d in drivers[:2] if d in CATALOGUE)
    advice = advice or "inspect these layers before merging"
    return ConflictZone(
        model_a=run[0].model_a,
        model_b=run[0].model_b,
        start_layer=first,
        end_layer=last,
        layer_names=[lm.layer_name for lm in run],
        severity=severity_for(worst),
        score=worst,
        driving_metrics=drivers,
        recommendation=f"{span} (score {worst:.0f}): {advice}.",
    )


def describe_span(names: list[str], positions: dict[str, int]) -> str:
    """'the whole model' when `names` cover every layer of `positions`, else 'layers.1' or 'embed to layers.3'."""
    if len(names) > 1 and set(names) >= set(positions):
        return "the whole model"
    return names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"


def opposed(run: list[LayerMetrics]) -> bool:
    """Whether the run's task vectors point opposite ways (parameter-weighted task cosine below the limit)."""
    pairs = [(lm.metrics["task_cosine"], lm.n_params) for lm in run if "task_cosine" in lm.metrics]
    total = sum(n for _, n in pairs)
    return total > 0 and sum(v * n for v, n in pairs) / total < OPPOSED_TASK_COSINE
