"""One layer's metrics in words: what each number measures and why its value helps or hurts a merge."""

from __future__ import annotations

from ..errors import InputError
from ..models import LayerExplanation, LayerMetrics, MetricReading, Verdict
from . import score as mci
from .engine import DESCRIPTIONS
from .metrics import REGISTRY
from .zones import ADVICE

# metric -> the MCI component it feeds (see analysis/score.py)
COMPONENT_OF = {
    "cosine_similarity": "direction", "l2_distance": "distance", "spectral_overlap": "subspace",
    "effective_rank_ratio": "rank", "kl_divergence": "distribution", "task_cosine": "alignment",
    "sign_disagreement": "sign_agreement", "tsv_interference": "interference", "magnitude_ratio": "balance",
    "task_drift": "drift",
}
# why each component matters for a merge (the "why" column of analysis/score.py's table)
MATTERS = {
    "direction": "weights pointing the same way share an origin (the same basin), so averaging them stays "
                 "in it",
    "distance": "the farther apart the weights, the more an interpolation lands between two solutions",
    "subspace": "models using the same dominant singular directions can be averaged without blurring them",
    "rank": "similar spectrum shapes say both layers were trained the same way from the same start",
    "distribution": "similar value distributions rule out scale or dtype mismatches",
    "alignment": "task vectors that pull the same way add up; opposite ones cancel and the merge loses both "
                 "skills",
    "sign_agreement": "coordinates whose updates disagree in sign cancel out unless a method like TIES "
                      "elects a sign",
    "interference": "fine-tunes that write into the same singular directions differently overwrite each "
                    "other",
    "balance": "when one fine-tune changed the layer much more, a plain average drowns the other",
    "drift": "layers that moved far from the base merge worse, unless both moved the same way",
}
ASSESSMENT = {
    Verdict.HIGHLY_COMPATIBLE: "good", Verdict.COMPATIBLE: "acceptable", Verdict.RISKY: "risky",
    Verdict.INCOMPATIBLE: "bad",
}
ADVICE_BELOW = 0.55  # a component under this (the zone threshold / 100) gets advice


def find_layer(layers: list[LayerMetrics], layer: str) -> list[LayerMetrics]:
    """Every pair's metrics for `layer`: a name ('layers.3', 'embed', 'norm', 'lm_head') or a block index."""
    wanted = layer.strip()
    if wanted.lstrip("-").isdigit():
        found = [lm for lm in layers if lm.layer_index == int(wanted) and lm.kind == "block"]
    else:
        name = wanted.removeprefix("model.")
        found = [lm for lm in layers if lm.layer_name == name]
    if not found:
        names = list(dict.fromkeys(lm.layer_name for lm in layers))
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} layers)" if len(names) > 8 else "")
        raise InputError(f"layer {layer!r} is not in these models; use a block index or one of: {shown}")
    return found


def explain(lm: LayerMetrics) -> LayerExplanation:
    """Explain one layer of one pair."""
    readings = [_reading(name, value, lm.components) for name, value in lm.metrics.items()]
    weakest = sorted((v, n) for n, v in lm.components.items() if v < ADVICE_BELOW)
    verdict = mci.verdict_for(lm.score)
    return LayerExplanation(
        model_a=lm.model_a, model_b=lm.model_b, layer_name=lm.layer_name, layer_index=lm.layer_index,
        kind=lm.kind, n_params=lm.n_params, score=lm.score, verdict=verdict,
        summary=_summary(lm, verdict, weakest),
        readings=readings, advice=[f"{n}: {ADVICE[n]}" for _, n in weakest if n in ADVICE],
    )


def _reading(name: str, value: float, components: dict[str, float]) -> MetricReading:
    metric = REGISTRY.get(name)
    meaning = " ".join(metric.doc.split("\n\n")[0].split()) if metric is not None and metric.doc else name
    component = COMPONENT_OF.get(name)
    part = components.get(component) if component else None
    if component is None or part is None:
        return MetricReading(
            name=name, value=value, meaning=meaning, assessment="informational",
            why="shown for context; it does not enter the Merge Compatibility Index directly",
        )
    assessment = ASSESSMENT[mci.verdict_for(100 * part)]
    why = (f"{assessment}: it feeds the '{component}' component ({DESCRIPTIONS[component]}), {part:.2f} on a "
           f"0-1 scale where 1 is ideal; this matters because {MATTERS[component]}")
    return MetricReading(name=name, value=value, meaning=meaning, component=component,
                         component_score=round(part, 4), assessment=assessment, why=why)


def _summary(lm: LayerMetrics, verdict: Verdict, weakest: list[tuple[float, str]]) -> str:
    head = (f"{lm.layer_name} of {lm.model_a} + {lm.model_b} scores {lm.score:.1f}/100 "
            f"({verdict.value.replace('_', ' ')}).")
    if weakest:
        parts = ", ".join(f"{DESCRIPTIONS[n]} ({v:.2f})" for v, n in weakest)
        return f"{head} It is pulled down by {parts}."
    if lm.components:
        best = max(lm.components, key=lambda n: lm.components[n])
        return f"{head} No component is below {ADVICE_BELOW}; the strongest is {DESCRIPTIONS[best]}."
    return head
