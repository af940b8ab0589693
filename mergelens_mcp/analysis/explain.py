"""One layer's metrics in words: what each number measures and why its value helps or hurts a merge."""

from __future__ import annotations

from ..errors import InputError
from ..models import CompareResult, LayerExplanation, LayerMetrics, MetricReading, Verdict
from . import score as mci
from .metrics import REGISTRY
from .predict import drivers
from .score import CATALOGUE
from .zones import OPPOSED_ADVICE, opposed

ASSESSMENT = {
    Verdict.HIGHLY_COMPATIBLE: "good", Verdict.COMPATIBLE: "acceptable", Verdict.RISKY: "risky",
    Verdict.INCOMPATIBLE: "bad",
}


LAYER_NUMBERING = (
    "layers are numbered as in conflict zones: -1 the embeddings, 0..N-1 the blocks, N (the block count) the "
    "final norm and lm_head; names ('layers.12', 'embed', 'norm', 'lm_head') are case-insensitive"
)


def find_layer(layers: list[LayerMetrics], layer: str) -> list[LayerMetrics]:
    """Every pair's metrics for `layer`: a name ('layers.3', 'embed', 'norm', 'lm_head', any case) or a number
    in the conflict zones' numbering (-1 the embeddings, 0..N-1 the blocks, N the final norm and lm_head)."""
    wanted = layer.strip().lower()
    n_blocks = 1 + max((lm.layer_index for lm in layers if lm.kind == "block" and lm.layer_index is not None),
                       default=-1)
    if wanted.lstrip("-").isdigit():
        number = int(wanted)
        if number == -1:
            found = [lm for lm in layers if lm.kind == "embed"]
        elif number == n_blocks:
            found = [lm for lm in layers if lm.kind in ("norm", "lm_head")]
        else:
            found = [lm for lm in layers if lm.layer_index == number and lm.kind == "block"]
    else:
        name = wanted.removeprefix("model.")
        found = [lm for lm in layers if lm.layer_name.lower() == name]
    if not found:
        names = list(dict.fromkeys(lm.layer_name for lm in layers))
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} layers)" if len(names) > 8 else "")
        raise InputError(f"layer {layer!r} is not in these models ({n_blocks} blocks); use a number from -1 to "
                         f"{n_blocks} or one of: {shown}")
    return found


def explain(lm: LayerMetrics, result: CompareResult | None = None) -> LayerExplanation:
    """Explain one layer of one pair; given its comparison, also what pushed the headline MCI (the predicted
    retention of its method, a figure for the whole pair) up or down."""
    readings = [_reading(name, value, lm.components) for name, value in lm.metrics.items()]
    weakest = sorted((v, n) for n, v in lm.components.items() if v < mci.WEAK_BELOW)
    verdict = mci.verdict_for(lm.score)
    return LayerExplanation(
        model_a=lm.model_a, model_b=lm.model_b, layer_name=lm.layer_name, layer_index=lm.layer_index,
        kind=lm.kind, n_params=lm.n_params, score=lm.score, verdict=verdict,
        summary=_summary(lm, verdict, weakest),
        readings=readings, advice=_advice(lm, weakest), prediction=prediction_words(result),
    )


def prediction_words(result: CompareResult | None) -> str | None:
    """The headline MCI's prediction and what pushed it up or down, in words (None: the MCI is the composite)."""
    method = result.mci.method if result is not None else None
    if result is None or method is None or method not in result.predictions:
        return None
    p = result.predictions[method]
    return (f"The MCI ({result.mci.score:.0f}) is 100 x {method}'s predicted retention for the whole pair, "
            f"{p.retention:.2f} (80% interval {p.low:.2f}-{p.high:.2f}); against the fit's average pair it was "
            f"{drivers(p)}. This layer's score is the weight-space composite.")


def _advice(lm: LayerMetrics, weakest: list[tuple[float, str]]) -> list[str]:
    """What to do about the weak components, worst first; where the task vectors are opposed, only the keep-one
    advice (no merge method recovers task vectors that cancel)."""
    if opposed([lm]):
        return [f"alignment: {OPPOSED_ADVICE}"]
    return [f"{n}: {CATALOGUE[n].advice}" for _, n in weakest if n in CATALOGUE]


def _reading(name: str, value: float, components: dict[str, float]) -> MetricReading:
    metric = REGISTRY.get(name)
    fed = CATALOGUE.feeding(name)
    if metric is not None and metric.doc:
        meaning = " ".join(metric.doc.split("\n\n")[0].split())
    else:
        meaning = fed.meaning if fed is not None else name
    part = components.get(fed.name) if fed is not None else None
    if fed is None or part is None:
        return MetricReading(
            name=name, value=value, meaning=meaning, assessment="informational",
            why="shown for context; it does not enter the Merge Compatibility Index directly",
        )
    assessment = ASSESSMENT[mci.verdict_for(100 * part)]
    why = (f"{assessment}: it feeds the '{fed.name}' component ({fed.description}), {part:.2f} on a "
           f"0-1 scale where 1 is ideal; this matters because {fed.matters}")
    return MetricReading(name=name, value=value, meaning=meaning, component=fed.name,
                         component_score=round(part, 4), assessment=assessment, why=why)


def _summary(lm: LayerMetrics, verdict: Verdict, weakest: list[tuple[float, str]]) -> str:
    head = (f"{lm.layer_name} of {lm.model_a} + {lm.model_b} scores {lm.score:.1f}/100 "
            f"({verdict.value.replace('_', ' ')}).")
    if weakest:
        parts = ", ".join(f"{_words(n)} ({v:.2f})" for v, n in weakest)
        return f"{head} It is pulled down by {parts}."
    if lm.components:
        best = max(lm.components, key=lambda n: lm.components[n])
        return f"{head} No component is below {mci.WEAK_BELOW}; the strongest is {_words(best)}."
    return head


def _words(component: str) -> str:
    return CATALOGUE[component].description if component in CATALOGUE else component
