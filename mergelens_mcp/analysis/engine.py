"""One streaming pass over the checkpoints: each tensor of each model is read once, every metric of every
pair is computed from it, and only per-layer sums are kept, so memory follows the largest tensor.

A reader thread reads, upcasts and checks the next tensor set (that tensor in every model and the base), and
decomposes its weight matrices, while this one is measured, when both fit in the memory of the largest set.
Reading measures each tensor's norm, and a non-finite norm is the one signal that triggers the NaN/Inf scan.
Task vectors are made in place from the weights once the weight metrics are done, the base streamed block by
block from its file, so it is never held whole: a tensor set costs one float32 copy per candidate.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AnalysisCancelledError, InputError
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
from .loading import READ_BLOCK_BYTES, Checkpoint
from .metrics import Operand, dot64, task_metrics, weight_metrics
from .spectral import DEFAULT_RANK, EXACT_MAX_ELEMENTS, OVERSAMPLE, POWER_ITERS
from .zones import detect_conflict_zones

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Cancelled = Callable[[], bool]
VERSION = "0.1.0"
TRIM_ELEMENTS = 1 << 24  # sets of tensors this large first return freed heap memory to the OS
_MALLOC_TRIM: Any = None
BLOCK = 1 << 20  # elements converted at a time where a tensor is kept in its narrower stored dtype


@dataclass(frozen=True)
class AnalysisOptions:
    device: str = "auto"
    svd_rank: int = DEFAULT_RANK
    exact_svd_max_elements: int = EXACT_MAX_ELEMENTS
    threads: int | None = None  # torch threads on CPU; None: one per core, less one for the reader thread


def default_threads() -> int:
    """Cores for torch's own work: all but the one the reader thread keeps busy."""
    return max(1, (os.cpu_count() or 1) - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
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
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(options.threads or default_threads())
    try:
        sets = _read_ahead(tensors, models, base, plan, device, options)
        for done, loaded in enumerate(sets):
            if cancelled is not None and cancelled():
                sets.close()
                raise AnalysisCancelledError(f"analysis cancelled after {done} of {len(tensors)} tensors")
            name = loaded.name
            for label, count in loaded.nonfinite.items():
                nonfinite[label] += count
            role = roles[name] = classify(name)
            weights = loaded.weights
            numel = weights[0].numel()
            params_compared += numel
            ops = loaded.ops
            is_matrix = ops[0].is_matrix
            layers = []
            for i, j in pairs:
                layer = sums[(i, j)].setdefault(role.layer_name, _Sums())
                layer.n_params += numel
                layer.tensors.append(name)
                layers.append(layer)
                for m in weight_metrics():
                    if m.applies_to(ops[i]):
                        layer.add(m.name, m(ops[i], ops[j]), numel)
            svds = [op.svd for op in ops if "svd" in op.__dict__]
            del ops
            if loaded.base is not None:
                # task vectors, in place (the weights are done with), the base streamed from its file
                _subtract_base(weights, loaded.base, device)
                task_ops = [_operand(t, options, reference_norm=loaded.base_norm) for t in weights]
                for layer, (i, j) in zip(layers, pairs, strict=True):
                    for m in task_metrics():
                        if m.applies_to(task_ops[i]):
                            layer.add(m.name, m(task_ops[i], task_ops[j]), numel)
                svds += [op.svd for op in task_ops if "svd" in op.__dict__]
                del task_ops
            if is_matrix:
                matrix_params += numel
                spectral_params += numel if svds else 0
            exact += sum(1 for x in svds if x.exact)
            randomized += sum(1 for x in svds if not x.exact)
            del weights, loaded, svds
            if progress is not None:
                progress(done + 1, len(tensors), name)
    finally:
        torch.set_num_threads(previous_threads)

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
        randomized_svd_tensors=randomized, svd_rank=options.svd_rank, svd_oversample=OVERSAMPLE,
        svd_power_iterations=POWER_ITERS, exact_svd_max_elements=options.exact_svd_max_elements,
    )
    if randomized:
        notes.append(
            f"{randomized} SVDs above {options.exact_svd_max_elements:,} elements used the randomized path "
            f"(rank {options.svd_rank} + {OVERSAMPLE} oversampling, {POWER_ITERS} power iterations); "
            "smaller ones were exact"
        )
    return CompareResult(
        version=VERSION, models=infos, base=base_info, device=str(device),
        mci=_mci(pair_scores, layer_metrics, plan, used_base, findings).model_copy(
            update={"used_activations": bool(activations)}
        ),
        pairwise=pair_scores, layer_metrics=layer_metrics, conflict_zones=zones, findings=findings,
        coverage=coverage, notes=notes, elapsed_s=round(time.perf_counter() - started, 3),
    )


@dataclass(frozen=True)
class _BaseTensor:
    """Where the base's copy of a tensor is: streamed from its mapped file when used, never held whole."""

    ckpt: Checkpoint
    name: str
    count: int  # values used (fewer than stored when the rows are limited)
    zero_nonfinite: bool

    def blocks(self, device: torch.device) -> Iterator[torch.Tensor]:
        for block in self.ckpt.blocks(self.name, self.count):
            block = block.to(device=device, dtype=torch.float32)
            yield torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0) if self.zero_nonfinite else block


@dataclass
class _TensorSet:
    """One tensor of every model (float32, with its norm) and where the base's copy is."""

    name: str
    weights: list[torch.Tensor]
    ops: list[Operand]  # over `weights`, their SVDs already made by the reader thread
    base: _BaseTensor | None
    base_norm: float | None
    nonfinite: dict[str, int]


def _read_ahead(
    names: Sequence[str],
    models: list[Checkpoint],
    base: Checkpoint | None,
    plan: Plan,
    device: torch.device,
    options: AnalysisOptions,
) -> Iterator[_TensorSet]:
    """Each tensor set in turn, the next one read by a worker thread while the caller measures this one.

    A set is read ahead only when it and the current one together fit in the largest set's memory, so peak
    memory stays near one largest tensor set.
    """
    def size(name: str) -> int:
        n = sum(m.tensors[name].numel * 4 for m in models)
        return n + (READ_BLOCK_BYTES if base and name in plan.base_tensors else 0)

    def read(name: str) -> _TensorSet:
        return _read_set(name, models, base, plan, device, options)

    sizes = [size(n) for n in names]
    budget = max(sizes, default=0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelens-reader") as pool:
        ahead: Future[_TensorSet] | None = pool.submit(read, names[0]) if names else None
        for i in range(len(names)):
            assert ahead is not None
            current, ahead = ahead.result(), None
            if i + 1 < len(names) and sizes[i] + sizes[i + 1] <= budget:
                ahead = pool.submit(read, names[i + 1])
            yield current
            del current
            if ahead is None and i + 1 < len(names):
                ahead = pool.submit(read, names[i + 1])


def _read_set(
    name: str,
    models: list[Checkpoint],
    base: Checkpoint | None,
    plan: Plan,
    device: torch.device,
    options: AnalysisOptions,
) -> _TensorSet:
    """Read one tensor set and decompose its weight matrices: the SVDs are the bulk of the work, and making
    the weights' here and the task vectors' on the analysing thread splits it between two cores."""
    if models[0].tensors[name].numel >= TRIM_ELEMENTS:
        _trim_heap()
    rows = plan.row_limits.get(name)
    nonfinite: dict[str, int] = {}
    weights, norms = [], []
    for m in models:
        tensor, norm = _read(m, name, rows, device, torch.float32, nonfinite)
        weights.append(tensor)
        norms.append(norm)
    base_tensor = base_norm = None
    if base is not None and name in plan.base_tensors:
        base_tensor, base_norm = _scan_base(base, name, weights[0].numel(), nonfinite)
    ops = [_operand(t, options, norm=n) for t, n in zip(weights, norms, strict=True)]
    for op in ops:
        if op.is_matrix:
            _ = op.svd
    return _TensorSet(name, weights, ops, base_tensor, base_norm, nonfinite)


def _scan_base(
    base: Checkpoint, name: str, count: int, nonfinite: dict[str, int]
) -> tuple[_BaseTensor, float]:
    """The base tensor's norm from one streamed pass; a second pass counts NaN/Inf only if not finite."""
    norm = _blocks_norm(b.float() for b in base.blocks(name, count))
    if math.isfinite(norm):
        return _BaseTensor(base, name, count, False), norm
    bad = sum(int((~torch.isfinite(b)).sum()) for b in base.blocks(name, count))
    if bad:
        nonfinite[base.label] = nonfinite.get(base.label, 0) + bad
    clean = (torch.nan_to_num(b.double(), nan=0.0, posinf=0.0, neginf=0.0) for b in base.blocks(name, count))
    return _BaseTensor(base, name, count, bool(bad)), _blocks_norm(clean)


def _subtract_base(weights: list[torch.Tensor], base: _BaseTensor, device: torch.device) -> None:
    """weights[i] -= base for every i, one block of the base at a time."""
    flats, start = [w.view(-1) for w in weights], 0
    for block in base.blocks(device):
        for flat in flats:
            flat[start:start + block.numel()].sub_(block)
        start += block.numel()


def _read(
    ckpt: Checkpoint, name: str, rows: int | None, device: torch.device, dtype: torch.dtype,
    nonfinite: dict[str, int],
) -> tuple[torch.Tensor, float]:
    """A tensor and its norm; NaN/Inf (whose presence makes the norm non-finite) are counted and read as 0."""
    tensor = ckpt.read(name, device, dtype)
    if rows is not None and tensor.dim() >= 1 and tensor.shape[0] > rows:
        tensor = tensor[:rows]
    norm = _norm(tensor)
    if not math.isfinite(norm):
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        if count:
            nonfinite[ckpt.label] = nonfinite.get(ckpt.label, 0) + count
            tensor = torch.where(bad, torch.zeros_like(tensor), tensor)
        del bad
        norm = _norm(tensor, torch.float64)  # without NaN/Inf, only an overflow in float32 is left
    return tensor, norm


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS before a large set is read (glibc only; else a no-op).

    Blocks freed by earlier tensors otherwise stay resident as fragments, and peak memory would creep up
    through a run instead of following the largest tensor.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _norm(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """L2 norm as `Operand.norm` measures it (`dot64`), a block at a time in `dtype` if stored otherwise."""
    flat = tensor.reshape(-1)
    if flat.dtype == dtype:
        return math.sqrt(max(dot64(flat, flat), 0.0))
    return _blocks_norm(flat[i:i + BLOCK].to(dtype) for i in range(0, flat.numel(), BLOCK))


def _blocks_norm(blocks: Iterable[torch.Tensor]) -> float:
    return math.sqrt(max(sum(dot64(b, b) for b in blocks), 0.0))


def _operand(
    tensor: torch.Tensor,
    options: AnalysisOptions,
    reference_norm: float | None = None,
    norm: float | None = None,
) -> Operand:
    if tensor.dim() > 2:
        tensor = tensor.reshape(tensor.shape[0], -1)
    return Operand(
        tensor, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements,
        reference_norm=reference_norm, norm=norm,
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
