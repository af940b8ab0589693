"""One streaming pass over the checkpoints: each tensor of each model is read once, every metric of every
pair is computed from it, and only per-layer sums are kept, so memory follows the largest tensor set.

Tensors are viewed in place in the memory-mapped files, in their stored dtype (bfloat16 for most
checkpoints): nothing is copied or upcast whole. For each tensor set (that tensor in every model and the
base) a pool of worker threads, one per core, runs two kinds of job: one elementwise pass, which upcasts a
chunk of every model and the base at a time and takes every sum the elementwise metrics need (task vectors,
model - base, are formed chunk by chunk inside it), and one SVD per matrix operand. The next sets are queued
while the last SVDs of this one run, as long as their stored bytes together stay within the largest set's.
A non-finite norm is the one signal that triggers the NaN/Inf scan, after which the set is measured again
from cleaned copies.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from .loading import Checkpoint
from .metrics import NATIVE, REGISTRY, UNAVAILABLE, Operand, pair_sums, task_metrics, weight_and_task_sums
from .spectral import DEFAULT_RANK, EXACT_MAX_ELEMENTS, OVERSAMPLE, POWER_ITERS, SVD
from .zones import detect_conflict_zones

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Cancelled = Callable[[], bool]
VERSION = "0.1.0"
LARGE = 1 << 24  # elements: such sets first return freed heap memory to the OS, and build one sketch at a time
_ONE_LARGE_SKETCH = threading.Lock()


@dataclass(frozen=True)
class AnalysisOptions:
    device: str = "auto"
    svd_rank: int = DEFAULT_RANK
    exact_svd_max_elements: int = EXACT_MAX_ELEMENTS
    threads: int | None = None  # worker threads on CPU, one core each; None: one per core


def default_threads() -> int:
    """Worker threads on CPU, each running torch on one core: one per core."""
    return max(1, os.cpu_count() or 1)


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
    skipped: dict[str, int] = field(default_factory=dict)  # metric -> tensors where it could not be computed

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
    workers = 1 if device.type != "cpu" else options.threads or default_threads()
    _tune_heap()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per worker thread
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergelens-worker") as pool:
            stream = _measured_sets(tensors, _Run(models, base, plan, device, options, pairs, pool))
            for done, measured in enumerate(stream):
                if cancelled is not None and cancelled():
                    stream.close()
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
                if measured.is_matrix:
                    matrix_params += numel
                    spectral_params += numel if measured.svds else 0
                exact += sum(1 for x in measured.svds if x.exact)
                randomized += sum(1 for x in measured.svds if not x.exact)
                del measured
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
                components=parts, score=round(100 * mci.layer_score(parts), 2), unavailable=_unavailable(s),
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
    notes = _notes(base, used_base) + _unavailable_notes(layer_metrics)
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
class _Run:
    """What every tensor set of one analysis is measured with."""

    models: list[Checkpoint]
    base: Checkpoint | None
    plan: Plan
    device: torch.device
    options: AnalysisOptions
    pairs: list[tuple[int, int]]
    pool: ThreadPoolExecutor

    def checkpoints(self, name: str) -> list[Checkpoint]:
        """The checkpoints one tensor is read from: every model's, and the base's where it pairs with them."""
        return [*self.models, *([self.base] if self.base is not None and name in self.plan.base_tensors else [])]


@dataclass
class _Set:
    """One tensor of every model (and the base), viewed as stored, its operands and the jobs measuring them."""

    name: str
    checkpoints: list[Checkpoint]
    weights: list[Operand]
    tasks: list[Operand]  # model - base, when the base has this tensor
    base: Operand | None
    nonfinite: dict[str, int]
    elementwise: Future[list[dict[str, float]] | None] | None = None  # None: the set holds NaN or Inf
    svds: list[Future[SVD]] = field(default_factory=list)


@dataclass(frozen=True)
class _Measured:
    """What one tensor set contributed: every metric of every pair, and the SVDs made."""

    name: str
    numel: int
    is_matrix: bool
    values: list[dict[str, float]]  # per pair, in the order of `pairs`
    svds: list[SVD]
    nonfinite: dict[str, int]


def _measured_sets(names: Sequence[str], run: _Run) -> Iterator[_Measured]:
    """Each tensor set measured, in order, by the pool's workers.

    A set's elementwise pass and each of its SVDs are separate jobs, so the workers share a set's work and
    start on the next set while the last SVD of this one runs. Sets are opened ahead while their stored bytes
    together stay within the largest set's, so memory follows the largest tensor set.
    """
    sizes = [sum(c.tensors[n].nbytes for c in run.checkpoints(n)) for n in names]
    budget = max(sizes, default=0)
    window: deque[_Set] = deque()
    opened = held = 0
    try:
        for i in range(len(names)):
            while opened < len(names) and (not window or held + sizes[opened] <= budget):
                window.append(_open_set(names[opened], run))
                held += sizes[opened]
                opened += 1
            current = window.popleft()
            try:
                measured = _finish_set(current, run)
            finally:
                for job in _jobs(current):
                    job.cancel()  # only on an error: otherwise all are done
                _release(current)
            held -= sizes[i]
            yield measured
    finally:
        for pending in window:
            for job in _jobs(pending):
                job.cancel()
        for pending in window:
            for job in _jobs(pending):
                if not job.cancelled():
                    job.exception()  # wait: the views must outlive the jobs that read them
            _release(pending)


def _jobs(current: _Set) -> list[Future[Any]]:
    return [*([current.elementwise] if current.elementwise is not None else []), *current.svds]


def _open_set(name: str, run: _Run) -> _Set:
    """View one tensor of every model in place and queue its jobs: the elementwise pass and one SVD per
    matrix operand (a set found to hold NaN or Inf is measured again once its values are cleaned)."""
    rows = run.plan.row_limits.get(name)
    checkpoints = run.checkpoints(name)
    if run.models[0].tensors[name].numel >= LARGE:
        _trim_heap()
    for ckpt in checkpoints:
        ckpt.prefetch(name)
    views = [_view(ckpt, name, rows, run.device) for ckpt in checkpoints]
    base_view = views.pop() if len(checkpoints) > len(run.models) else None
    current = _Set(name, checkpoints, [], [], None, {})
    _make_operands(current, views, base_view, run.options)
    current.elementwise = run.pool.submit(_elementwise, current, run.pairs, True)
    current.svds = [run.pool.submit(_svd, op) for op in [*current.weights, *current.tasks] if op.is_matrix]
    return current


def _svd(op: Operand) -> SVD:
    """The operand's SVD. A task vector's needs a bfloat16 copy of it (a stored matrix's is its own view):
    for large ones, one such copy at a time, so peak memory is one copy above the tensor set's."""
    if op.base is None or op.numel < LARGE:
        return op.svd
    with _ONE_LARGE_SKETCH:
        return op.svd


def _view(ckpt: Checkpoint, name: str, rows: int | None, device: torch.device) -> torch.Tensor:
    tensor = ckpt.view(name)
    if rows is not None and tensor.dim() >= 1 and tensor.shape[0] > rows:
        tensor = tensor[:rows]
    if tensor.dim() > 2:
        tensor = tensor.reshape(tensor.shape[0], -1)
    return tensor.to(device)


def _make_operands(
    current: _Set, views: list[torch.Tensor], base_view: torch.Tensor | None, options: AnalysisOptions
) -> None:
    def operand(tensor: torch.Tensor, base: torch.Tensor | None = None) -> Operand:
        return Operand(tensor, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements, base=base)

    current.weights = [operand(v) for v in views]
    current.base = operand(base_view) if base_view is not None else None
    current.tasks = [operand(v, base_view) for v in views] if base_view is not None else []


def _elementwise(current: _Set, pairs: list[tuple[int, int]], check: bool) -> list[dict[str, float]] | None:
    """Every metric but the spectral ones, for every pair; with `check`, None (and nothing more measured) if a
    norm is not finite: the set then holds NaN or Inf."""
    weights, tasks = current.weights, current.tasks
    for i, j in pairs:
        if current.base is not None:
            weight_and_task_sums(weights[i], weights[j], tasks[i], tasks[j], current.base)
        else:
            pair_sums(weights[i], weights[j])
    reference = current.base.norm if current.base is not None else 0.0
    for op in current.tasks:
        op.reference_norm = reference
    if check and not (all(math.isfinite(op.norm) for op in current.weights) and math.isfinite(reference)):
        return None
    return [_metrics(current, i, j, spectral=False) for i, j in pairs]


def _metrics(current: _Set, i: int, j: int, spectral: bool) -> dict[str, float | None]:
    """The pair's metrics that read the SVDs (`spectral`) or those that do not (None: not computable)."""
    found: dict[str, float | None] = {}
    for m in REGISTRY.values():
        group = current.tasks if m.needs_base else current.weights
        if group and m.matrix_only == spectral and m.applies_to(group[i]):
            found[m.name] = m(group[i], group[j])
    return found


def _finish_set(current: _Set, run: _Run) -> _Measured:
    """Wait for the set's jobs (cleaning and measuring it again here if it held NaN or Inf), then add the
    spectral metrics of every pair from the SVDs."""
    assert current.elementwise is not None
    values = current.elementwise.result()
    if values is not None:
        svds = [job.result() for job in current.svds]
    else:
        for job in current.svds:
            job.exception()  # wait; the SVDs of non-finite values are discarded
        _clean(current, run.options)
        values = _elementwise(current, run.pairs, check=False)
        assert values is not None
        svds = [op.svd for op in [*current.weights, *current.tasks] if op.is_matrix]
    for found, (i, j) in zip(values, run.pairs, strict=True):
        found.update(_metrics(current, i, j, spectral=True))
    first = current.weights[0]
    return _Measured(current.name, first.numel, first.is_matrix, values, svds, current.nonfinite)


def _clean(current: _Set, options: AnalysisOptions) -> None:
    """Replace NaN and Inf with 0 in copies of the views that hold them, counting them per checkpoint."""
    views = [op.tensor for op in current.weights]
    if current.base is not None:
        views.append(current.base.tensor)
    cleaned = []
    for ckpt, view in zip(current.checkpoints, views, strict=True):
        if view.dtype not in NATIVE:  # float8: torch has no finiteness test for it
            view = view.float()
        bad = int((~torch.isfinite(view)).sum())
        if bad:
            current.nonfinite[ckpt.label] = current.nonfinite.get(ckpt.label, 0) + bad
            view = torch.nan_to_num(view, nan=0.0, posinf=0.0, neginf=0.0)
        cleaned.append(view)
    base_view = cleaned.pop() if current.base is not None else None
    _make_operands(current, cleaned, base_view, options)


def _release(current: _Set) -> None:
    """Drop the set's pages from this process's mappings (the page cache keeps them)."""
    current.weights, current.tasks, current.base = [], [], None
    for ckpt in current.checkpoints:
        ckpt.release(current.name)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_THRESHOLD = 32 << 20


def _tune_heap() -> None:
    """Keep blocks up to HEAP_THRESHOLD on the C heap, and its freed top unless that exceeds it (glibc only).

    The passes allocate and free the same chunk-sized temporaries thousands of times. With glibc's defaults a
    freed block of a few MB is often handed back to the OS and the next one faulted in again page by page,
    which made a float32 product over row blocks three times slower than its arithmetic. `_trim_heap` still
    returns freed memory before each large tensor set, so peak memory keeps following the largest set.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_THRESHOLD)


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS before a large set is opened (glibc only; else a no-op).

    Blocks freed by earlier tensors otherwise stay resident as fragments in the worker threads' arenas, and
    peak memory would creep up through a run instead of following the largest tensor set.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    """The C library this process runs on (None where it cannot be loaded); glibc has the heap controls."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


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


def _unavailable(s: _Sums) -> dict[str, str]:
    """Why each metric that some of the layer's tensors could not give is partial or absent in the layer."""
    out = {}
    for name, count in s.skipped.items():
        where = f"{UNAVAILABLE} on {count} of the layer's {len(s.tensors)} tensors"
        out[name] = f"{where}; the value averages the others" if name in s.weights else f"{where}; left out"
    return out


def _unavailable_notes(layers: list[LayerMetrics]) -> list[str]:
    counts: dict[str, int] = {}
    for lm in layers:
        for name in lm.unavailable:
            counts[name] = counts.get(name, 0) + 1
    return [
        f"{name} could not be computed on some tensors of {n} layer(s) ({UNAVAILABLE}): they are left out of "
        "its mean, never read as a number; each layer's `unavailable` says where"
        for name, n in counts.items()
    ]


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


def _component_reasons(means: dict[str, float]) -> list[str]:
    if not means:
        return []
    ranked = sorted(means.items(), key=lambda kv: kv[1])
    words = mci.CATALOGUE
    reasons = [f"weakest: {words[n].description} at {v:.2f} (1 = ideal)" for n, v in ranked[:2] if v < 0.8]
    best, value = ranked[-1]
    reasons.append(f"strongest: {words[best].description} at {value:.2f}")
    return reasons
