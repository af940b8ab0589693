"""A comparison of two or more checkpoints: plan -> stream -> aggregate -> assemble.

The plan (compat.py) says which tensors pair up; the stream (stream.py) reads each tensor of each model once
and measures every metric of every pair from it; only per-layer sums are kept here, so memory follows the
largest tensor set; the result is assembled once, its strings redacted, with the caller's strategy.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._version import VERSION
from ..errors import AnalysisCancelledError
from ..models import (
    MCI,
    CompareResult,
    Coverage,
    Finding,
    FindingLevel,
    LayerMetrics,
    ModelInfo,
    PairScore,
    Verdict,
)
from ..security.redact import redact_json
from . import score as mci
from . import stream
from .adapters import BASE_NOT_READ, adapter_findings, adapter_info, adapters_of, coverage_note, low_rank_count
from .compat import Plan, plan_comparison
from .layers import TensorRole, classify, group_sort_key, position
from .loading import Checkpoint
from .metrics import REGISTRY, UNAVAILABLE, base_sample_estimates, task_metrics
from .spectral import OVERSAMPLE, POWER_ITERS
from .types import AnalysisOptions, Cancelled, Device, Progress
from .zones import detect_conflict_zones

Finish = Callable[[CompareResult], CompareResult]  # an unvalidated draft -> the draft completed (strategy, advice)


def resolve_device(device: Device | str) -> torch.device:
    """The torch device to measure on; an InputError for a value that is not auto, cpu or cuda, or for cuda
    where torch sees no GPU."""
    return torch.device(Device.parse(device).torch_name)


@dataclass
class _Sums:
    """Running numel-weighted sums of one layer's metrics for one pair."""

    values: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    n_params: int = 0
    tensors: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # metric -> tensors where it could not be computed
    unmeasured: dict[str, int] = field(default_factory=dict)  # metric -> tensors where the base was not read

    def add(self, name: str, value: float | None, weight: float) -> None:
        if value is None:  # not computable on this tensor: it adds nothing to the layer's mean
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        self.values[name] = self.values.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: round(v / self.weights[k], 6) for k, v in self.values.items() if self.weights[k] > 0}


def analyze(
    models: list[Checkpoint],
    base: Checkpoint | None = None,
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    activations: Mapping[tuple[int, int], Mapping[str, float]] | None = None,
    finish: Finish | None = None,
) -> CompareResult:
    """Compare two or more checkpoints (optionally against their common base) in one pass.

    `activations` optionally holds per-layer activation CKA for each pair of model indices (see
    analysis/activations.py); it joins each layer's metrics as `activation_cka` and enters the MCI.
    `finish` completes an unvalidated draft of the result (the caller's strategy and decision); the result is
    then built once, with every string redacted.
    """
    options = options or AnalysisOptions()
    started = time.perf_counter()
    device = resolve_device(options.device)
    plan = plan_comparison(models, base)
    for found in adapter_findings(models, base):  # LoRA adapters: bases, targets, ranks, DoRA
        plan.add(found.level, found.code, found.message, found.fix)
    findings = list(plan.findings)
    labels = [m.label for m in models]
    pairs = list(itertools.combinations(range(len(models)), 2))
    nonfinite = {m.label: 0 for m in [*models, *([base] if base else [])]}
    sums: dict[tuple[int, int], dict[str, _Sums]] = {p: {} for p in pairs}
    roles: dict[str, TensorRole] = {}
    exact = randomized = 0
    moved: dict[str, list[float]] = {}  # layer -> each model's |model - base|^2, then |base|^2
    task_dots = dict.fromkeys(pairs, 0.0)  # <t_i, t_j> over the model, from each tensor's cosine and norms
    matrix_params = spectral_params = params_compared = 0

    tensors = [] if plan.fatal else plan.tensors
    factors_only = not options.read_base and adapters_of(models, base)  # the base read on its row sample
    unmeasured: dict[str, None] = {}
    sampled_rows = sampled_of = sampled_bytes = 0  # the base's row sample, without read_base
    measured_sets = stream.measured_sets(
        tensors, stream.Run(models, base, plan, device, options, pairs, factors_only)
    )
    try:
        for done, measured in enumerate(measured_sets):
            if cancelled is not None and cancelled():
                raise AnalysisCancelledError(f"analysis cancelled after {done} of {len(tensors)} tensors")
            name = measured.name
            for label, count in measured.nonfinite.items():
                nonfinite[label] += count
            role = roles[name] = classify(name)
            numel = measured.numel
            params_compared += numel
            for (i, j), values in zip(pairs, measured.values, strict=True):
                layer = sums[(i, j)].setdefault(role.layer_name, _Sums())
                layer.n_params += numel
                layer.tensors.append(name)
                for metric_name, value in values.items():
                    layer.add(metric_name, value, numel)
                for metric_name in measured.unmeasured:
                    layer.unmeasured[metric_name] = layer.unmeasured.get(metric_name, 0) + 1
            unmeasured.update(dict.fromkeys(measured.unmeasured))
            sampled_rows += measured.base_sample[0]
            sampled_of += measured.base_sample[1]
            sampled_bytes += measured.base_sample[2]
            if measured.task_norms:
                squares = moved.setdefault(role.layer_name, [0.0] * (len(models) + 1))
                for k, norm in enumerate((*measured.task_norms, measured.base_norm)):
                    squares[k] += norm * norm
                for (i, j), values in zip(pairs, measured.values, strict=True):
                    cosine = values.get("task_cosine")
                    if cosine is not None:
                        task_dots[(i, j)] += cosine * measured.task_norms[i] * measured.task_norms[j]
            if measured.is_matrix:
                matrix_params += numel
                spectral_params += numel if measured.svds else 0
            exact += sum(1 for x in measured.svds if x.exact)
            randomized += sum(1 for x in measured.svds if not x.exact)
            del measured
            if progress is not None:
                progress(done + 1, len(tensors), name)
    finally:
        measured_sets.close()

    for label, count in nonfinite.items():
        if count:
            findings.append(Finding(
                level=FindingLevel.WARNING, code="nonfinite_values",
                message=f"{label} holds {count:,} NaN or Inf values; they were read as 0",
                fix="check how this checkpoint was saved; a merge would propagate these values",
            ))

    layer_metrics: list[LayerMetrics] = []
    pair_scores: list[PairScore] = []
    zones = []
    positions = {}
    for (i, j) in pairs:
        ordered = sorted(sums[(i, j)].items(), key=lambda kv: group_sort_key(_role_of(kv[1], roles)))
        pair_layers = []
        for layer_name, s in ordered:
            role = _role_of(s, roles)
            positions[layer_name] = position(role, plan.n_blocks)
            metrics = s.means()
            cka = (activations or {}).get((i, j), {}).get(layer_name)
            if cka is not None:
                metrics["activation_cka"] = cka
            parts = {k: round(v, 6) for k, v in mci.components(metrics).items()}
            pair_layers.append(LayerMetrics(
                model_a=labels[i], model_b=labels[j], layer_name=layer_name, layer_index=role.layer_index,
                kind=role.kind, n_params=s.n_params, tensor_names=s.tensors, metrics=metrics,
                components=parts, score=round(100 * mci.layer_score(parts), 2), unavailable=_unavailable(s),
            ))
        layer_metrics.extend(pair_layers)
        zones.extend(detect_conflict_zones(pair_layers, positions))
        score = None if plan.fatal or not pair_layers else mci.overall_score(
            [lm.score / 100 for lm in pair_layers], [lm.n_params for lm in pair_layers]
        )
        pair_scores.append(PairScore(model_a=labels[i], model_b=labels[j], score=score, verdict=mci.verdict_for(score),
                                     task_cosine=_task_cosine(moved, task_dots[(i, j)], i, j)))

    infos = [_model_info(m, nonfinite[m.label]).model_copy(update=_moved(moved, k)) for k, m in enumerate(models)]
    base_info = _model_info(base, nonfinite[base.label]) if base else None
    used_base = bool(base and plan.base_tensors and not plan.fatal)
    not_measured = sorted(unmeasured)
    base_sampled = [] if not sampled_of else [m.name for m in REGISTRY.values() if base_sample_estimates(m)]
    base_bytes = sum(base.tensors[n].nbytes for n in tensors if n in plan.base_tensors) if base else 0
    notes = _notes(base, used_base) + _unavailable_notes(sums) + coverage_note(
        models, tensors, not_measured, base_sampled, (sampled_rows, sampled_of, sampled_bytes, base_bytes)
    )
    coverage = Coverage(
        tensors_compared=len(tensors), tensors_total=len(models[0].tensors), params_compared=params_compared,
        matrix_params=matrix_params, spectral_params=spectral_params, exact_svd_tensors=exact,
        randomized_svd_tensors=randomized, svd_rank=options.svd_rank, svd_oversample=OVERSAMPLE,
        svd_power_iterations=POWER_ITERS, exact_svd_max_elements=options.exact_svd_max_elements,
        low_rank_tensors=low_rank_count(models, tensors), base_read=used_base and not factors_only,
        not_measured=not_measured, base_sampled=base_sampled, base_sample_rows=sampled_rows, base_rows=sampled_of,
        base_bytes_read=sampled_bytes, base_bytes_share=round(sampled_bytes / base_bytes, 6) if base_bytes else 0.0,
    )
    if randomized:
        notes.append(
            f"{randomized} SVDs above {options.exact_svd_max_elements:,} elements used the randomized path "
            f"(rank {options.svd_rank} + {OVERSAMPLE} oversampling, {POWER_ITERS} power iterations); "
            "smaller ones were exact"
        )
    return _assemble(finish, dict(
        version=VERSION, models=infos, base=base_info, device=str(device),
        mci=_mci(pair_scores, layer_metrics, plan, used_base, findings, not_measured).model_copy(
            update={"used_activations": bool(activations)}
        ),
        pairwise=pair_scores, layer_metrics=layer_metrics, conflict_zones=zones, findings=findings,
        coverage=coverage, notes=notes, elapsed_s=round(time.perf_counter() - started, 3),
    ))


def _assemble(finish: Finish | None, fields: dict[str, Any]) -> CompareResult:
    """The result, built once: `finish` completes an unvalidated draft of it (the strategy, the decision), and
    every string of the result (paths, tensor names, messages, the strategy's YAML) is redacted as it is built."""
    draft = CompareResult.model_construct(**fields, strategy=None)
    if finish is not None:
        draft = finish(draft)
    return CompareResult.model_validate(redact_json(draft.model_dump(mode="json")))


def _role_of(s: _Sums, roles: dict[str, TensorRole]) -> TensorRole:
    return roles[s.tensors[0]]


def _model_info(ckpt: Checkpoint, nonfinite: int) -> ModelInfo:
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    return ModelInfo(
        label=ckpt.label, source=ckpt.source, resolved=str(ckpt.root if len(ckpt.files) > 1 else ckpt.files[0]),
        architecture=ckpt.architecture, n_tensors=len(ckpt.tensors), n_params=ckpt.n_params, dtypes=dtypes,
        files=len(ckpt.files), skipped_tensors=ckpt.skipped_tensors, nonfinite_values=nonfinite,
        adapter=adapter_info(ckpt),
    )


def _moved(moved: dict[str, list[float]], k: int) -> dict[str, Any]:
    """Model k's `moved` and `moved_by_layer`: its task vector's norm relative to the base's, over every
    tensor compared with the base and per layer (empty without a base)."""
    if not moved:
        return {}

    def ratio(squares: float, reference: float) -> float | None:  # None where a value overflowed its square
        value = math.sqrt(squares / reference) if reference > 0 else math.nan
        return round(value, 6) if math.isfinite(value) else None

    by_layer = {name: ratio(s[k], s[-1]) for name, s in moved.items()}
    total, reference = (sum(s[i] for s in moved.values()) for i in (k, -1))
    return {"moved": ratio(total, reference), "moved_by_layer": {n: v for n, v in by_layer.items() if v is not None}}


def _task_cosine(moved: dict[str, list[float]], dot: float, i: int, j: int) -> float | None:
    """<t_i, t_j> / (|t_i| |t_j|) over every tensor compared with the base (None without one)."""
    if not moved:
        return None
    norms = [math.sqrt(sum(s[k] for s in moved.values())) for k in (i, j)]
    if not (math.isfinite(dot) and all(map(math.isfinite, norms))):  # a value overflowed its square
        return None
    if min(norms) <= 0:
        return 1.0 if max(norms) <= 0 else 0.0  # as the metric task_cosine says for untouched tensors
    return round(max(-1.0, min(1.0, dot / (norms[0] * norms[1]))), 6)


def _notes(base: Checkpoint | None, used_base: bool) -> list[str]:
    if used_base:
        return []
    skipped = ", ".join(m.name for m in task_metrics())
    if base is None:
        return [f"no base model given: the task-vector metrics ({skipped}) were skipped; pass --base for them"]
    return [f"the base model could not be paired with the candidates: {skipped} were skipped"]


def _unavailable(s: _Sums) -> dict[str, str]:
    """Why each metric that some of the layer's tensors could not give is partial or absent in the layer."""
    out = {}
    for why, counts, more in ((UNAVAILABLE, s.skipped, ""), ("not measured", s.unmeasured, f" ({BASE_NOT_READ})")):
        for name, count in counts.items():
            where = f"{why} on {count} of the layer's {len(s.tensors)} tensors{more}"
            out[name] = f"{where}; the value averages the others" if name in s.weights else f"{where}; left out"
    return out


def _unavailable_notes(sums: dict[tuple[int, int], dict[str, _Sums]]) -> list[str]:
    counts: dict[str, int] = {}
    for layers in sums.values():
        for s in layers.values():
            for name in s.skipped:
                counts[name] = counts.get(name, 0) + 1
    return [
        f"{name} could not be computed on some tensors of {n} layer(s) ({UNAVAILABLE}): they are left out of "
        "its mean, never read as a number; each layer's `unavailable` says where"
        for name, n in counts.items()
    ]


def _mci(
    pair_scores: list[PairScore], layers: list[LayerMetrics], plan: Plan, used_base: bool, findings: list[Finding],
    not_measured: list[str],
) -> MCI:
    if plan.fatal or not layers:
        reasons = plan.fatal or ["no tensors could be compared"]
        return MCI(score=None, verdict=Verdict.INCOMPATIBLE, confidence="high", components={},
                   used_base=used_base, reasons=reasons)
    worst = min(pair_scores, key=lambda p: p.score if p.score is not None else -1.0)
    totals: dict[str, list[float]] = {}
    for lm in layers:
        for name, value in lm.components.items():
            totals.setdefault(name, []).append(value)
    means = {name: round(sum(v) / len(v), 4) for name, v in totals.items()}
    reasons = []
    if len(pair_scores) > 1:
        reasons.append(f"weakest pair: {worst.model_a} + {worst.model_b} ({worst.score:.1f}); a merge of all "
                       "models is as risky as its weakest pair")
    reasons.extend(_component_reasons(means))
    warnings = [f.message for f in findings if f.level is FindingLevel.WARNING]
    reasons.extend(warnings[:3])
    if not used_base:
        reasons.append("no base model: only weight similarity was measured, not whether the fine-tunes conflict")
    confidence = "high" if used_base and not warnings else "medium" if used_base or not warnings else "low"
    if not_measured:
        confidence = _less_sure(confidence, reasons, layers, not_measured)
    return MCI(score=worst.score, verdict=worst.verdict, confidence=confidence, components=means,
               used_base=used_base, reasons=reasons, composite=worst.score)


SPECTRAL_ONLY_DRIFT = 0.05  # task_drift up to which the weights' unmeasured spectra moved the score <= ~3 points


def _less_sure(confidence: str, reasons: list[str], layers: list[LayerMetrics], not_measured: list[str]) -> str:
    """LoRA adapters of one base compared without reading the base whole: the confidence one step less where what
    is not measured can move the score: any metric but the weights' spectral ones (the base was not read at
    all), or those when the adapters moved their base far (their subspace and rank components, left out, then
    held the score up: on the test fixtures the score read 6 points under read_base's at task_drift 0.2, 10 at 3)."""
    drifts = [lm.metrics["task_drift"] for lm in layers if "task_drift" in lm.metrics]
    drift = max(drifts, default=0.0)
    spectral = {m.name for m in REGISTRY.values() if m.matrix_only and not m.needs_base}
    if set(not_measured) <= spectral:
        reasons.append(
            "LoRA adapters of one base, with the base read on a seeded sample of rows: the weights' cosine, "
            "distance and distribution and task_drift estimated from it; not measured: "
            f"{', '.join(not_measured)} (the weights' SVDs need every row), so the subspace and rank components "
            + ("are left out (these adapters move their base little: they would add little)"
               if drift <= SPECTRAL_ONLY_DRIFT else
               f"are left out, and with a task_drift up to {drift:.2f} the score may read several points lower "
               "than with read_base, which measures them")
        )
        return confidence if drift <= SPECTRAL_ONLY_DRIFT else _step_down(confidence)
    reasons.append(
        "LoRA adapters of one base, measured from their factors without the base's values on some tensors: "
        f"not measured: {', '.join(not_measured)}; read_base measures them"
    )
    return _step_down(confidence)


def _step_down(confidence: str) -> str:
    return "medium" if confidence == "high" else "low"


def _component_reasons(means: dict[str, float]) -> list[str]:
    if not means:
        return []
    ranked = sorted(means.items(), key=lambda kv: kv[1])
    words = mci.CATALOGUE
    reasons = [f"weakest: {words[n].description} at {v:.2f} (1 = ideal)" for n, v in ranked[:2] if v < 0.8]
    best, value = ranked[-1]
    reasons.append(f"strongest: {words[best].description} at {value:.2f}")
    return reasons
