"""The metric registry: one decorated function per metric, computed per tensor for a pair of models.

Each metric receives two `Operand`s: the two models' weights, or, for metrics marked `needs_base`, their
task vectors (model - base). Operands cache what several metrics share (norms, the SVD), so every tensor
is decomposed once however many metrics and pairs use it. A metric's key is its function's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import spectral
from .spectral import SVD, decompose
from .types import DEFAULT_RANK, EXACT_MAX_ELEMENTS

KL_MAX_BINS = 64
KL_MIN_BINS = 8
KL_SMOOTHING = 0.5
TOP_DENSITY = 0.2
SAMPLE_SIZE = 1 << 20  # values drawn (see `Operand.sampled`) for the KL histograms
TOP_SAMPLE_SIZE = 1 << 18  # values drawn to place the TIES threshold and measure the mass fraction
SAMPLE_RUN = 64  # consecutive values per run of a sample
CHUNK = 1 << 17  # elements per step of the pairwise passes: temporaries stay small and in cache
PRODUCT_BLOCK = 1 << 20  # values per block of the SVD products a pass takes (see `_ProductBlocks`)
EPS = 1e-12
PROMOTED = (torch.float32, torch.bfloat16, torch.float16)  # float32 minus these stays float32, with no copy
NATIVE = (*PROMOTED, torch.float64)  # dtypes torch reduces (min/max) as stored; float8 ones are upcast first


class memo:  # noqa: N801 - used as a decorator, like functools.cached_property
    """`functools.cached_property` without its lock: before Python 3.12 that lock is one per class, so two
    threads computing the SVDs of two different operands waited for each other."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.name = fn.__name__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


class Operand:
    """One tensor of one model, or a task vector (model - base), with lazily cached statistics.

    The tensor may be in its stored dtype (a view of the mapped checkpoint): values are upcast to float32 a
    CHUNK at a time, and a task vector is formed chunk by chunk from the model's and the base's values, so
    no full-size float32 copy is made. Whatever several metrics or pairs share is computed once here (norm,
    value range, samples, TIES threshold, SVD, the pairwise sums).
    """

    low_rank = False  # a LoRA operand (analysis/adapters.py) measures its pairs exactly from its factors
    has_svd = True  # False: weights known only on sampled rows (analysis/adapters.py), whose SVD is not measured

    def __init__(
        self,
        tensor: torch.Tensor,
        *,
        rank: int = DEFAULT_RANK,
        exact_max_elements: int = EXACT_MAX_ELEMENTS,
        reference_norm: float | None = None,
        base: torch.Tensor | None = None,
    ) -> None:
        if base is not None and base.shape != tensor.shape:
            raise ValueError(f"base shape {tuple(base.shape)} differs from the tensor's {tuple(tensor.shape)}")
        self.tensor = tensor
        self.base = base  # set: this operand is tensor - base
        self.rank = rank
        self.exact_max_elements = exact_max_elements
        self.reference_norm = reference_norm  # the base tensor's norm, for task vectors

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def is_matrix(self) -> bool:
        return self.tensor.dim() == 2 and min(self.tensor.shape) > 1

    def values(self, index: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The flattened operand's values at `index` in `dtype` (a view where nothing needs converting)."""
        x = self.tensor.reshape(-1)[index].to(dtype)
        if self.base is None:
            return x
        base = self.base.reshape(-1)[index]
        return x - (base if dtype == torch.float32 and base.dtype in PROMOTED else base.to(dtype))

    def chunks(self) -> Iterator[torch.Tensor]:
        """The operand's values in consecutive CHUNK-sized float32 pieces; on a GPU, one float64 piece."""
        if spectral.on_accelerator(self.tensor):
            yield self.values(slice(None), torch.float64)
            return
        for start in range(0, self.numel, CHUNK):
            yield self.values(slice(start, start + CHUNK))

    def exact_pair_sums(self, other: Operand, signs: bool) -> PairSums | None:
        """The pair's sums from a closed form, where this kind of operand has one (None: one pass over both)."""
        return None

    @memo
    def norm(self) -> float:
        return math.sqrt(max(sum(float((x * x).sum()) for x in self.chunks()), 0.0))

    @memo
    def effective_rank(self) -> float:
        """The entropy effective rank of its spectrum (once per operand, however many pairs read it)."""
        return _effective_rank(self.svd)

    @memo
    def svd(self) -> SVD:
        energy = self.__dict__.get("norm")
        return decompose(
            self.tensor, self.rank, self.exact_max_elements,
            energy=None if energy is None else energy**2, minus=self.base,
        )

    @property
    def fusable(self) -> bool:
        """Whether this operand's SVD can take its final float32 product inside the elementwise pass
        (`subspace`, then `weight_and_task_sums(..., products=...)` or, for a stored matrix,
        `pair_sums(..., products=...)`, then `finish_svd`): a stored or task matrix on the CPU whose SVD is
        randomized."""
        return (not self.low_rank and self.is_matrix and not spectral.on_accelerator(self.tensor)
                and "svd" not in self.__dict__
                and spectral.randomized(self.tensor.shape, self.rank, self.exact_max_elements))

    def subspace(self) -> torch.Tensor:
        """The basis Z of the randomized SVD's right singular subspace (the bfloat16 iterations)."""
        return spectral.subspace(self.tensor, self.rank, minus=self.base)

    def finish_svd(self, product: torch.Tensor, z: torch.Tensor) -> SVD:
        """Cache and return the SVD from the float32 product (this matrix) Z over its rows: what `svd` gives."""
        found = spectral.finish(product, z, self.rank, min(self.tensor.shape), self.norm**2)
        self.__dict__["svd"] = found
        return found

    @memo
    def value_range(self) -> tuple[float, float]:
        if self.base is None and self.tensor.dtype in NATIVE:
            lo, hi = torch.aminmax(self.tensor.reshape(-1))
            return float(lo), float(hi)
        ranges = [torch.aminmax(x) for x in self.chunks()]
        return min(float(r.min) for r in ranges), max(float(r.max) for r in ranges)

    def sampled(self, size: int) -> torch.Tensor:
        """At most `size` float32 values (all of them for smaller operands): runs of SAMPLE_RUN consecutive
        values at evenly spaced offsets, the same positions in every operand of this size. Runs of whole
        cache lines read only the sampled lines (2^18 values: 2% of a 5632 x 2048 matrix), where single
        values at a fixed stride touch every line of the tensor."""
        n = self.numel
        if n <= size:
            return self.values(slice(None))  # float32 on every device: `Magnitudes` reads its bits
        runs = size // SAMPLE_RUN
        stride = n // runs

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).as_strided((runs, SAMPLE_RUN), (stride, 1)).reshape(-1).float()

        picked = pick(self.tensor)
        return picked if self.base is None else picked - pick(self.base)

    @memo
    def sample(self) -> torch.Tensor:
        """At most SAMPLE_SIZE values (all of them for smaller tensors), as `sampled` draws them."""
        return self.sampled(SAMPLE_SIZE)

    @memo
    def magnitudes(self) -> Magnitudes:
        """|values| of a sample of at most TOP_SAMPLE_SIZE values (all of them for smaller operands)."""
        return Magnitudes(self.sampled(TOP_SAMPLE_SIZE))

    @memo
    def top_threshold(self) -> float:
        """Magnitude at or above which a value survives TIES-style trimming to the top TOP_DENSITY fraction.

        Exact up to TOP_SAMPLE_SIZE values; above, the same quantile of a sample (the standard
        error of the kept density is then about 0.0008), which avoids a selection over the whole tensor.
        """
        magnitude = self.magnitudes
        keep = max(1, int(math.ceil(TOP_DENSITY * magnitude.n)))
        return 0.0 if keep >= magnitude.n else magnitude.largest(keep)


class Magnitudes:
    """Absolute values bucketed by their top 16 bits, with each bucket's count and sum.

    For a non-negative float32 the top 16 bits are its value truncated to bfloat16, so buckets are in value
    order: an order statistic or a prefix of the largest values needs only the one bucket it falls in sorted.
    Sorting the whole sample instead cost 5 ms for 2^18 task-vector values (they hold few distinct values, a
    slow case for torch's sort); the two bucket counts take about 0.6 ms; the results are the same.
    """

    BUCKETS = 1 << 15  # sign bit 0: the top 16 bits of a non-negative float32 are below 2^15

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values.abs()
        self.n = self.values.numel()
        self.keys = (self.values.view(torch.int32) >> 16).long()
        self.counts = torch.bincount(self.keys, minlength=self.BUCKETS).flip(0).cumsum(0)  # in this bucket or above
        masses = torch.bincount(self.keys, weights=self.values.double(), minlength=self.BUCKETS)
        self.masses = masses.flip(0).cumsum(0)
        self.total = float(self.masses[-1]) if self.n else 0.0

    def _bucket(self, index: int) -> tuple[torch.Tensor, int, float]:
        """(values of the index-th bucket from the top, largest first; count and mass above that bucket)."""
        inside = self.values[self.keys == self.BUCKETS - 1 - index].sort(descending=True).values
        if index == 0:
            return inside, 0, 0.0
        return inside, int(self.counts[index - 1]), float(self.masses[index - 1])

    def largest(self, rank: int) -> float:
        """The rank-th largest value (1-based)."""
        target = torch.tensor([rank], device=self.counts.device)
        index = int(torch.searchsorted(self.counts, target))
        inside, above, _ = self._bucket(index)
        return float(inside[rank - above - 1])

    def count_holding(self, share: float) -> int:
        """How many of the largest values hold at least `share` of the sum (at least 1)."""
        target = share * self.total
        probe = torch.tensor([target], dtype=torch.float64, device=self.masses.device)
        index = min(int(torch.searchsorted(self.masses, probe)), self.BUCKETS - 1)
        inside, above, mass = self._bucket(index)
        running = inside.double().cumsum(0) + mass
        probe = torch.tensor([target], dtype=torch.float64, device=running.device)
        return above + min(int(torch.searchsorted(running, probe)), max(inside.numel() - 1, 0)) + 1


@dataclass(frozen=True)
class PairSums:
    """What the elementwise pairwise metrics need, from one pass over both operands."""

    dot: float  # <a, b>
    distance_sq: float  # |a - b|^2, the difference taken in float32
    signs: tuple[float, float, float, float] | None  # see `pair_sums`


class _Scratch:
    """Reused buffers for a pass's temporaries, by name: a chunk-sized tensor made afresh by every operation
    is a new allocation each time (and, past glibc's mmap threshold, new pages faulted in), where the same
    few buffers stay in cache from chunk to chunk. The pass's accumulators share one, using it in turn."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The buffer `name` (uninitialised, flat) with `like`'s size, dtype and device."""
        return self.get(name, like.numel(), like.dtype, like.device)

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32,
            device: torch.device | None = None) -> torch.Tensor:
        found = self.buffers.get(name)
        device = torch.device("cpu") if device is None else device
        if found is None or found.numel() < n or found.dtype != dtype or found.device != device:
            found = self.buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return found[:n]


class _Accumulator:
    """Running sums of one pairwise pass, fed chunk by chunk.

    Chunk sums are taken by torch's pairwise reduction and added in float64. A plain float32 dot (BLAS sdot)
    over millions of near-identical weights loses the signal: for all-MiniLM-L6-v2 against a fine-tune it put
    1 - cos off by 2x on a 590k-element matrix, and on 128 K-value chunks its sums are still biased by about
    3e-6; this keeps 1 - cos within about 1e-7 of a full float64 dot (on the MiniLM pair's matrices 3e-8
    typical, 9e-8 at most). On a GPU the one chunk is float64. The reductions write each chunk's sums
    (`out=`) into a row of a small table, added up in float64 every ROWS chunks, so nothing is read back
    per chunk; the temporaries are buffers reused from chunk to chunk (`_Scratch`).

    The sign counts use float arithmetic only (on a CPU, torch's comparisons into bool tensors cost several
    times more): sign(x y) is 1 where the signs agree, -1 where they conflict and 0 where either value is 0
    (or the product is under float32's smallest subnormal, |x y| < 1.4e-45), so the sum of its squares counts
    the coordinates non-zero in both and its sum is agreements - conflicts. A value is above a TIES threshold
    t where |x| >= t: compared into a float 0/1 tensor as x^2 >= t^2 (t^2 rounded as x^2 is: the same test
    while both squares are normal floats, see SQUARED), else as |x| >= t; multiplying sign(x y) by both
    masks keeps it only where both hold.
    """

    ROWS = 256  # chunks whose sums are kept in float32 before they are added up in float64
    SQUARED = (1e-18, 1e18)  # thresholds within which x^2 >= t^2 is |x| >= t (both squares normal floats)

    def __init__(self, thresholds: tuple[float, float] | None, scratch: _Scratch | None = None,
                 extra: bool = False) -> None:
        self.thresholds = thresholds
        self.limits: dict[torch.dtype, list[float]] = {}  # each threshold's t^2 rounded as x^2 is
        self.scratch = scratch or _Scratch()
        self.columns = (4 if thresholds is None else 8) + int(extra)
        # dot, x^2, y^2, (x - y)^2; then non-zero in both, agreements - conflicts, the same above thresholds;
        # then (extra) the sum of squares of a third tensor
        self.table: torch.Tensor | None = None
        self.row = 0
        self.total = [0.0] * self.columns

    def _next(self, like: torch.Tensor) -> torch.Tensor:
        if self.table is None or self.table.dtype != like.dtype or self.table.device != like.device:
            self.flush()
            self.table = torch.zeros(self.ROWS, self.columns, dtype=like.dtype, device=like.device)
        elif self.row == self.ROWS:
            self.flush()
        self.row += 1
        return self.table[self.row - 1]

    def flush(self) -> None:
        if self.table is None or self.row == 0:
            return
        for i, value in enumerate(self.table[:self.row].sum(0, dtype=torch.float64).tolist()):
            self.total[i] += value
        self.table.zero_()
        self.row = 0

    @property
    def totals(self) -> list[float]:
        self.flush()
        return self.total

    def add(self, x: torch.Tensor, y: torch.Tensor, *, distance: bool, extra: torch.Tensor | None = None) -> None:
        """One chunk; with `distance`, |x - y|^2 too (not when it comes from elsewhere); `extra`: a third
        tensor whose sum of squares is wanted (the base's, for its norm)."""
        out = self._next(x)
        product = torch.mul(x, y, out=self.scratch.take("product", x))
        torch.sum(product, 0, out=out[0])
        if self.thresholds is not None:
            product.sign_()
            torch.dot(product, product, out=out[4])
            torch.sum(product, 0, out=out[5])
        for i, values in enumerate((x, y)):
            square = torch.mul(values, values, out=self.scratch.take("square", x))
            torch.sum(square, 0, out=out[1 + i])
            if self.thresholds is not None and self.thresholds[i] > 0:
                product.mul_(self._above(values, square, i))
        if distance:
            square = torch.sub(x, y, out=self.scratch.take("square", x))
            torch.sum(square.mul_(square), 0, out=out[3])
        if extra is not None:
            torch.sum(torch.mul(extra, extra, out=self.scratch.take("square", x)), 0, out=out[-1])
        if self.thresholds is not None:
            torch.dot(product, product, out=out[6])
            torch.sum(product, 0, out=out[7])

    def _above(self, values: torch.Tensor, squares: torch.Tensor, i: int) -> torch.Tensor:
        """1 where |values| >= the i-th threshold, else 0, in `squares`' buffer (its sum is taken already)."""
        assert self.thresholds is not None
        t = self.thresholds[i]
        lo, hi = self.SQUARED
        if not lo <= t <= hi:
            return torch.ge(torch.abs(values, out=squares), t, out=squares)
        limits = self.limits.get(squares.dtype)
        if limits is None:
            squared = torch.tensor([u * u for u in self.thresholds], dtype=squares.dtype)
            limits = self.limits[squares.dtype] = squared.tolist()
        return torch.ge(squares, limits[i], out=squares)

    def signs(self) -> tuple[float, float, float, float]:
        """(non-zero in both, conflicts; the same above both thresholds)."""
        both, balance, both_top, balance_top = self.totals[4:8]
        return both, (both - balance) / 2, both_top, (both_top - balance_top) / 2

    def store(self, a: Operand, b: Operand, distance_sq: float | None = None) -> PairSums:
        """The sums as `a`'s cached PairSums for `b`; the norms of both operands come with them."""
        dot, x_sq, y_sq, distance = self.totals[:4]
        a.__dict__.setdefault("norm", math.sqrt(max(x_sq, 0.0)))
        b.__dict__.setdefault("norm", math.sqrt(max(y_sq, 0.0)))
        signs = None if self.thresholds is None else self.signs()
        found = PairSums(dot, distance if distance_sq is None else distance_sq, signs)
        a.__dict__.setdefault("_pairs", {})[id(b)] = (b, found)
        return found


def _cached_pair(a: Operand, b: Operand, signs: bool) -> PairSums | None:
    hit = a.__dict__.get("_pairs", {}).get(id(b))
    if hit is not None and hit[0] is b and (hit[1].signs is not None or not signs):
        return hit[1]
    return None


def pair_sums(
    a: Operand, b: Operand, signs: bool = False,
    products: dict[Operand, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PairSums:
    """<a, b>, |a - b|^2 and (with `signs`) the sign counts, in one pass; kept on `a` for this `b`.

    The difference is taken in float32: exact for values within a factor 2 of each other and otherwise off by
    a relative 6e-8, which a distance (unlike 1 - cos) does not amplify. `products`: as in
    `weight_and_task_sums`, for `a` and `b` when they are stored matrices (not task vectors) on the CPU: the
    pass writes (operand) Z into `out` from the float32 rows it forms anyway, and removes the operands done.
    """
    cached = _cached_pair(a, b, signs)
    if cached is not None:
        return cached
    found = a.exact_pair_sums(b, signs) if a.low_rank else b.exact_pair_sums(a, signs) if b.low_rank else None
    if found is not None:
        a.__dict__.setdefault("_pairs", {})[id(b)] = (b, found)
        return found
    scratch = _Scratch()
    sums = _Accumulator((a.top_threshold, b.top_threshold) if signs else None, scratch)
    if spectral.on_accelerator(a.tensor):
        x, y = a.values(slice(None), torch.float64), b.values(slice(None), torch.float64)
        sums.add(x, y, distance=True)
        return sums.store(a, b)
    todo = {op: products.pop(op) for op in (a, b) if products and op in products and op.base is None}
    blocks = _ProductBlocks(todo, a.tensor.shape[-1], a.numel, scratch)
    for start in range(0, a.numel, blocks.step):
        index = slice(start, start + blocks.step)
        blocks.begin(index)
        x, y = blocks.values(a, index, "x"), blocks.values(b, index, "y")
        sums.add(x, y, distance=True)
        blocks.advance()
    return sums.store(a, b)


def weight_and_task_sums(
    a: Operand, b: Operand, task_a: Operand, task_b: Operand, base: Operand,
    products: dict[Operand, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """`pair_sums(a, b)`, `pair_sums(task_a, task_b, signs=True)` and the base's norm in one pass over the
    three tensors, for task vectors of these weights over this base. The task vectors' distance is the
    weights' ((a - base) - (b - base) = a - b); every norm comes out of the same pass.

    `products` maps some of the four operands (2-D, on the CPU) to (Z, out): the pass then also writes
    (operand) Z into `out` (rows x columns of Z) from the float32 rows it forms anyway, so the randomized
    SVD's final product upcasts nothing again (see `Operand.finish_svd`). The operands done are removed.
    """
    if not (task_a.tensor is a.tensor and task_b.tensor is b.tensor and task_a.base is base.tensor
            and task_b.base is base.tensor):
        raise ValueError("task_a and task_b must be a - base and b - base")
    measure_base = "norm" not in base.__dict__
    scratch = _Scratch()
    weights = _Accumulator(None, scratch, extra=measure_base)
    tasks = _Accumulator((task_a.top_threshold, task_b.top_threshold), scratch)
    n = a.numel
    if spectral.on_accelerator(a.tensor):
        x, y, z = (op.values(slice(None), torch.float64) for op in (a, b, base))
        weights.add(x, y, distance=True, extra=z if measure_base else None)
        tasks.add(x - z, y - z, distance=False)
    else:
        todo = {op: products.pop(op) for op in (a, b, task_a, task_b) if products and op in products}
        blocks = _ProductBlocks(todo, a.tensor.shape[-1], n, scratch)
        for start in range(0, n, blocks.step):
            index = slice(start, start + blocks.step)
            blocks.begin(index)
            x, y, z = blocks.values(a, index, "x"), blocks.values(b, index, "y"), blocks.values(base, index, "z")
            weights.add(x, y, distance=True, extra=z if measure_base else None)
            tasks.add(blocks.difference(task_a, x, z, "dx"), blocks.difference(task_b, y, z, "dy"), distance=False)
            blocks.advance()
    distance = weights.store(a, b).distance_sq
    tasks.store(task_a, task_b, distance)
    if measure_base:
        base.__dict__["norm"] = math.sqrt(max(weights.totals[-1], 0.0))


class _ProductBlocks:
    """The chunks of a pass on the CPU, in float32 buffers reused from chunk to chunk. The rows of the
    operands whose SVD products the pass takes are written into blocks of about PRODUCT_BLOCK values as the
    pass forms them (chunk by chunk, each still in cache for its sums), and multiplied by Z a block at a time:
    torch.mm reads Z (n x 32 float32) once per block, so larger blocks than the pass's chunks halve the
    products' cost (about 21 instead of 40 ms for 11008 x 4096). The other operands' chunks go to `scratch`."""

    def __init__(self, todo: dict[Operand, tuple[torch.Tensor, torch.Tensor]], columns: int, n: int,
                 scratch: _Scratch) -> None:
        self.todo, self.columns, self.n, self.scratch = todo, columns, n, scratch
        chunk_rows = max(1, CHUNK // columns)
        self.step = chunk_rows * columns if todo else CHUNK
        self.block = self.step * max(1, PRODUCT_BLOCK // self.step)
        self.buffers = {op: torch.empty(min(self.block, n)) for op in todo}
        self.done = 0  # values multiplied so far: the current block starts there
        self.slot = slice(0, 0)  # where the current chunk's values go in the blocks
        self.size = 0  # values in the current chunk

    def begin(self, index: slice) -> None:
        """The pass's next chunk is `index`."""
        offset = index.start - self.done
        self.size = min(self.step, self.n - index.start)
        self.slot = slice(offset, offset + self.size)

    def _buffer(self, op: Operand, name: str) -> torch.Tensor:
        return self.buffers[op][self.slot] if op in self.todo else self.scratch.get(name, self.size)

    def values(self, op: Operand, index: slice, name: str) -> torch.Tensor:
        """The operand's float32 values at `index` (what `Operand.values` gives), in its block when its
        product is taken, else in the scratch buffer `name` (a view of the tensor where it is float32
        already)."""
        source = op.tensor.reshape(-1)[index]
        if op.base is not None:
            minus = self.scratch.get(f"{name} base", self.size).copy_(op.base.reshape(-1)[index])
            return torch.sub(source, minus, out=self._buffer(op, name))
        if source.dtype == torch.float32 and op not in self.todo:
            return source
        return self._buffer(op, name).copy_(source)

    def difference(self, op: Operand, x: torch.Tensor, z: torch.Tensor, name: str) -> torch.Tensor:
        """x - z (a task vector's values), in the task vector's block when its product is taken, else in
        the scratch buffer `name`."""
        return torch.sub(x, z, out=self._buffer(op, name))

    def advance(self) -> None:
        """The chunk is in the blocks: multiply them by Z once they are full (or the pass is at its end)."""
        if not self.todo:
            return
        stop = self.done + self.slot.stop
        if self.slot.stop < self.block and stop < self.n:
            return
        rows = slice(self.done // self.columns, stop // self.columns)
        for op, (basis, out) in self.todo.items():
            spectral.project(self.buffers[op][:self.slot.stop].view(-1, self.columns), basis, out[rows])
        self.done = stop


MetricFn = Callable[[Operand, Operand], float]
UNAVAILABLE = "its computation gave NaN or Inf"  # why a metric is None: see `Metric.__call__`


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    bounds: tuple[float, float | None]
    identical: float | None  # value on identical inputs, where fixed
    needs_base: bool
    matrix_only: bool
    doc: str
    reads_base: bool = False  # reads the base tensor's own values (its norm), beyond the task vectors

    def applies_to(self, a: Operand) -> bool:
        return a.is_matrix or not self.matrix_only

    def __call__(self, a: Operand, b: Operand) -> float | None:
        """The metric's value, or None when it cannot be computed (the computation gave NaN or Inf, see
        UNAVAILABLE): such a metric is absent from the result, never read as a number."""
        value = float(self.fn(a, b))
        return value if math.isfinite(value) else None


REGISTRY: dict[str, Metric] = {}


def metric(
    name: str,
    *,
    bounds: tuple[float, float | None],
    identical: float | None = None,
    needs_base: bool = False,
    matrix_only: bool = False,
    reads_base: bool = False,
) -> Callable[[MetricFn], MetricFn]:
    """Register a metric. `needs_base`: it compares task vectors (model - base); `reads_base`: it also reads
    the base tensor's own values, so LoRA factors alone cannot give it; `matrix_only`: 2-D tensors only."""

    def register(fn: MetricFn) -> MetricFn:
        if fn.__name__ != name or name in REGISTRY:
            raise ValueError(f"metric {name!r} must be registered once, by a function of that name")
        REGISTRY[name] = Metric(
            name, fn, bounds, identical, needs_base, matrix_only, (fn.__doc__ or "").strip(), reads_base
        )
        return fn

    return register


def weight_metrics() -> list[Metric]:
    return [m for m in REGISTRY.values() if not m.needs_base]


def task_metrics() -> list[Metric]:
    return [m for m in REGISTRY.values() if m.needs_base]


def from_task_vectors_alone(m: Metric) -> bool:
    """Whether the metric needs nothing but the two task vectors (LoRA factors give it without the base)."""
    return m.needs_base and not m.reads_base


def base_sample_estimates(m: Metric) -> bool:
    """Whether LoRA adapters of one base compared without reading it (see analysis/adapters.py's
    `SampledWeights`) estimate the metric from a seeded sample of the base's rows: the weights' non-spectral
    metrics and those that read the base's norm."""
    return (not m.needs_base and not m.matrix_only) or m.reads_base


# ---- shared formulas -------------------------------------------------------------------------------


def cosine_from(norm_a: float, norm_b: float, dot: float) -> float:
    """<a, b> / (|a| |b|) from the norms and the dot product, clamped to [-1, 1]; 1 when both are zero."""
    if norm_a < EPS and norm_b < EPS:
        return 1.0
    if norm_a < EPS or norm_b < EPS:
        return 0.0
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def normalized_l2_from(norm_a: float, norm_b: float, distance_sq: float) -> float:
    """|a - b| / (|a| + |b|) from the norms and the squared distance, at most 1."""
    denominator = norm_a + norm_b
    if denominator < EPS:
        return 0.0
    return min(1.0, math.sqrt(max(distance_sq, 0.0)) / denominator)


def kl_bins(numel: int) -> int:
    """The KL histograms' bin count for a tensor of `numel` values (see `kl_divergence`)."""
    return int(min(KL_MAX_BINS, max(KL_MIN_BINS, math.sqrt(numel) / 4)))


def kl_from_samples(x: torch.Tensor, y: torch.Tensor, lo: float, hi: float, numel: int) -> float:
    """The symmetrised KL of `kl_divergence` from the same positions' samples of two tensors of `numel`
    values whose joint range is [lo, hi]."""
    if hi - lo < EPS:
        return 0.0
    bins = kl_bins(numel)
    p = torch.histc(x, bins, lo, hi).double() + KL_SMOOTHING
    q = torch.histc(y, bins, lo, hi).double() + KL_SMOOTHING
    p, q = p / p.sum(), q / q.sum()
    return max(0.0, float(0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())))


def _cosine(a: Operand, b: Operand) -> float:
    if a.norm < EPS or b.norm < EPS:
        return cosine_from(a.norm, b.norm, 0.0)
    return cosine_from(a.norm, b.norm, pair_sums(a, b).dot)


def _normalized_l2(a: Operand, b: Operand) -> float:
    return normalized_l2_from(a.norm, b.norm, pair_sums(a, b).distance_sq)


def _sign_conflict(a: Operand, b: Operand, top: bool) -> float:
    """Share of coordinates non-zero in both (with `top`: above both TIES thresholds) whose signs differ."""
    counts = pair_sums(a, b, signs=True).signs
    assert counts is not None
    both, conflicts = counts[2 if top else 0:][:2]
    return 0.0 if both == 0 else conflicts / both


def _subspace_overlap(x: SVD, y: SVD) -> float:
    k = min(x.k, y.k)
    left = float(((x.u[:, :k].T @ y.u[:, :k]) ** 2).sum()) / k
    right = float(((x.v[:, :k].T @ y.v[:, :k]) ** 2).sum()) / k
    return min(1.0, max(0.0, (left + right) / 2))


def _effective_rank(x: SVD) -> float:
    s = x.spectrum().double()
    total = float(s.sum())
    if total < EPS:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _energy_share(x: SVD) -> float:
    if x.total_energy < EPS:
        return 0.0
    return min(1.0, float((x.s[: x.k].double() ** 2).sum()) / x.total_energy)


# ---- weight metrics --------------------------------------------------------------------------------


@metric("cosine_similarity", bounds=(-1.0, 1.0), identical=1.0)
def cosine_similarity(a: Operand, b: Operand) -> float:
    """<a, b> / (|a| |b|) over the flattened weights (1 when both are zero)."""
    return _cosine(a, b)


@metric("l2_distance", bounds=(0.0, 1.0), identical=0.0)
def l2_distance(a: Operand, b: Operand) -> float:
    """|a - b| / (|a| + |b|): 0 for identical weights, about 0.71 for independent ones of equal norm, at most 1."""
    return _normalized_l2(a, b)


@metric("kl_divergence", bounds=(0.0, None), identical=0.0)
def kl_divergence(a: Operand, b: Operand) -> float:
    """Symmetrised KL, (KL(p|q) + KL(q|p)) / 2, between histograms of the two tensors' values.

    Estimator: shared bins over the joint [min, max], sqrt(n)/4 of them clamped to [KL_MIN_BINS, KL_MAX_BINS]
    so small tensors are not all noise; each count gets KL_SMOOTHING (Jeffreys prior) before normalising.
    The range is the full tensors'; above SAMPLE_SIZE values the counts come from the same positions' sample
    of both (2^20 values, about 16k per bin on average). Sensitive to scale and shape shifts of the weight
    distribution, blind to where weights sit.
    """
    lo = min(a.value_range[0], b.value_range[0])
    hi = max(a.value_range[1], b.value_range[1])
    if hi - lo < EPS:
        return 0.0
    return kl_from_samples(a.sample, b.sample, lo, hi, a.numel)


@metric("spectral_overlap", bounds=(0.0, 1.0), identical=1.0, matrix_only=True)
def spectral_overlap(a: Operand, b: Operand) -> float:
    """Overlap of the top-k singular subspaces: (|U_a^T U_b|_F^2 + |V_a^T V_b|_F^2) / 2k.

    1 when both matrices span the same top-k directions, about k/dim for unrelated ones.
    """
    return _subspace_overlap(a.svd, b.svd)


@metric("effective_rank_ratio", bounds=(0.0, 1.0), identical=1.0, matrix_only=True)
def effective_rank_ratio(a: Operand, b: Operand) -> float:
    """min/max of the two entropy effective ranks, erank = exp(H(s / |s|_1)) (Roy & Vetterli, 2007).

    Above the exact-SVD cap the spectrum past the top singular values is the residual energy spread evenly.
    """
    ra, rb = a.effective_rank, b.effective_rank
    if max(ra, rb) < EPS:
        return 1.0
    return min(ra, rb) / max(ra, rb)


# ---- task-vector metrics (tau = model - base) -----------------------------------------------------


@metric("task_cosine", bounds=(-1.0, 1.0), identical=1.0, needs_base=True)
def task_cosine(a: Operand, b: Operand) -> float:
    """Cosine of the two task vectors: 1 aligned, 0 orthogonal, -1 pulling the base in opposite directions."""
    return _cosine(a, b)


@metric("task_l2_distance", bounds=(0.0, 1.0), identical=0.0, needs_base=True)
def task_l2_distance(a: Operand, b: Operand) -> float:
    """|tau_a - tau_b| / (|tau_a| + |tau_b|): 1 for opposite task vectors of equal size."""
    return _normalized_l2(a, b)


@metric("sign_disagreement", bounds=(0.0, 1.0), identical=0.0, needs_base=True)
def sign_disagreement(a: Operand, b: Operand) -> float:
    """Share of coordinates where both task vectors are non-zero and point opposite ways (TIES' sign conflict)."""
    return _sign_conflict(a, b, top=False)


@metric("sign_disagreement_top", bounds=(0.0, 1.0), identical=0.0, needs_base=True)
def sign_disagreement_top(a: Operand, b: Operand) -> float:
    """Sign conflict among coordinates that survive TIES trimming of both task vectors (top TOP_DENSITY by |.|)."""
    return _sign_conflict(a, b, top=True)


@metric("tsv_interference", bounds=(0.0, 1.0), identical=1.0, needs_base=True, matrix_only=True)
def tsv_interference(a: Operand, b: Operand) -> float:
    """Energy-weighted overlap of the task matrices' singular vectors, after Gargiulo et al. (CVPR 2025, TSV).

    With p_i = s_i^2 / sum_k s^2 for each task matrix's top-k, and C = U_a^T U_b (likewise V):
    I = (sum_ij sqrt(p_i q_j) C_ij^2 [left] + the same [right]) / 2, in [0, 1]. High values mean the two
    tasks write into the same directions: harmless when they agree (identical tasks give 1), destructive
    when they do not, which is how the MCI combines it with `task_cosine`.
    """
    x, y = a.svd, b.svd
    k = min(x.k, y.k)
    if x.total_energy < EPS and y.total_energy < EPS:
        return 1.0  # two untouched tensors are identical (zero) tasks, as task_cosine says 1 for them
    if x.total_energy < EPS or y.total_energy < EPS:
        return 0.0
    p = x.s[:k] ** 2
    q = y.s[:k] ** 2
    weights = torch.sqrt(torch.outer(p / p.sum().clamp_min(EPS), q / q.sum().clamp_min(EPS)))
    left = float((weights * (x.u[:, :k].T @ y.u[:, :k]) ** 2).sum())
    right = float((weights * (x.v[:, :k].T @ y.v[:, :k]) ** 2).sum())
    return min(1.0, max(0.0, (left + right) / 2))


@metric("task_vector_energy", bounds=(0.0, 1.0), needs_base=True, matrix_only=True)
def task_vector_energy(a: Operand, b: Operand) -> float:
    """Mean share of each task matrix's energy (squared singular values) in its top-k directions.

    High: the fine-tune is low-rank and concentrated (DARE/TIES trimming keeps it). Low: spread out.
    """
    return (_energy_share(a.svd) + _energy_share(b.svd)) / 2


@metric("magnitude_ratio", bounds=(0.0, 1.0), identical=1.0, needs_base=True)
def magnitude_ratio(a: Operand, b: Operand) -> float:
    """min(|tau_a|, |tau_b|) / max(...): 1 when both fine-tunes moved equally far from the base."""
    hi = max(a.norm, b.norm)
    return 1.0 if hi < EPS else min(a.norm, b.norm) / hi


@metric("task_drift", bounds=(0.0, None), needs_base=True, reads_base=True)
def task_drift(a: Operand, b: Operand) -> float:
    """Mean relative distance moved from the base: (|tau_a| + |tau_b|) / (2 |base|)."""
    reference = a.reference_norm or b.reference_norm or 0.0
    if reference < EPS:
        return 0.0
    return (a.norm + b.norm) / (2 * reference)


MASS_SHARE = 0.9
def _mass_fraction(x: Operand) -> float:
    """Smallest share of coordinates holding MASS_SHARE of the L1 mass (from the operand's magnitude sample
    above TOP_SAMPLE_SIZE values: the share's standard error is then about 0.001). Kept on the operand for
    its other pairs."""
    cached = x.__dict__.get("_mass_fraction")
    if cached is not None:
        return float(cached)
    magnitude = x.magnitudes
    fraction = 0.0 if magnitude.total < EPS else min(1.0, magnitude.count_holding(MASS_SHARE) / magnitude.n)
    x.__dict__["_mass_fraction"] = fraction
    return fraction


@metric("task_mass_fraction", bounds=(0.0, 1.0), needs_base=True)
def task_mass_fraction(a: Operand, b: Operand) -> float:
    """Mean over both task vectors of the smallest share of coordinates holding 90% of its |.| mass.

    Low: the fine-tune changed few coordinates much (TIES/DARE can keep a low density); about 0.64: dense,
    Gaussian-like changes. It sets the recommended `density`.
    """
    return (_mass_fraction(a) + _mass_fraction(b)) / 2
