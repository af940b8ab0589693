"""Predicted merge outcome per method: the expected retention (merged accuracy / each fine-tune's own, averaged
over the inputs, 0..1) with an 80% interval, from the per-layer metrics a compare already computed.

The model is small and readable: per method, a ridge fit on a handful of standardized pair features (below),
clipped to 0..1; the interval adds the 10th and 90th percentiles of the fit's held-out residuals (its provenance
says which: each benchmark run predicted by a fit on the others, or leave one task out).
Coefficients, feature means and scales, residual quantiles and the provenance of the fit (benchmark settings,
commit, date) ship in `mergelens_mcp/data/predictor.json`, written by `benchmarks/mergeability/fit.py`.

Two models per method: one on task-vector evidence (needs the base), one on weight-space evidence alone
(no base). Without a base the two models may not share one as every fitted pair did, so the no-base interval
is the union of both models' residual ranges widened by a quarter (a stated choice, not fitted), and the
result's notes say so.

One prior is not fitted: merging a model with itself by an idempotent method (linear, slerp) returns that model,
so for pairs closer than any pair the fit saw, those methods' predictions are drawn toward 1 in proportion
(`IDEMPOTENT`, `Predictor.nearest_distance`).

The product speaks in these units: for two models, the headline MCI is 100 x the predicted retention of the
recommended method (mergelens_mcp/mergekit/advice.py `headline`), its confidence from the interval and the
evidence (`predicted_confidence`), and the recommended method is the best prediction (`best_method`,
mergelens_mcp/mergekit/recommend.py).

Scope: fitted on the mergeability benchmark (synthetic tasks, tiny Llama-style models, pairs of fine-tunes of
one base); for two models only. benchmarks/mergeability/README.md gives its figures on settings the fit never
saw.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..models import CompareResult, MethodPrediction

PREDICTOR_PATH = Path(__file__).resolve().parent.parent / "data" / "predictor.json"
LOG_FLOOR = 1e-6
INTERVAL = (0.1, 0.9)  # residual quantiles of the stated interval: 80%
OUTSIDE_SD = 3.0  # a feature this many standard deviations from the fit's pairs: the note says "extrapolated"
IDEMPOTENT = frozenset({"linear", "slerp"})  # merging a model with itself returns it
# predictions this close are a tie (chosen on the fit run's held-out tasks among 0.005-0.08: 0.02 and 0.03 best,
# 77.7% against 74.1% at 0.005; the benchmark's "within 2 points" too)
TIE = 0.02
# ties to the simpler method: earlier in this list = simpler
SIMPLICITY = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")

Layer = tuple[str, int, Mapping[str, float]]  # (layer name, parameters, metric -> value) of one layer


@dataclass(frozen=True)
class Motion:
    """How far each of the two models moved from the base (|t| / |w_base| over the whole model, and per layer)
    and the cosine of their task vectors over the whole model: compare's `ModelInfo.moved`, `moved_by_layer`
    and `PairScore.task_cosine`."""

    moved: tuple[float, float]
    by_layer: tuple[Mapping[str, float], Mapping[str, float]]
    cosine: float | None = None


def _weighted_mean(layers: Iterable[Layer], value: Callable[[Mapping[str, float]], float | None]) -> float | None:
    total = weight = 0.0
    for _, n, metrics in layers:
        v = value(metrics)
        if v is None or not math.isfinite(v):
            continue
        total += n * v
        weight += n
    return total / weight if weight > 0 else None


def _metric(name: str) -> Callable[[Mapping[str, float]], float | None]:
    return lambda m: m.get(name)


def _model_drift(far: bool) -> Callable[[Mapping[str, float]], float | None]:
    """Each layer's relative movement of the farther (or nearer) moved fine-tune, from drift and balance:
    drift = (|t_a| + |t_b|) / 2|w_base| and ratio = min / max give max = 2 drift / (1 + ratio)."""

    def value(m: Mapping[str, float]) -> float | None:
        drift, ratio = m.get("task_drift"), m.get("magnitude_ratio")
        if drift is None or ratio is None:
            return None
        return 2 * drift / (1 + ratio) * (1.0 if far else ratio)

    return value


def _pair_geometry(m: Mapping[str, float]) -> tuple[float, float, float] | None:
    """(far, near, cosine): each layer's two task-vector norms relative to the base's, and their cosine."""
    drift, ratio, cosine = m.get("task_drift"), m.get("magnitude_ratio"), m.get("task_cosine")
    if drift is None or ratio is None or cosine is None:
        return None
    far = 2 * drift / (1 + ratio)
    return far, far * ratio, max(-1.0, min(1.0, cosine))


def _averaging_gap(m: Mapping[str, float]) -> float | None:
    """What averaging takes from each fine-tune: |t_a - t_b| / 2 relative to |w_base| (linear's and, for small
    angles, slerp's distance from either input), from the two norms and the task cosine."""
    g = _pair_geometry(m)
    if g is None:
        return None
    far, near, cosine = g
    return math.sqrt(max(far * far + near * near - 2 * cosine * far * near, 0.0)) / 2


def _summed_energy(m: Mapping[str, float]) -> float | None:
    """What adding takes from each fine-tune: task arithmetic moves model a by t_b and b by t_a, and DARE adds
    dropout noise of energy p/(1-p) |t|^2 per input (p = 0.5: |t|^2): both scale as sqrt(|t_a|^2 + |t_b|^2)."""
    g = _pair_geometry(m)
    if g is None:
        return None
    far, near, _ = g
    return math.sqrt(far * far + near * near)


def _sign_energy(m: Mapping[str, float]) -> float | None:
    """The energy TIES' sign election removes: the summed energy on the kept coordinates whose signs conflict."""
    energy, top = _summed_energy(m), m.get("sign_disagreement_top")
    return None if energy is None or top is None else energy * top


def _averaging_shrink(m: Mapping[str, float]) -> float | None:
    """How much of each task vector the average keeps along itself: (1 + cos |t_other| / |t_self|) / 2, the
    mean over the two inputs (1 = nothing lost, below 1/2 = the other one pulls it back)."""
    g = _pair_geometry(m)
    if g is None:
        return None
    far, near, cosine = g
    if near <= 0:
        return 0.75
    return ((1 + cosine * near / far) / 2 + (1 + cosine * far / near) / 2) / 2


def _conflict(m: Mapping[str, float]) -> float | None:
    tsv, cosine = m.get("tsv_interference"), m.get("task_cosine")
    return None if tsv is None or cosine is None else tsv * (1 - cosine) / 2


def _log(x: float | None) -> float | None:
    return None if x is None else math.log(max(x, LOG_FLOOR))


def _first_block(by_layer: Mapping[str, float]) -> float | None:
    blocks = [(int(k.rsplit(".", 1)[1]), v) for k, v in by_layer.items()
              if k.startswith("layers.") and k.rsplit(".", 1)[1].isdigit()]
    return min(blocks)[1] if blocks else None


def _moved(combine: Callable[[float, float], float], first_block: bool = False
           ) -> Callable[[list[Layer], Motion | None], float | None]:
    """A pair feature from how far each of the two models moved (whole model, or its first decoder block)."""

    def compute(layers: list[Layer], motion: Motion | None) -> float | None:
        if motion is None:
            return None
        values = [_first_block(by_layer) for by_layer in motion.by_layer] if first_block else list(motion.moved)
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return combine(*values)  # type: ignore[arg-type]

    return compute


def _whole(value: Callable[[Mapping[str, float]], float | None], log: bool = True
           ) -> Callable[[list[Layer], Motion | None], float | None]:
    """A merge-mechanism quantity (`_averaging_gap`, ...) over the whole models, from their moves and cosine."""

    def compute(layers: list[Layer], motion: Motion | None) -> float | None:
        if motion is None or motion.cosine is None:
            return None
        far, near = max(motion.moved), min(motion.moved)
        found = value({"task_drift": (far + near) / 2, "magnitude_ratio": near / far if far > 0 else 1.0,
                       "task_cosine": motion.cosine})
        return _log(found) if log else found

    return compute


def _layers_only(compute: Callable[[list[Layer]], float | None]
                 ) -> Callable[[list[Layer], Motion | None], float | None]:
    return lambda layers, motion: compute(layers)


def _log_sum(x: float, y: float) -> float:
    return math.log(max(x + y, LOG_FLOOR))


def _log_product(x: float, y: float) -> float:
    return math.log(max(x, LOG_FLOOR)) + math.log(max(y, LOG_FLOOR))


def _log_max(x: float, y: float) -> float:
    return math.log(max(x, y, LOG_FLOOR))


def _log_min(x: float, y: float) -> float:
    return math.log(max(min(x, y), LOG_FLOOR))


@dataclass(frozen=True)
class Feature:
    name: str
    needs_base: bool
    meaning: str
    compute: Callable[[list[Layer], Motion | None], float | None]


def _mean_of(value: Callable[[Mapping[str, float]], float | None], log: bool = False,
             first_block: bool = False) -> Callable[[list[Layer]], float | None]:
    """Parameter-weighted mean over the layers (with `first_block`: over the first decoder block only)."""

    def compute(layers: list[Layer]) -> float | None:
        if first_block:
            blocks = [(int(name.rsplit(".", 1)[1]), name) for name, _, _ in layers
                      if name.startswith("layers.") and name.rsplit(".", 1)[1].isdigit()]
            if not blocks:
                return None
            first = min(blocks)[1]
            layers = [row for row in layers if row[0] == first]
        m = _weighted_mean(layers, value)
        return _log(m) if log else m

    return _layers_only(compute)


FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("moved_sum", True, "log (|t_a| + |t_b|) / |w_base| over the whole models: how far both moved",
            _moved(_log_sum)),
    Feature("moved_product", True, "log |t_a| / |w_base| + log |t_b| / |w_base| (whole models)",
            _moved(_log_product)),
    Feature("moved_far", True, "log |t| / |w_base| of the model that moved farther (whole models)",
            _moved(_log_max)),
    Feature("moved_near", True, "log |t| / |w_base| of the model that moved less (whole models)",
            _moved(_log_min)),
    Feature("first_moved_sum", True, "moved_sum over the first decoder block", _moved(_log_sum, True)),
    Feature("first_moved_far", True, "moved_far over the first decoder block", _moved(_log_max, True)),
    Feature("whole_averaging_gap", True, "averaging_gap over the whole models (|t_a - t_b| / 2 / |w_base|)",
            _whole(_averaging_gap)),
    Feature("whole_summed_energy", True, "summed_energy over the whole models", _whole(_summed_energy)),
    Feature("whole_averaging_shrink", True, "averaging_shrink over the whole models",
            _whole(_averaging_shrink, log=False)),
    Feature("first_far", True, "log relative distance the farther-moved fine-tune went in the first block",
            _mean_of(_model_drift(far=True), log=True, first_block=True)),
    Feature("first_near", True, "log relative distance the nearer fine-tune went in the first block",
            _mean_of(_model_drift(far=False), log=True, first_block=True)),
    Feature("far_drift", True, "log relative distance the farther-moved fine-tune went from the base",
            _mean_of(_model_drift(far=True), log=True)),
    Feature("near_drift", True, "log relative distance the nearer fine-tune went from the base",
            _mean_of(_model_drift(far=False), log=True)),
    Feature("drift", True, "log mean relative distance both fine-tunes went from the base",
            _mean_of(_metric("task_drift"), log=True)),
    Feature("task_cosine", True, "cosine of the two task vectors (1 = they pull the same way)",
            _mean_of(_metric("task_cosine"))),
    Feature("conflict", True, "TSV interference where the task vectors disagree: tsv x (1 - cos) / 2",
            _mean_of(_conflict)),
    Feature("sign_conflict_top", True, "sign conflict among the coordinates TIES keeps",
            _mean_of(_metric("sign_disagreement_top"))),
    Feature("mass_fraction", True, "share of coordinates holding 90% of each task vector's mass",
            _mean_of(_metric("task_mass_fraction"))),
    Feature("balance", True, "min/max of the two task vectors' norms (1 = moved equally far)",
            _mean_of(_metric("magnitude_ratio"))),
    Feature("averaging_gap", True, "log |t_a - t_b| / 2 relative to the base: what averaging takes from each",
            _mean_of(_averaging_gap, log=True)),
    Feature("first_averaging_gap", True, "averaging_gap in the first decoder block",
            _mean_of(_averaging_gap, log=True, first_block=True)),
    Feature("summed_energy", True, "log sqrt(|t_a|^2 + |t_b|^2) relative to the base: what adding (and DARE's "
            "dropout noise) takes from each", _mean_of(_summed_energy, log=True)),
    Feature("first_summed_energy", True, "summed_energy in the first decoder block",
            _mean_of(_summed_energy, log=True, first_block=True)),
    Feature("sign_energy", True, "log summed energy x sign conflict on the kept coordinates (TIES' election)",
            _mean_of(_sign_energy, log=True)),
    Feature("averaging_shrink", True, "share of each task vector the average keeps along itself",
            _mean_of(_averaging_shrink)),
    Feature("distance", False, "log relative weight distance |a - b| / (|a| + |b|) of the two models",
            _mean_of(_metric("l2_distance"), log=True)),
    Feature("direction", False, "log (1 - cosine similarity) of the two models' weights",
            _mean_of(lambda m: None if "cosine_similarity" not in m else 1 - m["cosine_similarity"], log=True)),
    Feature("subspace", False, "overlap of the two models' dominant singular directions",
            _mean_of(_metric("spectral_overlap"))),
)}


def pair_features(layers: Iterable[Layer], motion: Motion | None = None) -> dict[str, float]:
    """Every feature the layers' metrics allow (parameter-weighted over the layers that have the metric), and,
    given how far each of the two models moved and the cosine of their moves (`motion`), the whole-model ones."""
    rows = [(name, int(n), metrics) for name, n, metrics in layers]
    out = {}
    for name, feature in FEATURES.items():
        value = feature.compute(rows, motion)
        if value is not None:
            out[name] = value
    return out


def raw_distance(layers: Iterable[Layer]) -> float | None:
    """Parameter-weighted mean l2_distance (0 for identical models)."""
    return _weighted_mean(list(layers), _metric("l2_distance"))


@dataclass(frozen=True)
class MethodModel:
    """retention = clip(intercept + sum coef_j (x_j - mean_j) / scale_j, 0, 1); interval from residuals."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    residual_low: float
    residual_high: float

    @classmethod
    def from_dict(cls, d: Mapping) -> MethodModel:
        return cls(tuple(d["features"]), tuple(d["mean"]), tuple(d["scale"]), tuple(d["coef"]),
                   float(d["intercept"]), float(d["residual_low"]), float(d["residual_high"]))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept, "residual_low": self.residual_low,
                "residual_high": self.residual_high}

    def contributions(self, x: Mapping[str, float]) -> dict[str, float]:
        """Each feature's push on the retention (before clipping), against the fit's average pair."""
        return {f: c * (x[f] - m) / s for f, m, s, c in zip(self.features, self.mean, self.scale, self.coef,
                                                               strict=True)}

    def raw(self, x: Mapping[str, float]) -> float:
        return self.intercept + sum(self.contributions(x).values())


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


@dataclass(frozen=True)
class Predictor:
    with_base: dict[str, MethodModel]
    without_base: dict[str, MethodModel]
    nearest_distance: float  # the smallest pair distance the fit saw
    provenance: dict

    @classmethod
    def from_dict(cls, d: Mapping) -> Predictor:
        return cls({m: MethodModel.from_dict(v) for m, v in d["with_base"].items()},
                   {m: MethodModel.from_dict(v) for m, v in d["without_base"].items()},
                   float(d["nearest_distance"]), dict(d["provenance"]))

    def to_dict(self) -> dict:
        return {"provenance": self.provenance, "nearest_distance": self.nearest_distance,
                "with_base": {m: v.to_dict() for m, v in self.with_base.items()},
                "without_base": {m: v.to_dict() for m, v in self.without_base.items()}}

    def predict(self, features: Mapping[str, float], distance: float | None = None,
                with_base: bool = True) -> dict[str, MethodPrediction]:
        """Per method: retention, 80% interval and contributions. `distance` (raw_distance) enables the
        identity prior of idempotent methods. A method whose features are missing is left out."""
        models = self.with_base if with_base else self.without_base
        out = {}
        for method, model in models.items():
            if any(f not in features for f in model.features):
                continue
            raw = model.raw(features)
            low, high = raw + model.residual_low, raw + model.residual_high
            if method in IDEMPOTENT and distance is not None and distance < self.nearest_distance:
                # closer than any pair the fit saw: shrink the expected loss toward 0 at identity
                keep = max(distance, 0.0) / self.nearest_distance
                raw, low, high = (1 - (1 - v) * keep for v in (raw, low, high))
            contributions = {k: round(v, 4) for k, v in sorted(model.contributions(features).items(),
                                                                 key=lambda kv: -abs(kv[1]))}
            retention = _clip(raw)
            out[method] = MethodPrediction(retention=round(retention, 4), low=round(min(_clip(low), retention), 4),
                                           high=round(max(_clip(high), retention), 4), used_base=with_base,
                                           contributions=contributions)
        return out


@functools.cache
def load_predictor(path: Path = PREDICTOR_PATH) -> Predictor:
    return Predictor.from_dict(json.loads(Path(path).read_text()))


def best_method(predictions: Mapping[str, MethodPrediction], tolerance: float = TIE) -> str | None:
    """The method with the highest predicted retention; within `tolerance` of it, the simplest."""
    if not predictions:
        return None
    top = max(p.retention for p in predictions.values())
    close = [m for m, p in predictions.items() if p.retention >= top - tolerance]
    return min(close, key=lambda m: SIMPLICITY.index(m) if m in SIMPLICITY else len(SIMPLICITY))


def predicted_mci(predictions: Mapping[str, MethodPrediction]) -> tuple[float, str] | None:
    """(100 x the predicted retention of the best predicted method, that method); None without predictions.
    Over the methods the product may recommend for a pair, this is its headline MCI (mergelens_mcp/mergekit/
    advice.py), the recommended method being the best prediction."""
    method = best_method(predictions)
    return None if method is None else (round(100 * predictions[method].retention, 2), method)


CONFIDENCE_LEVELS = ("low", "medium", "high")
# the MCI's confidence from its 80% interval (width in retention, 0..1): up to the first, high; the second, medium
# (a stated choice, not fitted: a quarter of the scale is about one verdict band, half of it two)
CONFIDENT_WIDTHS = (0.25, 0.5)


def interval_confidence(prediction: MethodPrediction) -> str:
    """'high', 'medium' or 'low' from the width of the prediction's 80% interval (CONFIDENT_WIDTHS)."""
    width = prediction.high - prediction.low
    return "high" if width <= CONFIDENT_WIDTHS[0] else "medium" if width <= CONFIDENT_WIDTHS[1] else "low"


def predicted_confidence(prediction: MethodPrediction, evidence: str, extrapolated: bool) -> str:
    """The lower of the interval's confidence and the evidence's (`evidence`: the comparison's own, which the
    base, the findings and what was not measured set); 'low' when the pair lies outside the fitted range."""
    if extrapolated:
        return "low"
    return min(interval_confidence(prediction), evidence, key=CONFIDENCE_LEVELS.index)


def drivers(prediction: MethodPrediction, top: int = 3, meanings: bool = True) -> str:
    """What pushed a prediction up or down against the fit's average pair, largest first, in words (with each
    feature's meaning, or only its name)."""
    ups = [(f, v) for f, v in prediction.contributions.items() if v > 0][:top]
    downs = [(f, v) for f, v in prediction.contributions.items() if v < 0][:top]

    def words(items: list[tuple[str, float]]) -> str:
        return ", ".join(f"{f} ({v:+.2f}: {FEATURES[f].meaning})" if meanings and f in FEATURES
                         else f"{f} ({v:+.2f})" for f, v in items)

    parts = ([f"pushed up by {words(ups)}"] if ups else []) + ([f"down by {words(downs)}"] if downs else [])
    return "; ".join(parts) if parts else "at the fit's average pair"


def capped_score(predicted: float, composite: float | None, outside: bool) -> float:
    """The headline MCI from 100 x a predicted retention: outside the fitted range, at most the weight-space
    composite (the prediction extrapolates there; the composite still reads the weights)."""
    return min(predicted, composite) if outside and composite is not None else predicted


def mci_source(result: CompareResult) -> str | None:
    """What the MCI of a result is, in words, where it comes from a prediction: "100 x the predicted retention of
    M", or, capped outside the fitted range, "the weight-space composite, under 100 x ... (P)". None where the MCI
    is the composite alone (mci.method is None)."""
    mci = result.mci
    if mci.method is None:
        return None
    words = f"100 x the predicted retention of {mci.method}"
    prediction = result.predictions.get(mci.method)
    if prediction is not None and mci.score is not None and mci.score < round(100 * prediction.retention, 2):
        return (f"the weight-space composite, under {words} ({100 * prediction.retention:.0f}): the pair lies "
                "outside the fitted range")
    return words


def result_motion(result: CompareResult) -> Motion | None:
    """How far the two models moved from the base, as the compare measured it (None without a base)."""
    a, b = result.models
    if a.moved is None or b.moved is None:
        return None
    return Motion((a.moved, b.moved), (dict(a.moved_by_layer), dict(b.moved_by_layer)), result.pairwise[0].task_cosine)


def predict_result(result: CompareResult, predictor: Predictor | None = None) -> dict[str, MethodPrediction]:
    """The predictions of a two-model compare (empty for three or more models, or when nothing was compared)."""
    if len(result.models) != 2 or not result.layer_metrics:
        return {}
    layers = [(lm.layer_name, lm.n_params, lm.metrics) for lm in result.layer_metrics]
    features = pair_features(layers, result_motion(result))
    with_base = result.mci.used_base and "drift" in features
    predictor = predictor or load_predictor()
    found = predictor.predict(features, raw_distance(layers), with_base=with_base)
    if with_base and not found:  # the task-vector features were not measured: the weight-space models
        found = predictor.predict(features, raw_distance(layers), with_base=False)
    return found


def outside_fit(result: CompareResult, predictor: Predictor | None = None) -> tuple[str, float] | None:
    """The feature of this pair farthest from the fit's pairs, in standard deviations, when beyond OUTSIDE_SD."""
    predictor = predictor or load_predictor()
    layers = [(lm.layer_name, lm.n_params, lm.metrics) for lm in result.layer_metrics]
    features = pair_features(layers, result_motion(result))
    with_base = result.mci.used_base and "drift" in features
    models = (predictor.with_base if with_base else predictor.without_base).values()
    z = {f: (features[f] - m) / s for model in models
         for f, m, s in zip(model.features, model.mean, model.scale, strict=True) if f in features}
    if not z:
        return None
    name = max(z, key=lambda f: abs(z[f]))
    return (name, round(z[name], 1)) if abs(z[name]) > OUTSIDE_SD else None


def extrapolated(result: CompareResult, predictor: Predictor | None = None) -> tuple[str, float] | None:
    """`outside_fit`, except for a pair whose weights are equal: the identity prior, not the fit, predicts it."""
    layers = [(lm.layer_name, lm.n_params, lm.metrics) for lm in result.layer_metrics]
    distance = raw_distance(layers)
    return None if distance is not None and distance <= 0 else outside_fit(result, predictor)


def with_predictions(result: CompareResult) -> CompareResult:
    """The result with `predictions` and a note on their scope (and on extrapolation, where it applies); an
    unvalidated draft, as the engine's `finish` step wants it."""
    if result.predictions:
        return result
    predictions = predict_result(result)
    if not predictions and len(result.models) == 2 and result.coverage.not_measured:
        return result.drafted(notes=[*result.notes, (
            "no predicted retention: the predictor reads task_drift or the weight-space metrics, which were not "
            "measured (" + ", ".join(result.coverage.not_measured) + ")"
        )])
    if not predictions:
        return result
    note = ("predicted retention per method (merged accuracy / each model's own, 0..1, 80% interval), fitted on "
            "synthetic tasks with tiny Llama-style models: a yardstick")
    if not next(iter(predictions.values())).used_base:
        note += ("; the task-vector features were not measured" if result.mci.used_base else "; no base") + \
            ": weight-space evidence alone, wider intervals"
    far = extrapolated(result)
    if far is not None:
        note += f"; outside the fitted range ({far[0]} {far[1]:+.1f} sd): extrapolated, less sure than stated"
    missing = _unpredicted(result, predictions)
    if missing:
        note += f"; not predicted: {', '.join(missing)} (their models read a feature this comparison did not " \
                "measure, e.g. the whole-model motion ModelInfo.moved)"
    return result.drafted(predictions=predictions, notes=[*result.notes, note])


def _unpredicted(result: CompareResult, predictions: Mapping[str, MethodPrediction]) -> list[str]:
    """The methods the predictor models (with the evidence these predictions used) that got no prediction."""
    predictor = load_predictor()
    models = predictor.with_base if next(iter(predictions.values())).used_base else predictor.without_base
    return sorted(m for m in models if m not in predictions)
