"""Singular value decompositions for the spectral metrics: exact below a size cap, randomized above it.

The randomized path is Halko, Martinsson & Tropp (2011), Algorithm 4.4: a Gaussian sketch of
`rank + oversample` columns, `power_iters` subspace iterations with QR re-orthonormalisation, then an exact
SVD of the small projected matrix. It uses its own seeded generator, so results are deterministic and
threads do not share random state. Its error on matrices with decaying spectra is bounded in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_RANK = 16
OVERSAMPLE = 8
POWER_ITERS = 2
EXACT_MAX_ELEMENTS = 512 * 512


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
        """All min(m, n) singular values; beyond the computed ones, the residual energy spread evenly."""
        if self.exact or self.s.numel() >= self.full_dim:
            return self.s
        residual = max(self.total_energy - float((self.s**2).sum()), 0.0)
        rest = self.full_dim - self.s.numel()
        fill = torch.full((rest,), (residual / rest) ** 0.5, dtype=self.s.dtype, device=self.s.device)
        return torch.cat([self.s, fill])


def decompose(
    matrix: torch.Tensor, rank: int = DEFAULT_RANK, exact_max_elements: int = EXACT_MAX_ELEMENTS, seed: int = 0
) -> SVD:
    """SVD of a 2-D float tensor, exact when it has at most `exact_max_elements` elements."""
    m, n = matrix.shape
    full_dim = min(m, n)
    k = min(rank, full_dim)
    total = float((matrix.double() ** 2).sum()) if matrix.device.type == "cpu" else float((matrix**2).sum())
    if matrix.numel() <= exact_max_elements or k + OVERSAMPLE >= full_dim:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return SVD(u[:, :k], s, vh[:k].T, total, full_dim, True)
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
