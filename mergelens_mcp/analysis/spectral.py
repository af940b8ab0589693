"""Singular value decompositions for the spectral metrics: exact below a size cap, randomized above it.

Every 2-D parameter gets one; none is skipped for its size. The randomized path is Halko, Martinsson &
Tropp (2011), Algorithm 4.4: a Gaussian sketch of `rank + OVERSAMPLE` columns (16 + 8 by default),
`POWER_ITERS` (2) subspace iterations with QR re-orthonormalisation, then an exact SVD of the small projected
matrix: 2 + 2 * POWER_ITERS thin matrix products over the matrix, so its cost is linear in the matrix's size.
It uses its own seeded generator, so results are deterministic and threads do not share random state. Its
error against the exact SVD on matrices with decaying spectra is bounded in tests/test_spectral.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RANK = 16
OVERSAMPLE = 8
POWER_ITERS = 2
EXACT_MAX_ELEMENTS = 512 * 512
TAIL_BISECTIONS = 30


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
) -> SVD:
    """SVD of a 2-D float tensor, exact when it has at most `exact_max_elements` elements.

    `energy` is the squared Frobenius norm when the caller already has it (it saves a pass over the matrix).
    """
    m, n = matrix.shape
    full_dim = min(m, n)
    k = min(rank, full_dim)
    if matrix.numel() <= exact_max_elements or k + OVERSAMPLE >= full_dim:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        total = float((s.double() ** 2).sum())
        return SVD(u[:, :k], s, vh[:k].T, total, full_dim, True)
    if energy is None:
        energy = float(torch.linalg.vector_norm(matrix, dtype=torch.float64)) ** 2
    total = energy
    u, s, v = randomized_svd(matrix, k + OVERSAMPLE, POWER_ITERS, seed)
    return SVD(u[:, :k], s, v[:, :k], total, full_dim, False)


def randomized_svd(
    a: torch.Tensor, q: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-q singular triplets of `a` by a seeded randomized range finder with power iterations."""
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ z)
    small = basis.T @ a  # (q, n)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return basis @ ub, s, vh.T
