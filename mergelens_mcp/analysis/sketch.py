"""Model sketches: each model read once into a small summary from which any pair's metrics are estimated.

Per tensor (and per model, against the zoo's base when there is one) a sketch keeps:
- exactly: the weight norm, the task-vector norm, the base norm, the value range, the TIES threshold and
  mass fraction of the task vector (the same `Operand` code as compare), and the top singular triplets of the
  weight and of the task matrix (above the exact cap the same randomized `decompose` as compare; below it the
  Gram matrix's eigen-decomposition, `gram_decompose`, for compare's exact SVD; the singular vectors stored as
  int8 with one float32 scale per vector, `quantize`; both within SPECTRAL_BOUND of compare's metrics);
- a seeded CountSketch of the weights (`width` signed buckets; linear, so the difference of two sketches is
  the sketch of the difference): |w_a - w_b|^2 = |tau_a - tau_b|^2 is estimated with relative standard error
  at most sqrt(2 / width), and every cosine and distance follows from it and the exact norms;
- a seeded coordinate sample (the same positions in every model) of the weights and the task vector, for the
  sign conflicts (binomial error) and the value histograms of the KL divergence.
A tensor with at most `width` values is kept whole instead: its pair metrics are then exact.

`pair_metrics` gives, per shared tensor, every registry metric the engine would give and a bound on each
estimate: Z standard errors, so a bound fails with probability about 6e-5 per estimate.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import spectral
from .loading import Checkpoint
from .metrics import (
    EPS,
    REGISTRY,
    Operand,
    _effective_rank,
    _mass_fraction,
    cosine_from,
    kl_bins,
    kl_from_samples,
    memo,
    normalized_l2_from,
)
from .spectral import OVERSAMPLE, SVD, gram_decompose, randomized
from .stream import TensorSet, read
from .types import DEFAULT_RANK, EXACT_MAX_ELEMENTS, Cancelled, Progress

SKETCH_VERSION = 6
Z = 4.0  # standard errors per stated bound
SPECTRAL_BOUND = 2e-3  # the Gram path and the int8 vectors move the spectral metrics by less than this
HIGHER_IS_BETTER = ("cosine_similarity", "task_cosine", "spectral_overlap", "effective_rank_ratio")


@dataclass(frozen=True)
class SketchParams:
    """How a sketch is drawn: equal parameters (and equal files) give equal sketches, bit for bit."""

    seed: int = 0
    width: int = 8192  # CountSketch buckets per tensor, at least
    width_share: float = 1 / 1024  # ... or this share of the tensor's values, when larger
    samples: int = 8192  # sampled coordinates per tensor, at least
    sample_share: float = 1 / 2048
    rank: int = DEFAULT_RANK
    exact_max_elements: int = EXACT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        if self.width < 1 or self.samples < 1 or self.rank < 1:
            raise ValueError("width, samples and rank must be at least 1")
        if not (0 <= self.width_share <= 1 and 0 <= self.sample_share <= 1):
            raise ValueError("width_share and sample_share must be within 0..1")

    def widths(self, numel: int) -> tuple[int, int]:
        """(buckets, samples) for a tensor of `numel` values."""
        return (max(self.width, math.ceil(numel * self.width_share)),
                min(numel, max(self.samples, math.ceil(numel * self.sample_share))))


@dataclass
class TensorSketch:
    numel: int
    shape: tuple[int, ...]
    norm: float
    value_range: tuple[float, float]
    projection: torch.Tensor  # float32: CountSketch buckets, or the whole flattened tensor when `whole`
    whole: bool
    sample: torch.Tensor  # weights at the sampled coordinates (bfloat16: signs and stored values kept)
    svd: SVD | None = None
    # with a base:
    task_norm: float | None = None
    base_norm: float | None = None
    task_sample: torch.Tensor | None = None
    top_threshold: float | None = None
    mass_fraction: float | None = None
    task_svd: SVD | None = None
    effective_rank: float | None = None  # of the weights' spectrum (`_effective_rank`), made once when sketched
    spectral_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # `spectral_of`
    pair_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)  # `_prepared`

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2 and min(self.shape) > 1

    @property
    def nbytes(self) -> int:
        """Its size as stored (singular vectors as int8 plus a float32 scale per vector)."""
        tensors = [self.projection, self.sample, *([self.task_sample] if self.task_sample is not None else [])]
        size = sum(t.numel() * t.element_size() for t in tensors)
        for svd in (self.svd, self.task_svd):
            if svd is not None:
                size += svd.u.numel() + svd.v.numel() + 4 * (svd.u.shape[1] + svd.v.shape[1]) + 4 * svd.s.numel()
        return size


@dataclass
class ModelSketch:
    """Every float tensor of one model (against one base, or none)."""

    label: str
    key: str  # the content key of the files and parameters it was drawn from
    n_params: int
    nbytes: int  # the model's stored bytes
    has_base: bool
    tensors: dict[str, TensorSketch] = field(default_factory=dict)

    @property
    def sketch_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ------------------------------------------------------------------------------------------- drawing


def _seed(params: SketchParams, name: str, numel: int, what: str) -> int:
    digest = hashlib.sha256(f"{params.seed}:{what}:{name}:{numel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


CHUNK = 1 << 20


def _draws(width: int, rows: int, seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """A sign pool of 2 * `width` (+-1, float32: the pool twice over, so any window of `width` is one slice)
    and per row of `width` values its bucket shift and its sign-pool shift, all from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    pool = 1.0 - 2.0 * torch.randint(0, 2, (width,), generator=g, dtype=torch.int32).float()
    shifts = torch.randint(0, width, (2, rows), generator=g)
    return torch.cat([pool, pool]), shifts[0].tolist(), shifts[1].tolist()


class CountSketcher:
    """The CountSketch of `count_sketch`, fed consecutive pieces of the flattened values (in order, from the
    start), so it rides on a pass that reads the tensor for other sums too. A row split across two pieces is
    added in two steps into disjoint buckets: the result is the same, bit for bit, as one step."""

    def __init__(self, numel: int, width: int, seed: int) -> None:
        self.width = width
        self.pool, self.shift, self.sign_shift = _draws(width, -(-numel // width), seed)
        self.acc = torch.zeros(2 * width, dtype=torch.float32)
        self.fed = 0

    def add(self, piece: torch.Tensor) -> None:
        """Add the next float32 values of the flattened tensor."""
        width, start, done = self.width, self.fed, 0
        total = piece.numel()
        while done < total:
            r, offset = divmod(start + done, width)
            count = min(total - done, width - offset)
            o, t = self.shift[r] + offset, self.sign_shift[r] + offset
            self.acc[o:o + count].addcmul_(piece[done:done + count], self.pool[t:t + count])
            done += count
        self.fed += total

    def result(self) -> torch.Tensor:
        return self.acc[:self.width] + self.acc[self.width:]


def count_sketch(values: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """A CountSketch of the flattened `values` into `width` signed buckets (float32).

    The values are cut into rows of `width`; row r is multiplied by the window of a seeded random sign pool
    that starts at a seeded shift t_r and added into the buckets cyclically shifted by a seeded o_r. Two
    coordinates of one row never share a bucket, two of different rows share one with probability 1 / width
    (the shifts are independent and uniform), and their signs come from different pool positions but with
    the same probability: the second moment is that of a CountSketch with a pairwise-independent hash,
    Var |S d|^2 <= 2 |d|^4 / width, at the cost of one fused multiply-add per value and no per-value
    random draw. Linear and seeded: the difference of two sketches is the sketch of the difference."""
    flat = values.reshape(-1)
    sketcher = CountSketcher(flat.numel(), width, seed)
    step = max(width, CHUNK // width * width)
    for start in range(0, flat.numel(), step):
        sketcher.add(flat[start:start + step].float())
    return sketcher.result()


def sample_positions(numel: int, count: int, seed: int) -> torch.Tensor:
    """About `count` distinct coordinates of a tensor of `numel` values, sorted (all of them when count >=
    numel): `count` seeded uniform draws with the repeats dropped, so the cost follows the sample, not the
    tensor."""
    if count >= numel:
        return torch.arange(numel)
    g = torch.Generator().manual_seed(seed)
    return torch.unique(torch.randint(0, numel, (count,), generator=g))


def quantize(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit columns as int8 and one float32 scale per column (its largest magnitude / 127): a rounding error
    of at most scale / 2 per value, which moves the spectral metrics by less than SPECTRAL_BOUND."""
    scale = (vectors.abs().amax(dim=0).float() / 127.0).clamp_min(1e-30)
    return torch.round(vectors.float() / scale).to(torch.int8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.mul(values, scale)  # int8 x float32 -> float32 in one step


def sketch_nbytes(shape: tuple[int, ...], params: SketchParams, has_base: bool) -> int:
    """The stored bytes of one tensor's sketch, from its shape and the parameters alone (the bench uses it for
    shapes it does not generate, e.g. 7B)."""
    numel = math.prod(shape)
    width, count = params.widths(numel)
    size = 4 * (numel if numel <= width else width) + 2 * count * (2 if has_base else 1)
    if len(shape) == 2 and min(shape) > 1:
        m, n = shape
        k, full = min(params.rank, m, n), min(m, n)
        exact = numel <= params.exact_max_elements or k + OVERSAMPLE >= full
        one = k * (m + n) + 8 * k + 4 * (full if exact else k + OVERSAMPLE)
        size += one * (2 if has_base else 1)
    return size


BLOCK = 1 << 18  # values per step of the sketch's pass: a float32 block (1 MB) stays in cache for its sums


@dataclass
class _Pass:
    """What the sketch's one float32 pass over a tensor (and the base's) gives."""

    norm_sq: float = 0.0
    task_norm_sq: float = 0.0
    base_norm_sq: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    projection: torch.Tensor | None = None
    product: torch.Tensor | None = None  # weights @ z_w
    task_product: torch.Tensor | None = None  # (weights - base) @ z_t


def _one_pass(
    view: torch.Tensor, base_view: torch.Tensor | None, sketcher: CountSketcher | None,
    z: torch.Tensor | None, task_z: torch.Tensor | None, base_norm: bool,
) -> _Pass:
    """One read of the tensor (and of the base's) upcast to float32, a block of rows at a time: the squared
    norms of the weights, of the task vector and (with `base_norm`) of the base, the value range, the
    CountSketch, and the float32 products with the randomized SVDs' bases (what `Operand.norm`,
    `Operand.value_range`, `count_sketch` and `decompose`'s final product each read the tensor for)."""
    rows = view.reshape(view.shape[0], -1) if view.dim() >= 2 else view.reshape(-1, 1)
    base_rows = None if base_view is None else base_view.reshape(rows.shape)
    m, n = rows.shape
    out = _Pass()
    if z is not None:
        out.product = torch.empty(m, z.shape[1])
    if task_z is not None:
        out.task_product = torch.empty(m, task_z.shape[1])
    step = max(1, BLOCK // n)
    for start in range(0, m, step):
        w = rows[start:start + step].float()
        out.norm_sq += float((w * w).sum())
        lo, hi = torch.aminmax(w)
        out.lo, out.hi = min(out.lo, float(lo)), max(out.hi, float(hi))
        if sketcher is not None:
            sketcher.add(w.reshape(-1))
        if out.product is not None:
            spectral.project(w, z, out.product[start:start + step])
        if base_rows is None:
            continue
        b = base_rows[start:start + step].float()
        if base_norm:
            out.base_norm_sq += float((b * b).sum())
        t = w - b
        out.task_norm_sq += float((t * t).sum())
        if out.task_product is not None:
            spectral.project(t, task_z, out.task_product[start:start + step])
    if sketcher is not None:
        out.projection = sketcher.result()
    return out


class BaseTensors:
    """The base's per-tensor quantities a sketch needs (its norm, the sampled coordinates and its values there),
    made once per base and kept for every model sketched against it in this process: every model of a zoo samples
    a tensor at the same coordinates. Keyed by the base's files (path, size, mtime: a changed base is measured
    again); the last KEEP bases are kept (6 bytes per sampled coordinate: about 1/680 of a bf16 base's bytes),
    behind a lock (a server may sketch two zoos at once in threads); `release_bases` empties it (the zoo does at
    its end, so a server keeps nothing between requests). A base missing here is only measured again."""

    KEEP = 2

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bases: OrderedDict[tuple[Any, ...], dict[tuple[str, int, int, int], BaseTensor]] = OrderedDict()

    @staticmethod
    def identity(base: Checkpoint) -> tuple[Any, ...]:
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in base.files)

    def get(self, base: tuple[Any, ...], key: tuple[str, int, int, int]) -> BaseTensor | None:
        with self.lock:
            return self.bases.get(base, {}).get(key)

    def put(self, base: tuple[Any, ...], key: tuple[str, int, int, int], found: BaseTensor) -> None:
        with self.lock:
            self.bases.setdefault(base, {})[key] = found
            self.bases.move_to_end(base)
            while len(self.bases) > self.KEEP:
                self.bases.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.bases.clear()


@dataclass(frozen=True)
class BaseTensor:
    norm: float
    positions: torch.Tensor  # int32
    sample: torch.Tensor  # the base's values there, as stored


_BASES = BaseTensors()


def release_bases() -> None:
    """Forget the bases' kept quantities (they are made again when next needed)."""
    _BASES.clear()


def _svd_of(op: Operand) -> SVD | None:
    """The operand's top singular triplets where compare takes the exact SVD: from the eigen-decomposition of
    the Gram matrix (`gram_decompose`: the same values and vectors to float32 rounding, at about half the
    cost). (Above the exact cap `sketch_tensor` takes compare's randomized path, its final product in its pass.)"""
    svd = gram_decompose(op.tensor, op.rank, minus=op.base)
    return SVD(svd.u.float(), svd.s.float(), svd.v.float(), svd.total_energy, svd.full_dim, svd.exact)


def sketch_tensor(
    name: str, view: torch.Tensor, base_view: torch.Tensor | None, params: SketchParams,
    base_key: tuple[Any, ...] | None = None,
) -> TensorSketch:
    """The sketch of one tensor of one model (`base_view`: the base's same tensor, or None), in one float32
    pass over the tensor and the base's (`_one_pass`) after the randomized SVDs' bfloat16 iterations; the
    quantities are compare's (`Operand`, `decompose`), to float32 rounding. With `base_key` (the base's
    `BaseTensors.identity`) the base's own quantities are made once per base and tensor."""
    if base_view is not None and tuple(base_view.shape) != tuple(view.shape):
        base_view = None  # compared before flattening: a conv weight (4-D) keeps its base
    view = view.reshape(view.shape[0], -1) if view.dim() > 2 else view
    base_view = None if base_view is None else base_view.reshape(view.shape)
    numel = view.numel()
    width, count = params.widths(numel)
    flat = view.reshape(-1)
    whole = numel <= width
    matrix = view.dim() == 2 and min(view.shape) > 1
    fast = matrix and randomized(view.shape, params.rank, params.exact_max_elements)
    z = spectral.subspace(view, params.rank) if fast else None
    task_z = spectral.subspace(view, params.rank, minus=base_view) if fast and base_view is not None else None
    cached = (name, numel, count, params.seed)
    seen = _BASES.get(base_key, cached) if base_view is not None and base_key is not None else None
    sketcher = None if whole else CountSketcher(numel, width, _seed(params, name, numel, "cs"))
    measured = _one_pass(view, base_view, sketcher, z, task_z, base_norm=seen is None)
    projection = flat.float().clone() if whole else measured.projection
    assert projection is not None
    positions = seen.positions if seen is not None else sample_positions(numel, count,
                                                                          _seed(params, name, numel, "sample"))
    sample = flat[positions].float()  # float32 here; stored as bfloat16 below
    full_dim = min(view.shape) if matrix else 0

    def svd_of(product: torch.Tensor | None, zz: torch.Tensor | None, energy: float, op: Operand) -> SVD | None:
        if not matrix:
            return None
        if product is None or zz is None:
            return _svd_of(op)
        found = spectral.finish(product, zz, params.rank, full_dim, energy)
        return SVD(found.u.float(), found.s.float(), found.v.float(), found.total_energy, found.full_dim, False)

    norm = math.sqrt(max(measured.norm_sq, 0.0))
    weights = Operand(view, rank=params.rank, exact_max_elements=params.exact_max_elements)
    found = TensorSketch(numel, tuple(view.shape), norm, (measured.lo, measured.hi), projection, whole,
                         sample.to(torch.bfloat16), svd_of(measured.product, z, norm**2, weights))
    if found.svd is not None:
        found.effective_rank = _effective_rank(found.svd)
    if base_view is not None:
        if seen is None:
            seen = BaseTensor(math.sqrt(max(measured.base_norm_sq, 0.0)), positions.to(torch.int32),
                              base_view.reshape(-1)[positions])
            if base_key is not None:
                _BASES.put(base_key, cached, seen)
        base_norm, base_sample = seen.norm, seen.sample.float()
        task = Operand(view, rank=params.rank, exact_max_elements=params.exact_max_elements, base=base_view)
        task_norm = math.sqrt(max(measured.task_norm_sq, 0.0))
        found.task_norm, found.base_norm = task_norm, base_norm
        found.task_sample = (sample - base_sample).to(torch.bfloat16)
        found.top_threshold = task.top_threshold
        found.mass_fraction = _mass_fraction(task)
        found.task_svd = svd_of(measured.task_product, task_z, task_norm**2, task)
    return found


def sketch_model(
    model: Checkpoint,
    base: Checkpoint | None,
    params: SketchParams,
    key: str = "",
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> ModelSketch:
    """Read `model` once (with the base's same tensors) through the tensor stream and sketch every float tensor."""

    names = list(model.float_tensors)
    sets = []
    for name in names:
        sources = [(model, name)]
        if base is not None and name in base.float_tensors and base.tensors[name].shape == model.tensors[name].shape:
            sources.append((base, name))
        sets.append(TensorSet(name, sources))
    out = ModelSketch(model.label, key, model.n_params, model.nbytes, base is not None)
    base_key = None if base is None else BaseTensors.identity(base)
    for current in read(sets, f"sketching {model.label}", cancelled=cancelled, progress=progress):
        base_view = current.views[1] if len(current.views) > 1 else None
        out.tensors[current.key] = sketch_tensor(current.key, current.views[0], base_view, params, base_key)
    return out


# ------------------------------------------------------------------------------------------- storing


class _Packer:
    """Tensors of one kind laid end to end in one flat tensor, each remembered by its [start, shape]: a sketch
    is a dozen stored tensors, not ten per model tensor (loading 1,200 named tensors was most of a load)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, kind: str, t: torch.Tensor) -> list[Any]:
        start = self.sizes.get(kind, 0)
        self.parts.setdefault(kind, []).append(t.reshape(-1))
        self.sizes[kind] = start + t.numel()
        return [start, list(t.shape)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {kind: torch.cat(parts).contiguous() for kind, parts in self.parts.items()}


def _unpack(tensors: Mapping[str, torch.Tensor], kind: str, where: list[Any]) -> torch.Tensor:
    start, shape = where
    return tensors[kind][start:start + math.prod(shape)].view(shape)


def to_tensors(sketch: ModelSketch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sketch as a few packed tensors (one per kind of array) and JSON-able metadata saying where each
    tensor's arrays lie in them (for a safetensors file or a Ray object)."""
    packed = _Packer()
    meta: dict[str, Any] = {"label": sketch.label, "key": sketch.key, "n_params": sketch.n_params,
                            "nbytes": sketch.nbytes, "has_base": sketch.has_base, "tensors": {}}
    for i, (name, t) in enumerate(sketch.tensors.items()):
        entry = {"name": name, "numel": t.numel, "shape": list(t.shape), "norm": t.norm,
                 "value_range": list(t.value_range), "whole": t.whole, "task_norm": t.task_norm,
                 "base_norm": t.base_norm, "top_threshold": t.top_threshold, "mass_fraction": t.mass_fraction,
                 "projection": packed.add("projection", t.projection), "sample": packed.add("sample", t.sample)}
        if t.task_sample is not None:
            entry["task_sample"] = packed.add("task_sample", t.task_sample)
        for what, svd in (("svd", t.svd), ("task_svd", t.task_svd)):
            if svd is not None:
                (u, u_scale), (v, v_scale) = quantize(svd.u), quantize(svd.v)
                entry[what] = [svd.total_energy, svd.full_dim, svd.exact]
                entry[what + ".at"] = {x: packed.add(f"{what}.{x}", y) for x, y in
                                       (("u", u), ("u_scale", u_scale), ("s", svd.s), ("v", v), ("v_scale", v_scale))}
        if t.effective_rank is not None:
            entry["effective_rank"] = t.effective_rank
        meta["tensors"][str(i)] = entry
    return packed.tensors(), meta


def from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> ModelSketch:
    out = ModelSketch(meta["label"], meta["key"], meta["n_params"], meta["nbytes"], meta["has_base"])
    for entry in meta["tensors"].values():

        def svd(what: str, entry: Mapping[str, Any] = entry) -> SVD | None:
            if what not in entry:
                return None
            energy, full_dim, exact = entry[what]  # int8 when stored, float32 in memory for the pairs
            t = {x: _unpack(tensors, f"{what}.{x}", at) for x, at in entry[what + ".at"].items()}
            return SVD(dequantize(t["u"], t["u_scale"]), t["s"], dequantize(t["v"], t["v_scale"]),
                       float(energy), int(full_dim), bool(exact))

        task_sample = _unpack(tensors, "task_sample", entry["task_sample"]) if "task_sample" in entry else None
        out.tensors[entry["name"]] = TensorSketch(
            int(entry["numel"]), tuple(entry["shape"]), float(entry["norm"]), tuple(entry["value_range"]),
            _unpack(tensors, "projection", entry["projection"]), bool(entry["whole"]),
            _unpack(tensors, "sample", entry["sample"]), svd("svd"),
            entry["task_norm"], entry["base_norm"], task_sample, entry["top_threshold"],
            entry["mass_fraction"], svd("task_svd"), entry.get("effective_rank"),
        )
    return out


# ------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Estimate:
    """A tensor pair's metrics and the half-width of each one's bound (0 where it is computed exactly)."""

    values: dict[str, float]
    bounds: dict[str, float]


class _Spectral:
    """What the registry's spectral metrics read from an operand: its SVD and effective rank (made once per
    sketched tensor, however many pairs read it: `spectral_of`)."""

    def __init__(self, svd: SVD) -> None:
        self.svd = SVD(svd.u.float(), svd.s.float(), svd.v.float(), svd.total_energy, svd.full_dim, svd.exact)

    @memo
    def effective_rank(self) -> float:
        return _effective_rank(self.svd)


def spectral_of(t: TensorSketch, what: str) -> _Spectral | None:
    """The `_Spectral` of a sketched tensor's weight ("svd") or task ("task_svd"), kept on the tensor."""
    svd = getattr(t, what)
    if svd is None:
        return None
    found = t.spectral_cache.get(what)
    if found is None:
        found = t.spectral_cache[what] = _Spectral(svd)
        if what == "svd" and t.effective_rank is not None:
            found.__dict__["effective_rank"] = t.effective_rank  # made when sketched: the same value
    return found


SIGN_CODES = 8  # a sampled task coordinate's code: non-zero (1) + positive (2) + at or above the TIES threshold (4)


def _prepared(t: TensorSketch) -> dict[str, torch.Tensor]:
    """What every pair reads of one sketched tensor, made once for all its pairs: each sampled task
    coordinate's sign code (`SIGN_CODES`), and the code times 8 (uint8: 2 bytes per sampled coordinate kept)."""
    found = t.pair_cache
    if not found and t.task_sample is not None:
        x = t.task_sample.float()
        code = ((x != 0).to(torch.uint8) + 2 * (x > 0).to(torch.uint8)
                + 4 * (x.abs() >= (t.top_threshold or 0.0)).to(torch.uint8))
        found["codes"], found["codes_high"] = code, code * SIGN_CODES
    return found


def _code_masks() -> torch.Tensor:
    """(4, 64) indicators over the joint codes 8 a + b: both non-zero; and signs differing; both non-zero
    and at or above both thresholds; and signs differing."""
    a, b = torch.arange(64) // 8, torch.arange(64) % 8
    both = (a & 1).bool() & (b & 1).bool()
    differ = both & ((a & 2) != (b & 2))
    top = both & (a & 4).bool() & (b & 4).bool()
    return torch.stack([both, differ, top, differ & top]).to(torch.int64)


CODE_MASKS = _code_masks()


def _sign_counts(a: TensorSketch, b: TensorSketch) -> list[int]:
    """[both non-zero, and opposite signs, both in the top, and opposite signs] over the sampled task
    coordinates: one count of the 64 joint codes, the same integers as four masked sums."""
    joint = torch.bincount(_prepared(a)["codes_high"] + _prepared(b)["codes"], minlength=64)
    return (CODE_MASKS @ joint).tolist()


def _distance_sq(a: TensorSketch, b: TensorSketch) -> tuple[float, float]:
    """(|w_a - w_b|^2 estimated, its relative bound) from the two CountSketches (exact for whole tensors)."""
    d = a.projection.double() - b.projection.double()
    value = float((d * d).sum())
    if a.whole:
        return value, 0.0
    return value, Z * math.sqrt(2.0 / a.projection.numel())


def _cosine_from(norm_a: float, norm_b: float, d_sq: float) -> float:
    """The registry's cosine, its dot product from the norms and the squared distance."""
    return cosine_from(norm_a, norm_b, (norm_a**2 + norm_b**2 - d_sq) / 2)


def _share(hits: int, total: int) -> tuple[float, float]:
    """A binomial share and Z standard errors of it (a one-count floor keeps small totals honest)."""
    if total == 0:
        return 0.0, 0.0
    p = hits / total
    return p, Z * math.sqrt(max(p * (1 - p), 1.0 / total) / total)


def pair_metrics(a: TensorSketch, b: TensorSketch) -> Estimate:
    """Every metric of the engine for one tensor of two sketched models, with bounds."""
    values: dict[str, float] = {}
    bounds: dict[str, float] = {}
    d_sq, rel = _distance_sq(a, b)
    d_lo, d_hi = max(d_sq / (1 + rel), 0.0), d_sq / (1 - rel) if rel < 1 else float("inf")

    def spread(fn: Any, na: float, nb: float, name: str) -> None:
        v = fn(na, nb, d_sq)
        lo, hi = sorted((fn(na, nb, d_lo), fn(na, nb, min(d_hi, (na + nb) ** 2))))
        values[name], bounds[name] = v, max(v - lo, hi - v)

    spread(_cosine_from, a.norm, b.norm, "cosine_similarity")
    spread(normalized_l2_from, a.norm, b.norm, "l2_distance")
    values["kl_divergence"], bounds["kl_divergence"] = _kl(a, b)
    sa, sb = spectral_of(a, "svd"), spectral_of(b, "svd")
    if a.is_matrix and sa is not None and sb is not None:
        for name in ("spectral_overlap", "effective_rank_ratio"):
            values[name], bounds[name] = float(REGISTRY[name].fn(sa, sb)), SPECTRAL_BOUND  # type: ignore[arg-type]
    if a.task_norm is None or b.task_norm is None:
        return Estimate(values, bounds)
    spread(_cosine_from, a.task_norm, b.task_norm, "task_cosine")
    spread(normalized_l2_from, a.task_norm, b.task_norm, "task_l2_distance")
    assert a.task_sample is not None and b.task_sample is not None
    both, conflict, top, conflict_top = _sign_counts(a, b)
    values["sign_disagreement"], bounds["sign_disagreement"] = _share(conflict, both)
    values["sign_disagreement_top"], bounds["sign_disagreement_top"] = _share(conflict_top, top)
    if a.sample.numel() == a.numel:  # every coordinate sampled: the shares are exact
        bounds["sign_disagreement"] = bounds["sign_disagreement_top"] = 0.0
    hi = max(a.task_norm, b.task_norm)
    values["magnitude_ratio"] = 1.0 if hi < EPS else min(a.task_norm, b.task_norm) / hi
    reference = a.base_norm or 0.0
    values["task_drift"] = 0.0 if reference < EPS else (a.task_norm + b.task_norm) / (2 * reference)
    values["task_mass_fraction"] = ((a.mass_fraction or 0.0) + (b.mass_fraction or 0.0)) / 2
    bounds.update(magnitude_ratio=0.0, task_drift=0.0, task_mass_fraction=0.0)
    ta, tb = spectral_of(a, "task_svd"), spectral_of(b, "task_svd")
    if ta is not None and tb is not None:
        for name in ("tsv_interference", "task_vector_energy"):
            values[name], bounds[name] = float(REGISTRY[name].fn(ta, tb)), SPECTRAL_BOUND  # type: ignore[arg-type]
    return Estimate(values, bounds)


def _kl(a: TensorSketch, b: TensorSketch) -> tuple[float, float]:
    """The engine's symmetrised KL over shared bins, from the two samples (same coordinates in both)."""
    lo, hi = min(a.value_range[0], b.value_range[0]), max(a.value_range[1], b.value_range[1])
    if hi - lo < EPS:
        return 0.0, 0.0
    value = kl_from_samples(a.sample.float(), b.sample.float(), lo, hi, a.numel)
    bins = kl_bins(a.numel)
    n = a.sample.numel()
    exact = n == a.numel
    return value, 0.0 if exact else Z * (bins / n + math.sqrt(2.0 * bins) / n)


def shared_tensors(a: ModelSketch, b: ModelSketch) -> Iterator[str]:
    """The tensors both sketches hold with the same shape, in `a`'s order."""
    for name, t in a.tensors.items():
        other = b.tensors.get(name)
        if other is not None and other.shape == t.shape:
            yield name


def pessimistic(metrics: Mapping[str, float], bounds: Mapping[str, float], worse: bool) -> dict[str, float]:
    """`metrics` each moved by its bound towards a worse merge (`worse`) or a better one, clamped to the
    metric's range: the MCI is monotone in each, so the two give its bound."""
    out = {}
    for name, value in metrics.items():
        step = bounds.get(name, 0.0)
        down = (name in HIGHER_IS_BETTER) == worse
        moved = value - step if down else value + step
        lo, hi = REGISTRY[name].bounds if name in REGISTRY else (0.0, None)
        out[name] = max(lo, moved) if hi is None else max(lo, min(hi, moved))
    return out


def weighted(items: Iterable[tuple[float, float]]) -> float | None:
    pairs = list(items)
    total = sum(w for _, w in pairs)
    return None if total <= 0 else sum(v * w for v, w in pairs) / total
