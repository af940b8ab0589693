"""The Merge Compatibility Index (MCI): per-layer metrics -> 0..1 components -> layer scores -> 0-100.

Every component is one entry of one catalogue (`CATALOGUE`, declared below with `@component`, the way a metric
is declared in metrics.py): the metrics it reads, its transform (whose docstring is its formula), its weight and
group, and the words every consumer shows (the report's label, the phrase in MCI reasons, its plain-words
meaning, why it matters for a merge, and the advice for a conflict zone it drives). Explanations, zones, the
report and the MCP views read the catalogue; a new component is one new entry here, and
tests/analysis/test_catalogue.py fails until every consumer knows it. Each component is 0..1, 1 = good for merging.

Groups: `origin` (direction, distance, subspace, representation: do the weights share an origin), `shape` (rank,
distribution) and `task` (the task vectors against the base; only with a base). The shape components multiply:
weight_score = origin x shape^0.5, where origin and shape are the weighted means of their group's components:
models of similar shape but unrelated weights must not score as compatible.

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
selection (the benchmark scores a tuned copy, `CATALOGUE.replace(...)`, passed to `components` and
`layer_score`). Everything else is fixed by reasoning, not fitted. The benchmark showed what the study behind it
did: how far two fine-tunes are from each other and from their base predicts the merge outcome best.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..models import Verdict

DRIFT_SCALE = 0.3
DISTANCE_SCALE = 0.1
MEAN_WEIGHT, WORST_WEIGHT = 0.6, 0.4
MIN_WORST_FRACTION = 0.01
WEIGHT_EXPONENT, TASK_EXPONENT = 0.3, 0.7
COMPATIBLE_AT = 55.0  # the verdict's line, the conflict-zone threshold, and (/ 100) a weak component's
VERDICTS = ((75.0, Verdict.HIGHLY_COMPATIBLE), (COMPATIBLE_AT, Verdict.COMPATIBLE), (35.0, Verdict.RISKY))
WEAK_BELOW = COMPATIBLE_AT / 100  # a component under this is weak: explained, advised, listed
ORIGIN, SHAPE, TASK = "origin", "shape", "task"
GROUPS = (ORIGIN, SHAPE, TASK)

Transform = Callable[..., float]


@dataclass(frozen=True)
class Component:
    """One MCI component: what it reads, how it is scored, and how every consumer words it."""

    name: str
    group: str  # ORIGIN, SHAPE or TASK
    metrics: tuple[str, ...]  # the metrics it reads, in the transform's argument order; it stands for the first
    transform: Transform  # the metric values (and `scale=`, where set) -> a value clamped to 0..1
    weight: float  # within its group
    label: str  # the report's row label
    description: str  # the short phrase of MCI reasons and explanations
    meaning: str  # what it measures, in plain words
    matters: str  # why it matters for a merge
    advice: str  # what to do in a conflict zone it drives
    formula: str  # the transform's docstring
    scale: float | None = None  # the transform's fitted scale, where it has one

    def value(self, metrics: Mapping[str, float | None]) -> float | None:
        """0..1 from `metrics`, or None when one of the metrics it reads is absent."""
        values = [metrics.get(name) for name in self.metrics]
        if any(v is None for v in values):
            return None
        raw = self.transform(*values) if self.scale is None else self.transform(*values, scale=self.scale)
        return min(1.0, max(0.0, raw))


@dataclass(frozen=True)
class Catalogue:
    """The MCI's components in scoring order (origin, then shape, then task); immutable: `replace` gives a
    tuned copy, which `components` and `layer_score` take."""

    entries: tuple[Component, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique: {names}")
        for c in self.entries:
            if c.group not in GROUPS or c.weight <= 0 or not c.metrics:
                raise ValueError(f"component {c.name!r} needs a group of {GROUPS}, a positive weight and metrics")
        order = [GROUPS.index(c.group) for c in self.entries]
        if order != sorted(order):
            raise ValueError("components must be listed origin first, then shape, then task")

    def __iter__(self) -> Iterator[Component]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.entries)

    def __getitem__(self, name: str) -> Component:
        for c in self.entries:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not an MCI component; known: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.entries)

    def group(self, group: str) -> tuple[Component, ...]:
        return tuple(c for c in self.entries if c.group == group)

    def feeding(self, metric: str) -> Component | None:
        """The component that stands for `metric` (the first one listing it first), if any."""
        return next((c for c in self.entries if c.metrics[0] == metric), None)

    def replace(self, name: str, **changes: object) -> Catalogue:
        """A copy with one component's fields changed, e.g. `replace("distance", weight=1.2, scale=0.2)`."""
        target = self[name]
        changed = dataclasses.replace(target, **changes)  # type: ignore[arg-type]
        return Catalogue(tuple(changed if c is target else c for c in self.entries))


_DECLARED: list[Component] = []


def component(
    name: str,
    *,
    group: str,
    metrics: tuple[str, ...],
    weight: float,
    label: str,
    description: str,
    meaning: str,
    matters: str,
    advice: str,
    scale: float | None = None,
) -> Callable[[Transform], Transform]:
    """Declare one component; the decorated function is its transform and its name is the component's."""

    def register(fn: Transform) -> Transform:
        if fn.__name__ != name or any(c.name == name for c in _DECLARED):
            raise ValueError(f"component {name!r} must be declared once, by a function of that name")
        if "CATALOGUE" in globals():
            raise ValueError(f"component {name!r} must be declared in analysis/score.py, before CATALOGUE")
        formula = " ".join((fn.__doc__ or "").split())
        _DECLARED.append(Component(
            name, group, metrics, fn, weight, label, description, meaning, matters, advice, formula, scale,
        ))
        return fn

    return register


# ---- origin: do the weights share an origin? ---------------------------------------------------------------


@component(
    "direction", group=ORIGIN, metrics=("cosine_similarity",), weight=0.50,
    label="direction (cosine)", description="weight directions (cosine)",
    meaning="whether the two models' weights point the same way",
    matters="weights pointing the same way share an origin (the same basin), so averaging them stays in it",
    advice="the weights point in different directions: these layers do not share an origin; take them "
    "from one model or use slerp with t near 0 or 1 here",
)
def direction(cosine_similarity: float) -> float:
    """clamp(cosine_similarity, 0, 1)"""
    return cosine_similarity


@component(
    "distance", group=ORIGIN, metrics=("l2_distance",), weight=0.80, scale=DISTANCE_SCALE,
    label="distance (L2)", description="weight distance (L2)",
    meaning="how far apart the two models' weights are, relative to their size",
    matters="the farther apart the weights, the more an interpolation lands between two solutions",
    advice="the weights are far apart: interpolate gently (slerp t near 0 or 1) or take these layers "
    "from one model",
)
def distance(l2_distance: float, scale: float) -> float:
    """exp(-l2_distance / scale), scale = DISTANCE_SCALE (fitted)"""
    return math.exp(-l2_distance / scale)


@component(
    "subspace", group=ORIGIN, metrics=("spectral_overlap",), weight=0.30,
    label="subspace overlap", description="top singular subspaces",
    meaning="whether both weight matrices use the same dominant singular directions",
    matters="models using the same dominant singular directions can be averaged without blurring them",
    advice="the dominant singular directions differ: linear merging will blur them; use a small weight "
    "for one model or take these layers from one model",
)
def subspace(spectral_overlap: float) -> float:
    """spectral_overlap"""
    return spectral_overlap


@component(
    "representation", group=ORIGIN, metrics=("activation_cka",), weight=0.40,
    label="representation (CKA)", description="activation similarity (CKA)",
    meaning="how alike the two models' hidden activations are on the same probe inputs (linear CKA: 1 when "
    "they are equal up to rotation and scale)",
    matters="models that compute the same representations from the same inputs can share a layer; weights "
    "can look alike while behaviour differs",
    advice="the models behave differently here on the probe inputs: take these layers from one model or "
    "give the other a small weight, and check the merge on your own inputs",
)
def representation(activation_cka: float) -> float:
    """activation_cka (only when activations ran)"""
    return activation_cka


# ---- shape: are the weights shaped alike? --------------------------------------------------------------------


@component(
    "rank", group=SHAPE, metrics=("effective_rank_ratio",), weight=0.60,
    label="spectrum shape (rank)", description="spectrum shapes (effective rank)",
    meaning="whether both weight matrices spread their energy over as many singular directions",
    matters="similar spectrum shapes say both layers were trained the same way from the same start",
    advice="the spectra have different shapes (effective rank): check that both models were trained "
    "from the same base",
)
def rank(effective_rank_ratio: float) -> float:
    """effective_rank_ratio"""
    return effective_rank_ratio


@component(
    "distribution", group=SHAPE, metrics=("kl_divergence",), weight=0.40,
    label="value distribution (KL)", description="weight value distributions (KL)",
    meaning="whether the weights' values are distributed alike (scale and shape of their histogram)",
    matters="similar value distributions rule out scale or dtype mismatches",
    advice="the weight distributions differ in scale: check dtypes and that both come from the same base",
)
def distribution(kl_divergence: float) -> float:
    """exp(-kl_divergence)"""
    return math.exp(-kl_divergence)


# ---- task: do the fine-tunes (model - base) conflict? --------------------------------------------------------


@component(
    "alignment", group=TASK, metrics=("task_cosine",), weight=0.25,
    label="task alignment", description="task-vector alignment",
    meaning="whether the two fine-tunes moved the base in the same direction",
    matters="task vectors that pull the same way add up; opposite ones cancel and the merge loses both skills",
    advice="the task vectors pull in opposite directions here: take these layers from one model "
    "(a passthrough slice or a layer-wise weight gradient of 0/1) rather than averaging them",
)
def alignment(task_cosine: float) -> float:
    """(1 + task_cosine) / 2"""
    return (1.0 + task_cosine) / 2.0


@component(
    "sign_agreement", group=TASK, metrics=("sign_disagreement",), weight=0.20,
    label="sign agreement", description="task-vector sign agreement",
    meaning="the share of coordinates both fine-tunes changed in the same direction",
    matters="coordinates whose updates disagree in sign cancel out unless a method like TIES elects a sign",
    advice="many coordinates conflict in sign: merge with ties or dare_ties so sign election "
    "resolves them, with density around 0.5",
)
def sign_agreement(sign_disagreement: float) -> float:
    """1 - sign_disagreement (TIES' sign conflicts)"""
    return 1.0 - sign_disagreement


@component(
    "interference", group=TASK, metrics=("tsv_interference", "task_cosine"), weight=0.25,
    label="interference (TSV)", description="singular-direction interference (TSV)",
    meaning="whether the fine-tunes write into the same singular directions in different ways",
    matters="fine-tunes that write into the same singular directions differently overwrite each other",
    advice="both fine-tunes write into the same singular directions in different ways: use ties "
    "or dare_ties and lower the weight of the weaker model in these layers",
)
def interference(tsv_interference: float, task_cosine: float) -> float:
    """1 - tsv_interference x (1 - task_cosine) / 2: shared directions count only when used otherwise"""
    return 1.0 - tsv_interference * (1.0 - task_cosine) / 2.0


@component(
    "balance", group=TASK, metrics=("magnitude_ratio",), weight=0.10,
    label="magnitude balance", description="task-vector magnitude balance",
    meaning="whether both fine-tunes changed the layer by a similar amount",
    matters="when one fine-tune changed the layer much more, a plain average drowns the other",
    advice="one fine-tune changed these layers much more than the other: weight them unequally or use "
    "task_arithmetic with per-model weights",
)
def balance(magnitude_ratio: float) -> float:
    """magnitude_ratio"""
    return magnitude_ratio


@component(
    "drift", group=TASK, metrics=("task_drift", "task_cosine"), weight=0.40, scale=DRIFT_SCALE,
    label="drift from base", description="distance moved from the base",
    meaning="how far the fine-tunes moved from their base, discounted when they moved the same way",
    matters="layers that moved far from the base merge worse, unless both moved the same way",
    advice="these layers moved far from the base: lower their merge weight (e.g. 0.3) or keep the base's "
    "values via a gradient",
)
def drift(task_drift: float, task_cosine: float, scale: float) -> float:
    """1 - (1 - exp(-task_drift / scale)) x (1 - task_cosine) / 2, scale = DRIFT_SCALE (fitted): far-moved
    fine-tunes merge worse unless they moved the same way"""
    return 1.0 - (1.0 - math.exp(-task_drift / scale)) * (1.0 - task_cosine) / 2.0


CATALOGUE = Catalogue(tuple(_DECLARED))
COMPONENT_NAMES = CATALOGUE.names


def components(metrics: Mapping[str, float], catalogue: Catalogue = CATALOGUE) -> dict[str, float]:
    """Every component that the available metrics allow, each 0..1 (1 = good for merging)."""
    out: dict[str, float] = {}
    for c in catalogue:
        value = c.value(metrics)
        if value is not None:
            out[c.name] = value
    return out


def _weighted(parts: Mapping[str, float], group: tuple[Component, ...]) -> float | None:
    pairs = [(parts[c.name], c.weight) for c in group if c.name in parts]
    total = sum(w for _, w in pairs)
    return None if total == 0 else sum(v * w for v, w in pairs) / total


def layer_score(parts: Mapping[str, float], catalogue: Catalogue = CATALOGUE) -> float:
    """0..1 compatibility of one layer from its components."""
    origin = _weighted(parts, catalogue.group(ORIGIN))
    shape = _weighted(parts, catalogue.group(SHAPE))
    weight_score = (origin if origin is not None else 1.0) * math.sqrt(shape if shape is not None else 1.0)
    task_score = _weighted(parts, catalogue.group(TASK))
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
