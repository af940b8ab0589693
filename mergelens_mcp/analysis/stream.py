"""The one tensor stream: tensor sets read from the memory-mapped checkpoints, in order, opened ahead.

Two layers, so that every consumer reads tensors the same way:
- `schedule` yields `TensorSet`s (one tensor of each of several checkpoints, viewed in place in its stored
  dtype: nothing is copied or upcast whole). Sets are opened ahead (their bytes prefetched with
  MADV_WILLNEED, and whatever the consumer's `open` hook queues) while their stored bytes together stay
  within the largest set's, so memory follows the largest tensor set; a set's pages are dropped from the
  mappings when the consumer draws the next one. The merge simulation consumes it for the raw tensors.
- `measured_sets` measures each set for the comparison. A pool of worker threads, one per core, runs two
  kinds of job per set: one elementwise pass, which upcasts a chunk of every model and the base at a time and
  takes every sum the elementwise metrics need (task vectors, model - base, are formed chunk by chunk inside
  it), and one SVD per matrix operand. On the CPU, a randomized SVD's job is only its bfloat16
  iterations: its final float32 product is taken inside the pass, from the rows the pass upcasts anyway
  (with or without a base; a LoRA adapter's task vectors, measured from their factors, keep their own).
  The next sets are queued while the last SVDs of this one run. A non-finite norm is the one signal that
  triggers the NaN/Inf scan, after which the set is measured again from cleaned copies. When every model is
  a LoRA adapter of the base and the base is not to be read whole (`Run.factors_only`), a set views no tensor
  of the base: its task vectors come from the factors, its weights from the base's seeded row sample
  (`adapters.SampledWeights`, read by `Checkpoint.rows`), and the metrics that need every row of the base
  (the weights' spectra) are the set's `unmeasured`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import AnalysisCancelledError
from .adapters import (
    BaseSample,
    SampledWeights,
    apply_delta,
    factor_nbytes,
    lift,
    read_base_sample,
    stores,
    task_vector,
)
from .compat import Plan
from .loading import Checkpoint
from .metrics import NATIVE, REGISTRY, Metric, Operand, from_task_vectors_alone, pair_sums, weight_and_task_sums
from .spectral import SVD, release_scratch
from .types import AnalysisOptions, Cancelled, Progress

LARGE = 1 << 24  # elements: such sets first return freed heap memory to the OS, and build one sketch at a time
_ONE_LARGE_SKETCH = threading.Lock()


def default_threads() -> int:
    """Worker threads on CPU, each running torch on one core: one per core."""
    return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------- the lower layer: reading


@dataclass
class TensorSet:
    """One tensor of several checkpoints (each under its own name: a slice renumbers the layers), viewed as
    stored once the set is opened. `key` is what the consumer calls the set (the tensor, or the output).

    A LoRA adapter's adapted tensor is viewed as its weights, base + scale * B @ A in float32 (`with_deltas`),
    so every dense consumer (merge simulation, preview, verify, model loading, the zoo's sketches) reads an
    adapter as the model it makes; its modules_to_save tensors are read as stored."""

    with_deltas: ClassVar[bool] = True
    key: str
    sources: list[tuple[Checkpoint, str]]
    rows: int | None = None  # view only the first `rows` rows (a vocabulary cut to the shared size)
    views: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(ckpt.tensors[name].nbytes for ckpt, name in self.sources)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return [ckpt for ckpt, _ in self.sources]

    def open(self, device: torch.device) -> None:
        """Prefetch every source's bytes and view them in place (on `device`: a copy off the CPU)."""
        if self.sources and self.sources[0][0].tensors[self.sources[0][1]].numel >= LARGE:
            _trim_heap()
        for ckpt, name in self.sources:
            ckpt.prefetch(name)
        self.views = [_view(ckpt, name, self.rows, device, self.with_deltas) for ckpt, name in self.sources]

    def release(self) -> None:
        """Drop the set's pages from this process's mappings (the page cache keeps them)."""
        self.views = []
        for ckpt, name in self.sources:
            ckpt.release(name)


S = TypeVar("S", bound=TensorSet)


def schedule(
    sets: Sequence[S],
    open_set: Callable[[S], None],
    close_set: Callable[[S], None] = TensorSet.release,
    abandon: Callable[[S], None] | None = None,
) -> Iterator[S]:
    """Each set, in order, opened by `open_set` and closed by `close_set` once the consumer draws the next one.

    Sets are opened ahead while their stored bytes together stay within the largest set's. When the stream
    stops early (an error, or the consumer closing it), `abandon` is called on every set opened ahead first
    (to cancel what its `open_set` queued), then `close_set`.
    """
    sizes = [s.nbytes for s in sets]
    budget = max(sizes, default=0)
    window: deque[S] = deque()
    opened = held = 0
    try:
        for i in range(len(sets)):
            while opened < len(sets) and (not window or held + sizes[opened] <= budget):
                window.append(sets[opened])
                held += sizes[opened]
                opened += 1
                open_set(window[-1])
            current = window[0]
            yield current
            window.popleft()
            close_set(current)
            held -= sizes[i]
    finally:
        if abandon is not None:
            for pending in window:
                abandon(pending)
        for pending in window:
            close_set(pending)


def read(
    sets: Sequence[S],
    what: str,
    *,
    cancelled: Cancelled | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> Iterator[S]:
    """Each set viewed on `device` (default: the CPU), in order (`schedule`), with a reader's two duties: a
    cancel between sets raises AnalysisCancelledError naming `what`, and `progress` hears of each set once the
    consumer is done with it. The merge simulation, preview, verify and the zoo's sketches read through it."""
    device = device or torch.device("cpu")
    opened = schedule(sets, lambda current: current.open(device))
    try:
        for done, current in enumerate(opened):
            if cancelled is not None and cancelled():
                raise AnalysisCancelledError(f"{what} cancelled after {done} of {len(sets)} tensors")
            yield current
            if progress is not None:
                progress(done + 1, len(sets), current.key)
    finally:
        opened.close()


def _view(ckpt: Checkpoint, name: str, rows: int | None, device: torch.device, deltas: bool) -> torch.Tensor:
    tensor = ckpt.view(name)
    if rows is not None and tensor.dim() >= 1 and tensor.shape[0] > rows:
        tensor = tensor[:rows]
    tensor = tensor.to(device)
    return apply_delta(ckpt, name, tensor) if deltas else tensor


# ----------------------------------------------------------------------------------- the upper layer: measuring


@dataclass(frozen=True)
class Run:
    """What every tensor set of one comparison is measured with. `factors_only`: every model is a LoRA adapter
    of the base, whose tensors are read only on their seeded row sample (see `_factor_operands`)."""

    models: list[Checkpoint]
    base: Checkpoint | None
    plan: Plan
    device: torch.device
    options: AnalysisOptions
    pairs: list[tuple[int, int]]
    factors_only: bool = False

    def tensor_set(self, name: str) -> _Set:
        """One tensor of every model, and the base's where it pairs with them; without the base's values, the
        adapters' own tensors where every one stores it, and nothing else (their factors are read per set)."""
        rows = self.plan.row_limits.get(name)
        shape = tuple(self.models[0].tensors[name].shape)
        if rows is not None and shape and shape[0] > rows:
            shape = (rows, *shape[1:])
        if self.factors_only:
            own = all(stores(m, name) for m in self.models)
            factors = sum(factor_nbytes(m, name) for m in self.models)
            return _Set(name, [(m, name) for m in self.models] if own else [], rows, shape=shape, factors=factors)
        base = [self.base] if self.base is not None and name in self.plan.base_tensors else []
        return _Set(name, [(c, name) for c in [*self.models, *base]], rows, shape=shape)


@dataclass
class _Set(TensorSet):
    """A tensor set with its operands and the jobs measuring them. An adapter's views stay the stored base's:
    the comparison measures its delta from the factors (`adapters.lift`), never densely."""

    with_deltas: ClassVar[bool] = False
    shape: tuple[int, ...] = ()  # as viewed (the rows cut)
    factors: int = 0  # stored bytes of the LoRA factors read for the set without the base
    weights: list[Operand] = field(default_factory=list)  # empty: not measured here
    tasks: list[Operand] = field(default_factory=list)  # model - base, when the base has this tensor
    base: Operand | None = None
    unmeasured: tuple[str, ...] = ()  # metrics that apply but need the base's values, which were not read
    base_sample: BaseSample | None = None  # without the base's values: its seeded sample of rows, if read
    nonfinite: dict[str, int] = field(default_factory=dict)
    elementwise: Future[list[dict[str, float | None]] | None] | None = None  # None: the set holds NaN or Inf
    svds: list[Future[SVD]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.factors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The tensor as a matrix: its rows, and its other dimensions flattened."""
        rows = self.shape[0] if self.shape else 1
        return rows, self.numel // max(rows, 1)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2 and min(self.rows_cols) > 1

    def jobs(self) -> list[Future[Any]]:
        return [*([self.elementwise] if self.elementwise is not None else []), *self.svds]


@dataclass(frozen=True)
class Measured:
    """What one tensor set contributed: every metric of every pair, and the SVDs made."""

    name: str
    numel: int
    is_matrix: bool
    values: list[dict[str, float | None]]  # per pair, in the order of `pairs`
    svds: list[SVD]
    nonfinite: dict[str, int]
    task_norms: tuple[float, ...] = ()  # |model - base| of each model, when the base has this tensor
    base_norm: float = 0.0  # |base| of this tensor (0 without one; estimated from its row sample without read_base)
    unmeasured: tuple[str, ...] = ()  # metrics that apply but need the base's values, which were not read
    base_sample: tuple[int, int, int] = (0, 0, 0)  # without the base's values: rows sampled, rows, bytes read


def measured_sets(names: Sequence[str], run: Run) -> Iterator[Measured]:
    """Each tensor set measured, in order, by a pool of worker threads (one per core on CPU).

    A set's elementwise pass and each of its SVDs are separate jobs, so the workers share a set's work and
    start on the next set while the last SVD of this one runs. Closing the iterator stops the pool.
    """
    workers = 1 if run.device.type != "cpu" else run.options.threads or default_threads()
    previous_threads = torch.get_num_threads()
    _tune_heap()
    if run.device.type == "cpu":
        torch.set_num_threads(1)  # one core per worker thread
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergelens-worker") as pool:
            sets = [run.tensor_set(n) for n in names]
            opened = schedule(sets, functools.partial(_open_set, run=run, pool=pool), _close, _cancel)
            try:
                for current in opened:
                    yield _finish_set(current, run)
            finally:
                opened.close()  # cancel the sets opened ahead before the pool waits for its jobs
    finally:
        torch.set_num_threads(previous_threads)
        release_scratch()  # the SVDs' reused buffer: a server keeps no memory between comparisons


def _cancel(current: _Set) -> None:
    for job in current.jobs():
        job.cancel()


def _close(current: _Set) -> None:
    """Cancel the set's queued jobs (only after an error: otherwise all are done), wait for those running
    (the views must outlive the jobs that read them), and release the set and what its jobs made. The list
    of sets lives until the comparison ends: a set that kept its SVDs' futures kept every singular basis of
    the model (about 4 MB per Llama-2-7B layer matrix, 0.9 GB over the model)."""
    _cancel(current)
    for job in current.jobs():
        if not job.cancelled():
            job.exception()
    current.weights, current.tasks, current.base, current.base_sample = [], [], None, None
    current.elementwise, current.svds = None, []  # the SVDs' bases would otherwise live as long as the run
    current.release()


def _open_set(current: _Set, run: Run, pool: ThreadPoolExecutor) -> None:
    """View one tensor of every model in place and queue its jobs: the elementwise pass and one SVD per
    matrix operand (a set found to hold NaN or Inf is measured again once its values are cleaned)."""
    current.open(run.device)
    _operands(current, [_flat2d(v) for v in current.views], run)
    operands = dict.fromkeys([*current.weights, *current.tasks])  # an adapter's untouched weights are the base's
    # the pass forms float32 rows of dense operands only in a set without factors: with an adapter among the
    # models, the dense ones pair through the factors' route and would be decomposed again in `_finish_set`
    fused = [op for op in operands if op.fusable] if not any(op.low_rank for op in operands) else []
    claims = [(op, _Once(functools.partial(_subspace, op))) for op in fused]
    current.elementwise = pool.submit(_elementwise, current, run.pairs, True, claims)
    current.svds = [pool.submit(claim.run) for _, claim in claims]  # the pass takes those not started
    current.svds += [pool.submit(_svd, op) for op in operands if op.is_matrix and op.has_svd and op not in fused]


def _flat2d(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 2 else tensor


def _svd(op: Operand) -> SVD:
    """The operand's SVD. A task vector's needs a bfloat16 copy of it (a stored matrix's is its own view):
    for large ones, one such copy at a time, so peak memory is one copy above the tensor set's."""
    if op.base is None or op.numel < LARGE:
        return op.svd
    with _ONE_LARGE_SKETCH:
        return op.svd


def _subspace(op: Operand) -> torch.Tensor:
    """The bfloat16 iterations of the operand's randomized SVD (one large task vector's copy at a time)."""
    if op.base is None or op.numel < LARGE:
        return op.subspace()
    with _ONE_LARGE_SKETCH:
        return op.subspace()


class _Once:
    """A job that runs once, by whichever thread calls `run` first: a pool worker that reaches it in the
    queue, or the elementwise pass, which needs its result and would otherwise wait for a worker."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.claimed = False
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        with self.lock:
            mine, self.claimed = not self.claimed, True
        if not mine:
            return
        try:
            self.value = self.fn()
        except BaseException as error:  # handed to whoever asks for the result
            self.error = error
        finally:
            self.fn = None  # type: ignore[assignment]
            self.done.set()

    def result(self) -> Any:
        self.run()
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def _operands(current: _Set, views: list[torch.Tensor], run: Run) -> None:
    """The set's operands from its views: every model's weights and task vectors (model - base, with a base),
    or, without the base's values, what the factors and the adapters' own tensors give."""
    if run.factors_only:
        _factor_operands(current, views, run)
        return
    base_view = views.pop() if len(current.sources) > len(run.models) else None
    current.weights = [_operand(v, run.options) for v in views]
    current.base = _operand(base_view, run.options) if base_view is not None else None
    current.tasks = [_operand(v, run.options, base_view) for v in views] if base_view is not None else []
    lift(current.sources, current.weights, current.tasks, current.base, run.options)  # LoRA adapters: exact factors


def _operand(tensor: torch.Tensor, options: AnalysisOptions, base: torch.Tensor | None = None) -> Operand:
    return Operand(tensor, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements, base=base)


def _factor_operands(current: _Set, views: list[torch.Tensor], run: Run, sample: BaseSample | None = None) -> None:
    """Every model a LoRA adapter of the base, which is not read whole: the task vectors from the factors
    where no adapter stores the tensor itself (zero where an adapter has no factors), and the weights from the
    base's seeded row sample (`sample`, else read here) plus them; the weights from the adapters' own tensors
    where every one stores it (modules_to_save). What needs anything else (the weights' SVDs, a stored
    tensor's task vector) is `unmeasured`."""
    current.weights = [_operand(v, run.options) for v in views]
    current.tasks = []
    if not any(stores(m, current.key) for m in run.models):
        rows, cols = current.rows_cols
        current.tasks = [task_vector(m, current.key, rows, cols, run.device, run.options) for m in run.models]
        if run.base is not None and current.key in run.plan.base_tensors:  # the weights, from the base's rows
            sample = sample or read_base_sample(run.base, current.key, rows, cols, run.device)
            current.base_sample = sample
            current.weights = [SampledWeights(sample, task) for task in current.tasks]
            for task in current.tasks:
                task.reference_norm = sample.norm
    current.unmeasured = tuple(
        m.name for m in REGISTRY.values() if (current.is_matrix or not m.matrix_only) and not _measures(m, current)
    )


def _measures(m: Metric, current: _Set) -> bool:
    """Whether the operands a set has without the base's values give metric `m`: the weights' own (stored)
    tensors give every weight metric; weights on the base's row sample all but the spectral ones; the task
    vectors from the factors what needs nothing else, and with the base's row sample task_drift too."""
    sampled = current.base_sample is not None
    if not m.needs_base:
        return bool(current.weights) and not (sampled and m.matrix_only)
    return bool(current.tasks) and (from_task_vectors_alone(m) or sampled)


def _elementwise(
    current: _Set, pairs: list[tuple[int, int]], check: bool, claims: Sequence[tuple[Operand, _Once]] = (),
) -> list[dict[str, float | None]] | None:
    """Every metric but the spectral ones, for every pair; with `check`, None (and nothing more measured) if a
    norm is not finite: the set then holds NaN or Inf.

    `claims` are the bfloat16 iterations of the operands whose randomized SVDs end here: the pass runs those
    no worker has started, waits for the others, and takes their final float32 products from the rows it
    upcasts anyway (the operand's energy is the norm it measures), so each value is upcast once."""
    weights, tasks = current.weights, current.tasks
    products: dict[Operand, tuple[torch.Tensor, torch.Tensor]] = {}
    failure: BaseException | None = None
    for op, claim in reversed(claims):  # from the end: the workers take them from the front
        try:
            z = claim.result()
        except Exception as error:  # raised below unless the set holds NaN or Inf (then it is measured again)
            failure = failure or error
            continue
        products[op] = (z, torch.empty(op.tensor.shape[0], z.shape[1]))
    made = dict(products)
    for i, j in pairs:
        if current.base is not None and not (tasks[i].low_rank or tasks[j].low_rank):
            weight_and_task_sums(weights[i], weights[j], tasks[i], tasks[j], current.base, products)
            continue
        if weights:
            pair_sums(weights[i], weights[j], products=products)
        if tasks:
            pair_sums(tasks[i], tasks[j], signs=True)
    reference = current.base.norm if current.base is not None else 0.0
    if current.base is not None:
        for op in current.tasks:
            op.reference_norm = reference
    checked = current.weights or current.tasks  # without the base's values, maybe only the factors
    if check and not (all(math.isfinite(op.norm) for op in checked) and math.isfinite(reference)):
        return None
    if failure is not None:
        raise failure
    for op, (z, product) in made.items():
        if op not in products:  # taken in the pass (one left over would get its own SVD when asked)
            op.finish_svd(product, z)
    return [_metrics(current, i, j, spectral=False) for i, j in pairs]


def _metrics(current: _Set, i: int, j: int, spectral: bool) -> dict[str, float | None]:
    """The pair's metrics that read the SVDs (`spectral`) or those that do not (None: not computable)."""
    found: dict[str, float | None] = {}
    for m in REGISTRY.values():
        group = current.tasks if m.needs_base else current.weights
        if group and m.matrix_only == spectral and m.applies_to(group[i]) and m.name not in current.unmeasured:
            found[m.name] = m(group[i], group[j])
    return found


def _finish_set(current: _Set, run: Run) -> Measured:
    """Wait for the set's jobs (cleaning and measuring it again here if it held NaN or Inf), then add the
    spectral metrics of every pair from the SVDs."""
    assert current.elementwise is not None
    values = current.elementwise.result()
    if values is not None:
        for job in current.svds:
            job.result()
        operands = dict.fromkeys([*current.weights, *current.tasks])
        svds = [op.svd for op in operands if op.is_matrix and op.has_svd]
    else:
        for job in current.svds:
            job.exception()  # wait; the SVDs of non-finite values are discarded
        _clean(current, run)
        values = _elementwise(current, run.pairs, check=False)
        assert values is not None
        svds = [op.svd for op in [*current.weights, *current.tasks] if op.is_matrix and op.has_svd]
    for found, (i, j) in zip(values, run.pairs, strict=True):
        found.update(_metrics(current, i, j, spectral=True))
    sample = current.base_sample
    read = (0, 0, 0) if sample is None else (len(sample.index), sample.rows, sample.nbytes)
    return Measured(
        current.key, current.numel, current.is_matrix, values, svds, current.nonfinite,
        task_norms=tuple(op.norm for op in current.tasks),
        base_norm=current.base.norm if current.base is not None else sample.norm if sample is not None else 0.0,
        unmeasured=current.unmeasured, base_sample=read,
    )


def _clean(current: _Set, run: Run) -> None:
    """Replace NaN and Inf with 0 in copies of the views that hold them, counting them per checkpoint."""
    sample = current.base_sample
    if sample is not None and run.base is not None:  # adapters compared on the base's row sample
        bad = int((~torch.isfinite(sample.values)).sum())
        if bad:
            current.nonfinite[run.base.label] = current.nonfinite.get(run.base.label, 0) + bad
            sample = BaseSample(sample.index, torch.nan_to_num(sample.values, nan=0.0, posinf=0.0, neginf=0.0),
                                sample.rows, sample.nbytes, sample.inner)
        _factor_operands(current, [], run, sample)
        return
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
    _operands(current, cleaned, run)


# ----------------------------------------------------------------------------------- the C heap

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
