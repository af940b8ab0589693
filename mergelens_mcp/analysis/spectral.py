"""Singular value decompositions for the spectral metrics: exact below a size cap, randomized above it.

Every 2-D parameter gets one; none is skipped for its size. The randomized path is a randomized subspace
iteration (Halko, Martinsson & Tropp, 2011, Algorithm 4.4): a Gaussian sketch of `rank + OVERSAMPLE`
columns (16 + 16 by default), alternating products with A^T and A re-orthonormalised by QR (`POWER_ITERS`
= 1 full iteration, then the half that ends on the right singular subspace Z), and a Rayleigh-Ritz step on
Z: A Z = Q R and an SVD of the small R. That is four thin products in bfloat16 and one in float32, so the
cost is linear in the matrix's size. It uses its own seeded generator, so results are deterministic and
threads do not share random state. Its error against the exact SVD on matrices with decaying spectra is
bounded in tests/test_spectral.py: on the hard case there (s_i = 1/i) the top-16 singular values are within
0.09%, eight times closer than with the 16 + 8 columns and two full float32 iterations used before, at less
cost (on a fast-decaying spectrum the bfloat16 iterations leave 6e-6 instead of 8e-7).

Precision: the sketch and the iterations run in bfloat16, which the CPU multiplies three to four times
faster than float32 and which is how checkpoints are usually stored, so a stored matrix is used as it is.
Only the subspace comes from these products; the product A Z that the singular values and vectors come
from is float32 against the exact values, one row block at a time. A matrix can be given as a difference
(a task vector, model - base): it is then never formed whole in float32, only rounded once to bfloat16 for
the iterations.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .types import DEFAULT_RANK, EXACT_MAX_ELEMENTS

OVERSAMPLE = 16
POWER_ITERS = 1
TAIL_BISECTIONS = 30
LOW = torch.bfloat16  # the range finder's dtype
ROW_BLOCK_ELEMENTS = 1 << 20  # values per row block when exact products are formed from stored values
_UPCAST_ON_THE_FLY = (torch.bfloat16, torch.float16, torch.float32)  # float32 -= these, exactly, in one pass


@dataclass(frozen=True)
class SVD:
    """Top-`rank` singular triplets, plus what the spectrum beyond them holds."""

    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (q,) every singular value computed, descending (q >= k)
    v: torch.Tensor  # (n, k)
    total_energy: float  # squared Frobenius norm of the matrix
    full_dim: int  # min(m, n)
    exact: bool

    @property
    def k(self) -> int:
        return self.u.shape[1]

    def spectrum(self) -> torch.Tensor:
        """All min(m, n) singular values; past the computed ones, a power-law tail with the residual energy.

        The tail's exponent is the decay of the accurate top-k values, alpha = ln(s_{k/2} / s_k) / ln 2, made
        flatter where needed so the tail starts no higher than the last computed value (alpha = 0 spreads the
        residual evenly). Its total energy is exactly what the computed values leave of the Frobenius norm.
        """
        if self.exact or self.s.numel() >= self.full_dim:
            return self.s
        s = self.s.double()
        residual = max(self.total_energy - float((s**2).sum()), 0.0)
        ranks = torch.arange(s.numel() + 1, self.full_dim + 1, dtype=torch.float64, device=s.device)

        def tail(alpha: float) -> torch.Tensor:
            shape = ranks ** (-alpha)
            return shape * math.sqrt(residual / float((shape**2).sum()))

        half, last = max(1, self.k // 2), float(s[-1])
        alpha = 0.0
        if float(s[self.k - 1]) > 0 and self.k > half:
            alpha = max(0.0, math.log(float(s[half - 1]) / float(s[self.k - 1])) / math.log(self.k / half))
        fill = tail(alpha)
        if float(fill[0]) > last:  # flatter than the fit: the steepest exponent whose tail starts below s_q
            lo, hi = 0.0, alpha
            for _ in range(TAIL_BISECTIONS):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if float(tail(mid)[0]) > last else (mid, hi)
            fill = tail(lo)
        return torch.cat([s, fill]).to(self.s.dtype)


def decompose(
    matrix: torch.Tensor,
    rank: int = DEFAULT_RANK,
    exact_max_elements: int = EXACT_MAX_ELEMENTS,
    seed: int = 0,
    energy: float | None = None,
    minus: torch.Tensor | None = None,
) -> SVD:
    """SVD of a 2-D float tensor in any float dtype (with `minus`, of matrix - minus), exact when it has at
    most `exact_max_elements` elements.

    `energy` is the squared Frobenius norm when the caller already has it; otherwise the final float32
    product measures it on the way.
    """
    m, n = matrix.shape
    full_dim = min(m, n)
    k = min(rank, full_dim)
    if not randomized(matrix.shape, rank, exact_max_elements):
        u, s, vh = torch.linalg.svd(_rows(matrix, minus, 0, m), full_matrices=False)
        total = float((s.double() ** 2).sum())
        return SVD(u[:, :k], s, vh[:k].T, total, full_dim, True)
    u, s, v, measured = randomized_svd(matrix, k + OVERSAMPLE, POWER_ITERS, seed, minus, energy is None)
    return SVD(u[:, :k], s, v[:, :k], measured if energy is None else energy, full_dim, False)


def gram_decompose(matrix: torch.Tensor, rank: int = DEFAULT_RANK, minus: torch.Tensor | None = None) -> SVD:
    """What `decompose`'s exact path gives (every singular value, the top-`rank` vectors) from the eigen-
    decomposition of the float32 Gram matrix of the short side, G = A^T A (or A A^T): about half the CPU time
    of the SVD (a 512 x 512 matrix on one thread: 1.8 ms for G and 15 ms for eigh against 35 ms for the SVD).

    s_i = sqrt(lambda_i) and the short side's vectors come from eigh; the long side's are A v_i / s_i (left
    at zero where s_i is zero: any unit vector is then as exact, and every metric weights it by s_i or reads
    it only through the subspace of the non-zero ones). Squaring costs accuracy only on the small singular
    values: each is off by at most about sqrt(eps_32) s_1 = 3e-4 s_1, which the entropy effective rank barely
    sees; the top vectors are off by eps_32 s_1^2 / (s_i^2 - s_j^2). The sketch uses it where compare takes the
    exact SVD; tests/test_zoo.py holds the spectral metrics from it (with the int8 storage) within the sketch's
    stated SPECTRAL_BOUND of compare's on every tensor pair of a generated zoo."""
    a = _rows(matrix, minus, 0, matrix.shape[0])
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T
    values, vectors = torch.linalg.eigh(gram)
    s = values.flip(0).clamp_min(0).sqrt()
    k = min(rank, s.numel())
    short = vectors[:, -k:].flip(1)
    scale = torch.where(s[:k] > 0, 1.0 / s[:k].clamp_min(torch.finfo(s.dtype).tiny), torch.zeros(()))
    long = (a @ short if tall else a.T @ short) * scale
    u, v = (long, short) if tall else (short, long)
    return SVD(u, s, v, float(s.double().pow(2).sum()), s.numel(), True)


def randomized(shape: tuple[int, ...] | torch.Size, rank: int = DEFAULT_RANK,
               exact_max_elements: int = EXACT_MAX_ELEMENTS) -> bool:
    """Whether `decompose` takes the randomized path for a matrix of this shape (otherwise the exact SVD)."""
    m, n = shape
    return m * n > exact_max_elements and min(rank, m, n) + OVERSAMPLE < min(m, n)


def subspace(a: torch.Tensor, rank: int = DEFAULT_RANK, seed: int = 0,
             minus: torch.Tensor | None = None) -> torch.Tensor:
    """The first part of `decompose`'s randomized path: the orthonormal basis Z (n, rank + OVERSAMPLE) of the
    dominant right singular subspace of `a` (- `minus`). `project` rows of the matrix on it, then `finish`:
    a caller that already forms the matrix's float32 rows (the elementwise pass) takes the product there."""
    return _subspace(a, min(rank, *a.shape) + OVERSAMPLE, POWER_ITERS, seed, minus)


def project(rows: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> None:
    """out = rows @ z in float32: a row block of the final product. For blocks of a few hundred rows in cache,
    torch.mm is the faster kernel here (oneDNN's `_matmul_t` wins on whole matrices, read from memory)."""
    torch.mm(rows, z, out=out)


def finish(product: torch.Tensor, z: torch.Tensor, rank: int, full_dim: int, energy: float) -> SVD:
    """The SVD from the float32 product A Z over the rows and the basis Z of `subspace`: what `decompose`
    returns for the same matrix, with `energy` its squared Frobenius norm."""
    u, s, v = _rayleigh_ritz(product, z)
    k = min(rank, full_dim)
    return SVD(u[:, :k], s, v[:, :k], energy, full_dim, False)


def randomized_svd(
    a: torch.Tensor, q: int, power_iters: int, seed: int, minus: torch.Tensor | None = None,
    measure_energy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top-q singular triplets of `a` (- `minus`) by a seeded randomized subspace iteration, and the squared
    Frobenius norm measured in the final product (0.0 unless `measure_energy`: the caller has it).

    Y = A Omega, then (A^T, A) `power_iters` times, then A^T once more, every product in bfloat16 and
    re-orthonormalised by QR, leave an orthonormal basis Z of the dominant right singular subspace. The one
    float32 product A Z = Q R and an SVD of the small R = U_r S V_r^T give the triplets (Q U_r, S, Z V_r):
    a Rayleigh-Ritz step on that subspace, so no singular value comes out above the true one.
    """
    z = _subspace(a, q, power_iters, seed, minus)
    product, energy = _times(a, minus, z, measure_energy)  # (m, q) = (a - minus) z, in float32
    u, s, v = _rayleigh_ritz(product, z)
    return u, s, v, energy


def _subspace(a: torch.Tensor, q: int, power_iters: int, seed: int, minus: torch.Tensor | None) -> torch.Tensor:
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=generator, device=a.device)
    with _SCRATCH.rounded(a, minus) as low:
        basis = _orthonormal(low @ omega.to(LOW))
        for _ in range(power_iters):
            z = _orthonormal(_transposed_times(low, basis))
            basis = _orthonormal(low @ z.to(LOW))
        return _orthonormal(_transposed_times(low, basis))


def _rayleigh_ritz(product: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    left, r = torch.linalg.qr(product)
    ur, s, vrh = torch.linalg.svd(r)
    return left @ ur, s, z @ vrh.T


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y.float()).Q


def _transposed_times(low: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """low^T basis, computed as (basis^T low)^T: the same products, in the order the bfloat16 kernels run
    fastest on a row-major matrix (on this CPU 9 ms instead of 18 ms for an 11008 x 4096 matrix and 32
    columns, two of every SVD's five products)."""
    return (basis.to(LOW).T @ low).T


def on_accelerator(t: torch.Tensor) -> bool:
    """Whether `t` lives on a GPU: work there is done on whole tensors (in float64 where sums need it) rather
    than in cache-sized pieces, and products go through torch.mm. The one place that decides it, so tests can
    run those paths on a CPU."""
    return t.device.type != "cpu"


def _row_step(a: torch.Tensor) -> int:
    return a.shape[0] if on_accelerator(a) else max(1, ROW_BLOCK_ELEMENTS // max(1, a.shape[1]))


def _rows(a: torch.Tensor, minus: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a - minus in float32 (the rows of `a` themselves when nothing needs converting)."""
    rows = a[start:stop].float()
    if minus is None:
        return rows
    if a.dtype == torch.float32 or minus.dtype not in _UPCAST_ON_THE_FLY:  # rows is `a` itself: not ours
        return rows - minus[start:stop].float()
    return rows.sub_(minus[start:stop])  # upcast on the fly: the same float32 difference, one pass fewer


class _Scratch:
    """One reusable bfloat16 buffer for the rounded copy of a task vector, on the CPU.

    A fresh multi-MB buffer is mapped by the OS and faulted in page by page as it is first written: for an
    11008 x 4096 task vector that doubled the rounding (47 ms instead of 22 ms). One buffer, grown to the
    largest copy made, serves whichever SVD holds it; an SVD that finds it held makes its own copy. It holds
    no more memory than the largest copy, which one SVD already needed; `release` frees it (the stream calls
    it at the end of a comparison, so a server does not keep it between requests).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer = torch.empty(0, dtype=LOW)

    @contextlib.contextmanager
    def rounded(self, a: torch.Tensor, minus: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """a - minus rounded to bfloat16 (see `_low_precision`), in the shared buffer while it is free."""
        if (minus is None and a.dtype == LOW) or on_accelerator(a) or not self.lock.acquire(blocking=False):
            yield _low_precision(a, minus)
            return
        try:
            if self.buffer.numel() < a.numel():
                self.buffer = torch.empty(0, dtype=LOW)  # the old one is freed before the larger one is made
                self.buffer = torch.empty(a.numel(), dtype=LOW)
            yield _low_precision(a, minus, self.buffer[: a.numel()].view(a.shape))
        finally:
            self.lock.release()

    def release(self) -> None:
        with self.lock:
            self.buffer = torch.empty(0, dtype=LOW)


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free the buffer the SVDs of task vectors reuse (it is made again when next needed)."""
    _SCRATCH.release()


def _low_precision(a: torch.Tensor, minus: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """a - minus rounded once to bfloat16 (into `out` when given): `a` itself when it is stored so and nothing
    is subtracted."""
    if minus is None and a.dtype == LOW:
        return a
    if out is None:
        out = torch.empty(a.shape, dtype=LOW, device=a.device)
    step = _row_step(a)
    for start in range(0, a.shape[0], step):
        stop = start + step
        if minus is not None and a.dtype == minus.dtype == LOW:
            torch.sub(a[start:stop], minus[start:stop], out=out[start:stop])
        else:
            out[start:stop].copy_(_rows(a, minus, start, stop))
    return out


def _times(
    a: torch.Tensor, minus: torch.Tensor | None, z: torch.Tensor, measure_energy: bool = True
) -> tuple[torch.Tensor, float]:
    """((a - minus) z, |a - minus|_F^2 (0.0 unless `measure_energy`)), both from float32 values, one row
    block at a time."""
    out = torch.empty(a.shape[0], z.shape[1], device=a.device)
    zt = z.T.contiguous()
    energy, step = 0.0, _row_step(a)
    for start in range(0, a.shape[0], step):
        rows = _rows(a, minus, start, start + step)
        out[start:start + step] = _matmul_t(rows, zt)
        if measure_energy:
            energy += float((rows * rows).sum())
    return out, energy


def _matmul_t(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x @ wt^T in float32. On a CPU, oneDNN's linear runs this about twice as fast as the BLAS torch.mm uses
    (measured on an AMD EPYC host: 150 against MKL's 70 GFLOP/s for these shapes); the result is the same to float32
    rounding (a test checks)."""
    linear = None if on_accelerator(x) else _onednn_linear()
    return x @ wt.T if linear is None else linear(x, wt, None, "none", [], "")


@functools.cache
def _onednn_linear() -> Any:
    """oneDNN's float32 linear when this torch has it and it works (probed once, on first use)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = torch.ones(2, 3)
        works = torch.equal(op(probe, probe, None, "none", [], ""), probe @ probe.T)
        if torch.backends.mkldnn.is_available() and works:
            return op
    except (AttributeError, RuntimeError):
        pass
    return None
