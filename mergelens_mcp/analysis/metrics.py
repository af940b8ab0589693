"""The metric registry: one decorated function per metric, computed per tensor for a pair of models.

Each metric receives two `Operand`s: the two models' weights, or, for metrics marked `needs_base`, their
task vectors (model - base). Operands cache what several metrics share (norms, the SVD), so every tensor
is decomposed once however many metrics and pairs use it. A metric's key is its function's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from .spectral import DEFAULT_RANK, EXACT_MAX_ELEMENTS, SVD, decompose

KL_MAX_BINS = 64
KL_MIN_BINS = 8
KL_SMOOTHING = 0.5
TOP_DENSITY = 0.2
EPS = 1e-12
CHUNK = 1 << 20  # elements per float64 accumulation chunk


def dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """<x, y> of two flat float32 tensors, accumulated in float64 chunk by chunk.

    float32 accumulation over millions of near-identical weights loses the signal: for all-MiniLM-L6-v2
    against a fine-tune it put 1 - cos off by 2x on a 590k-element matrix. Chunking keeps memory flat.
    """
    return sum(float(torch.dot(x[i:i + CHUNK].double(), y[i:i + CHUNK].double())) for i in range(0, x.numel(), CHUNK))


def distance64(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x - y| of two flat float32 tensors, accumulated in float64."""
    total = 0.0
    for i in range(0, x.numel(), CHUNK):
        d = x[i:i + CHUNK].double() - y[i:i + CHUNK].double()
        total += float(torch.dot(d, d))
    return math.sqrt(total)


class Operand:
    """One tensor of one model (or its task vector) with lazily cached statistics."""

    def __init__(
        self,
        tensor: torch.Tensor,
        *,
        rank: int = DEFAULT_RANK,
        exact_max_elements: int = EXACT_MAX_ELEMENTS,
        reference_norm: float | None = None,
    ) -> None:
        self.tensor = tensor
        self.rank = rank
        self.exact_max_elements = exact_max_elements
        self.reference_norm = reference_norm  # the base tensor's norm, for task vectors

    @cached_property
    def flat(self) -> torch.Tensor:
        return self.tensor.reshape(-1)

    @cached_property
    def norm(self) -> float:
        return math.sqrt(max(dot64(self.flat, self.flat), 0.0))

    @property
    def is_matrix(self) -> bool:
        return self.tensor.dim() == 2 and min(self.tensor.shape) > 1

    @cached_property
    def svd(self) -> SVD:
        return decompose(self.tensor, self.rank, self.exact_max_elements)

    @cached_property
    def top_mask(self) -> torch.Tensor:
        """Coordinates kept by TIES-style trimming to the top TOP_DENSITY fraction by magnitude."""
        magnitude = self.flat.abs()
        keep = max(1, int(math.ceil(TOP_DENSITY * magnitude.numel())))
        if keep >= magnitude.numel():
            return magnitude > 0
        threshold = torch.kthvalue(magnitude.cpu(), magnitude.numel() - keep + 1).values.to(magnitude.device)
        return (magnitude >= threshold) & (magnitude > 0)


MetricFn = Callable[[Operand, Operand], float]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    bounds: tuple[float, float | None]
    identical: float | None  # value on identical inputs, where fixed
    needs_base: bool
    matrix_only: bool
    doc: str

    def applies_to(self, a: Operand) -> bool:
        return a.is_matrix or not self.matrix_only

    def __call__(self, a: Operand, b: Operand) -> float:
        value = float(self.fn(a, b))
        return value if math.isfinite(value) else 0.0


REGISTRY: dict[str, Metric] = {}


def metric(
    name: str,
    *,
    bounds: tuple[float, float | None],
    identical: float | None = None,
    needs_base: bool = False,
    matrix_only: bool = False,
) -> Callable[[MetricFn], MetricFn]:
    def register(fn: MetricFn) -> MetricFn:
        if fn.__name__ != name or name in REGISTRY:
            raise ValueError(f"metric {name!r} must be registered once, by a function of that name")
        REGISTRY[name] = Metric(name, fn, bounds, identical, needs_base, matrix_only, (fn.__doc__ or "").strip())
        return fn

    return register


def weight_metrics() -> list[Metric]:
    return [m for m in REGISTRY.values() if not m.needs_base]


def task_metrics() -> list[Metric]:
    return [m for m in REGISTRY.values() if m.needs_base]


# ---- shared formulas -------------------------------------------------------------------------------


def _cosine(a: Operand, b: Operand) -> float:
    if a.norm < EPS and b.norm < EPS:
        return 1.0
    if a.norm < EPS or b.norm < EPS:
        return 0.0
    return max(-1.0, min(1.0, dot64(a.flat, b.flat) / (a.norm * b.norm)))


def _normalized_l2(a: Operand, b: Operand) -> float:
    denominator = a.norm + b.norm
    if denominator < EPS:
        return 0.0
    return min(1.0, distance64(a.flat, b.flat) / denominator)


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
    Sensitive to scale and shape shifts of the weight distribution, blind to where weights sit.
    """
    lo = min(float(a.flat.min()), float(b.flat.min()))
    hi = max(float(a.flat.max()), float(b.flat.max()))
    if hi - lo < EPS:
        return 0.0
    bins = int(min(KL_MAX_BINS, max(KL_MIN_BINS, math.sqrt(a.flat.numel()) / 4)))
    p = torch.histc(a.flat, bins, lo, hi).double() + KL_SMOOTHING
    q = torch.histc(b.flat, bins, lo, hi).double() + KL_SMOOTHING
    p, q = p / p.sum(), q / q.sum()
    return max(0.0, float(0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())))


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
    ra, rb = _effective_rank(a.svd), _effective_rank(b.svd)
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
    both = (a.flat != 0) & (b.flat != 0)
    if not bool(both.any()):
        return 0.0
    return float((torch.sign(a.flat[both]) != torch.sign(b.flat[both])).float().mean())


@metric("sign_disagreement_top", bounds=(0.0, 1.0), identical=0.0, needs_base=True)
def sign_disagreement_top(a: Operand, b: Operand) -> float:
    """Sign conflict among coordinates that survive TIES trimming of both task vectors (top TOP_DENSITY by |.|)."""
    both = a.top_mask & b.top_mask
    if not bool(both.any()):
        return 0.0
    return float((torch.sign(a.flat[both]) != torch.sign(b.flat[both])).float().mean())


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


@metric("task_drift", bounds=(0.0, None), needs_base=True)
def task_drift(a: Operand, b: Operand) -> float:
    """Mean relative distance moved from the base: (|tau_a| + |tau_b|) / (2 |base|)."""
    reference = a.reference_norm or b.reference_norm or 0.0
    if reference < EPS:
        return 0.0
    return (a.norm + b.norm) / (2 * reference)


MASS_SHARE = 0.9
MASS_SAMPLE = 1 << 20


def _mass_fraction(x: Operand) -> float:
    """Smallest share of coordinates holding MASS_SHARE of the L1 mass (a strided sample above 1M values)."""
    flat = x.flat
    if flat.numel() > MASS_SAMPLE:
        flat = flat[:: -(-flat.numel() // MASS_SAMPLE)]
    magnitude = flat.abs().double().sort(descending=True).values
    total = float(magnitude.sum())
    if total < EPS:
        return 0.0
    target = torch.tensor([MASS_SHARE * total], dtype=torch.float64, device=magnitude.device)
    needed = int(torch.searchsorted(magnitude.cumsum(0), target))
    return min(1.0, (needed + 1) / magnitude.numel())


@metric("task_mass_fraction", bounds=(0.0, 1.0), needs_base=True)
def task_mass_fraction(a: Operand, b: Operand) -> float:
    """Mean over both task vectors of the smallest share of coordinates holding 90% of its |.| mass.

    Low: the fine-tune changed few coordinates much (TIES/DARE can keep a low density); about 0.64: dense,
    Gaussian-like changes. It sets the recommended `density`.
    """
    return (_mass_fraction(a) + _mass_fraction(b)) / 2
