"""One streaming pass over the checkpoints: each tensor of each model is read once, every metric of every
pair is computed from it, and only per-layer sums are kept, so memory follows the largest tensor."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

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
from . import score as mci
from .compat import Plan, plan_comparison
from .layers import TensorRole, classify, group_sort_key, position
from .loading import Checkpoint
from .metrics import Operand, task_metrics, weight_metrics
from .spectral import DEFAULT_RANK, EXACT_MAX_ELEMENTS
from .zones import detect_conflict_zones

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Cancelled = Callable[[], bool]
VERSION = "0.1.0"


@dataclass(frozen=True)
class AnalysisOptions:
    device: str = "auto"
    svd_rank: int = DEFAULT_RANK
    exact_svd_max_elements: int = EXACT_MAX_ELEMENTS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import InputError

        raise InputError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        from ..errors import InputError

        raise InputError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


@dataclass
class _Sums:
    """Running numel-weighted sums of one layer's metrics for one pair."""

    values: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    n_params: int = 0
    tensors: list[str] = field(default_factory=list)

    def add(self, name: str, value: float, weight: float) -> None:
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
) -> CompareResult:
    """Compare two or more checkpoints (optionally against their common base) in one pass.

    `activations` optionally holds per-layer activation CKA for each pair of model indices (see
    analysis/activations.py); it joins each layer's metrics as `activation_cka` and enters the MCI.
    """
    options = options or AnalysisOptions()
    started = time.perf_counter()
    device = resolve_device(options.device)
    plan = plan_comparison(models, base)
    findings = list(plan.findings)
    labels = [m.label for m in models]
    pairs = list(itertools.combinations(range(len(models)), 2))
    nonfinite = {m.label: 0 for m in [*models, *([base] if base else [])]}
    sums: dict[tuple[int, int], dict[str, _Sums]] = {p: {} for p in pairs}
    roles: dict[str, TensorRole] = {}
    exact = randomized = 0
    matrix_params = spectral_params = params_compared = 0

    tensors = [] if plan.fatal else plan.tensors
    for done, name in enumerate(tensors):
        if cancelled is not None and cancelled():
            raise AnalysisCancelledError(f"analysis cancelled after {done} of {len(tensors)} tensors")
        rows = plan.row_limits.get(name)
        weights = [_read(m, name, rows, device, nonfinite) for m in models]
        base_tensor = _read(base, name, rows, device, nonfinite) if base and name in plan.base_tensors else None
        ops = [_operand(t, options) for t in weights]
        task_ops = None
        if base_tensor is not None:
            base_norm = float(torch.linalg.vector_norm(base_tensor))
            task_ops = [_operand(t - base_tensor, options, base_norm) for t in weights]
            del base_tensor
        role = roles[name] = classify(name)
        numel = weights[0].numel()
        params_compared += numel
        if ops[0].is_matrix:
            matrix_params += numel
            spectral_params += numel
        for i, j in pairs:
            layer = sums[(i, j)].setdefault(role.layer_name, _Sums())
            layer.n_params += numel
            layer.tensors.append(name)
            for m in weight_metrics():
                if m.applies_to(ops[i]):
                    layer.add(m.name, m(ops[i], ops[j]), numel)
            if task_ops is not None:
                for m in task_metrics():
                    if m.applies_to(task_ops[i]):
                        layer.add(m.name, m(task_ops[i], task_ops[j]), numel)
        for op in [*ops, *(task_ops or [])]:
            if "svd" in op.__dict__:
                exact, randomized = (exact + 1, randomized) if op.svd.exact else (exact, randomized + 1)
        del weights, ops, task_ops
        if progress is not None:
            progress(done + 1, len(tensors), name)

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
                components=parts, score=round(100 * mci.layer_score(parts), 2),
            ))
        layer_metrics.extend(pair_layers)
        zones.extend(detect_conflict_zones(pair_layers, positions))
        score = None if plan.fatal or not pair_layers else mci.overall_score(
            [lm.score / 100 for lm in pair_layers], [lm.n_params for lm in pair_layers]
        )
        pair_scores.append(PairScore(model_a=labels[i], model_b=labels[j], score=score, verdict=mci.verdict_for(score)))

    infos = [_model_info(m, nonfinite[m.label]) for m in models]
    base_info = _model_info(base, nonfinite[base.label]) if base else None
    used_base = bool(base and plan.base_tensors and not plan.fatal)
    notes = _notes(base, used_base)
    coverage = Coverage(
        tensors_compared=len(tensors), tensors_total=len(models[0].tensors), params_compared=params_compared,
        matrix_params=matrix_params, spectral_params=spectral_params, exact_svd_tensors=exact,
        randomized_svd_tensors=randomized, svd_rank=options.svd_rank,
    )
    if randomized:
        notes.append(
            f"{randomized} SVDs above {options.exact_svd_max_elements:,} elements used the randomized path "
            f"(rank {options.svd_rank} + oversampling, 2 power iterations); smaller ones were exact"
        )
    return CompareResult(
        version=VERSION, models=infos, base=base_info, device=str(device),
        mci=_mci(pair_scores, layer_metrics, plan, used_base, findings).model_copy(
            update={"used_activations": bool(activations)}
        ),
        pairwise=pair_scores, layer_metrics=layer_metrics, conflict_zones=zones, findings=findings,
        coverage=coverage, notes=notes, elapsed_s=round(time.perf_counter() - started, 3),
    )


def _read(
    ckpt: Checkpoint, name: str, rows: int | None, device: torch.device, nonfinite: dict[str, int]
) -> torch.Tensor:
    tensor = ckpt.read(name, device)
    if rows is not None and tensor.dim() >= 1 and tensor.shape[0] > rows:
        tensor = tensor[:rows]
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count:
        nonfinite[ckpt.label] += count
        tensor = torch.where(bad, torch.zeros_like(tensor), tensor)
    return tensor


def _operand(tensor: torch.Tensor, options: AnalysisOptions, reference_norm: float | None = None) -> Operand:
    if tensor.dim() > 2:
        tensor = tensor.reshape(tensor.shape[0], -1)
    return Operand(
        tensor, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements,
        reference_norm=reference_norm,
    )


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
    )


def _notes(base: Checkpoint | None, used_base: bool) -> list[str]:
    if used_base:
        return []
    skipped = ", ".join(m.name for m in task_metrics())
    if base is None:
        return [f"no base model given: the task-vector metrics ({skipped}) were skipped; pass --base for them"]
    return [f"the base model could not be paired with the candidates: {skipped} were skipped"]


def _mci(
    pair_scores: list[PairScore], layers: list[LayerMetrics], plan: Plan, used_base: bool, findings: list[Finding]
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
    return MCI(score=worst.score, verdict=worst.verdict, confidence=confidence, components=means,
               used_base=used_base, reasons=reasons)


DESCRIPTIONS = {
    "direction": "weight directions (cosine)", "distance": "weight distance (L2)",
    "subspace": "top singular subspaces", "rank": "spectrum shapes (effective rank)",
    "distribution": "weight value distributions (KL)", "alignment": "task-vector alignment",
    "sign_agreement": "task-vector sign agreement", "interference": "singular-direction interference (TSV)",
    "balance": "task-vector magnitude balance", "drift": "distance moved from the base",
    "representation": "activation similarity (CKA)",
}


def _component_reasons(means: dict[str, float]) -> list[str]:
    if not means:
        return []
    ranked = sorted(means.items(), key=lambda kv: kv[1])
    reasons = [f"weakest: {DESCRIPTIONS[n]} at {v:.2f} (1 = ideal)" for n, v in ranked[:2] if v < 0.8]
    best, value = ranked[-1]
    reasons.append(f"strongest: {DESCRIPTIONS[best]} at {value:.2f}")
    return reasons
