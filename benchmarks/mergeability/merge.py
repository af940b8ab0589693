"""Merge methods as mergekit defines them, reimplemented from its documentation (no mergekit code).

Every method merges two state dicts tensor by tensor:

- `linear`: weighted mean of the models (weights normalized to sum to 1).
- `task_arithmetic`: base + lambda * sum_i w_i * tau_i, with tau_i = model_i - base (no normalization).
- `ties`: each tau_i trimmed to its top-`density` entries by magnitude, the sign of each coordinate elected by
  the summed weighted mass, then the disjoint mean of the entries that agree with it (normalize=True).
- `dare_ties` / `dare_linear`: each tau_i keeps a seeded Bernoulli(`density`) share of its entries, rescaled
  by 1/density; `dare_ties` then applies the TIES sign election, `dare_linear` sums them
  (normalize=False for both).
- `slerp`: spherical interpolation between the two models at t, per tensor; linear when |cos| > 0.9995.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

State = dict[str, Tensor]
SLERP_DOT_THRESHOLD = 0.9995


def lerp_tensor(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    return (1.0 - t) * v0 + t * v1


def slerp_tensor(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors seen as flat vectors; linear when nearly (anti)parallel."""
    n0 = v0 / max(float(v0.norm()), eps)
    n1 = v1 / max(float(v1.norm()), eps)
    dot = float((n0 * n1).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return lerp_tensor(t, v0, v1)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin(theta * (1.0 - t)) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return s0 * v0 + s1 * v1


def trim_by_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude, zero the rest."""
    if density >= 1.0:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(tau)


def drop_and_rescale(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density` and rescale the kept ones by 1/density."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep / density


def elect_signs(deltas: Tensor) -> Tensor:
    """Mask (models, ...) of the entries whose sign matches the sign of the summed mass (ties go to +)."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    return deltas.sign() == majority


def combine_task_vectors(
    base: Tensor, taus: list[Tensor], weights: list[float], consensus: bool, normalize: bool, lam: float
) -> Tensor:
    """base + lam * (weighted sum of taus [agreeing with the elected sign] [/ sum of the weights used])."""
    w = torch.tensor(weights, dtype=base.dtype).view(-1, *([1] * base.dim()))
    deltas = torch.stack(taus) * w
    if consensus:
        mask = elect_signs(deltas)
    else:
        mask = torch.ones_like(deltas, dtype=torch.bool)
    mixed = (deltas * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return base + lam * mixed


@dataclass(frozen=True)
class MergeSpec:
    """One merge method and its parameters (mergekit's names); `normalize=None` means the method's default."""

    name: str
    weights: tuple[float, float] = (1.0, 1.0)
    density: float = 1.0
    lam: float = 1.0
    t: float = 0.5
    normalize: bool | None = None

    @property
    def normalizes(self) -> bool:
        return self.normalize if self.normalize is not None else self.name == "ties"

    def describe(self) -> dict:
        """The parameters as a mergekit config would spell them."""
        if self.name == "slerp":
            return {"t": self.t}
        if self.name == "linear":
            return {"weight": list(self.weights), "normalize": True}
        out: dict = {"weight": list(self.weights), "lambda": self.lam, "normalize": self.normalizes}
        if self.name != "task_arithmetic":
            out["density"] = self.density
        return out


def spec_from_strategy(method: str, parameters: dict) -> MergeSpec | None:
    """The merge a mergelens recommendation describes, or None for a method this benchmark does not run.

    Reads `weights` ({model_a, model_b} or a list), `density`, `lambda`, `t` and `normalize`; what is absent
    keeps this benchmark's default for the method.
    """
    if method not in METHODS:
        return None
    default = METHODS[method]
    weights = parameters.get("weights", parameters.get("weight"))
    if isinstance(weights, dict):
        weights = (weights.get("model_a"), weights.get("model_b"))
    if not weights or None in weights or len(weights) != 2:
        weights = default.weights
    normalize = parameters.get("normalize")
    return MergeSpec(
        name=method,
        weights=(float(weights[0]), float(weights[1])),
        density=float(parameters.get("density", default.density)),
        lam=float(parameters.get("lambda", default.lam)),
        t=float(parameters.get("t", default.t)),
        normalize=None if normalize is None else bool(normalize),
    )


def tensor_seed(seed: int, name: str, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{index}".encode())) % (2**63)


def merge_states(spec: MergeSpec, base: State, a: State, b: State, seed: int = 0) -> State:
    """The merged state dict of `a` and `b` (fine-tunes of `base`) by `spec`'s method."""
    merged: State = {}
    for name in base:
        x, y, z = a[name].float(), b[name].float(), base[name].float()
        if spec.name == "linear":
            wa, wb = spec.weights
            merged[name] = (wa * x + wb * y) / (wa + wb)
        elif spec.name == "slerp":
            merged[name] = slerp_tensor(spec.t, x, y)
        else:
            taus = [x - z, y - z]
            if spec.name == "ties":
                taus = [trim_by_magnitude(tau, spec.density) for tau in taus]
            elif spec.name in ("dare_ties", "dare_linear"):
                gens = [torch.Generator().manual_seed(tensor_seed(seed, name, i)) for i in range(2)]
                taus = [drop_and_rescale(t, spec.density, g) for t, g in zip(taus, gens, strict=True)]
            elif spec.name != "task_arithmetic":
                raise ValueError(f"unknown merge method {spec.name!r}; known: {sorted(METHODS)}")
            consensus = spec.name in ("ties", "dare_ties")
            merged[name] = combine_task_vectors(
                z, taus, list(spec.weights), consensus, spec.normalizes, spec.lam
            )
    return merged


METHODS: dict[str, MergeSpec] = {
    "linear": MergeSpec("linear", weights=(0.5, 0.5)),
    "task_arithmetic": MergeSpec("task_arithmetic", weights=(1.0, 1.0), lam=1.0),
    "ties": MergeSpec("ties", weights=(1.0, 1.0), density=0.5),
    "dare_ties": MergeSpec("dare_ties", weights=(1.0, 1.0), density=0.5),
    "dare_linear": MergeSpec("dare_linear", weights=(1.0, 1.0), density=0.5),
    "slerp": MergeSpec("slerp", t=0.5),
}
