"""mergekit 0.1.5's merge methods, in memory, one tensor set at a time: the implementations of the rulebook's
methods. A method is one entry of `schema.METHODS` (its parameters, defaults, base policy, input counts, sign
consensus and sparsification); this module only attaches code to those names (`IMPLEMENTATIONS`; the
task-vector family is driven by the spec's `sparsification` and `sign_consensus`). The rulebook's other
methods (`UNIMPLEMENTED`) are refused by `merge_tensors`: mergekit can run them, mergelens does not.

Reimplemented from mergekit's documentation and from running mergekit 0.1.5 on crafted tensors (no mergekit
code; it is LGPL). `tests/mergekit/test_methods_vs_mergekit.py` runs `mergekit-yaml` on generated checkpoints
and compares. A method receives the tensors of one parameter name: those of the models being merged, in config
order, and the base model's, plus the method's parameters resolved for that tensor (a gradient or a filter is
resolved by the caller); `merge_tensors` returns the merged tensor.

What running mergekit 0.1.5 showed, beyond its documentation:
- Precision: inputs are upcast to float32 (float64 if any input is float64), the result is cast to
  `out_dtype` (default: the inputs' promoted dtype). mergekit does that for linear and slerp always, and for
  the task-vector methods when the config says `dtype: float32`; without it those compute in bfloat16 on
  bfloat16 checkpoints (up to ~10 ulp away), which we do not mimic.
- Task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*): tau_i = model_i - base;
  tau_i is sparsified at its own `density` (magnitude: the k = max(1, int(density * numel)) largest |tau|,
  ties broken as an unstable descending argsort breaks them; random: a Bernoulli(density) mask;
  magnitude_outliers: the int(gamma * numel) largest are dropped, then all but the int(density * numel) next
  ones; della: Bernoulli with p from density - epsilon (smallest |tau| of a row, the last dimension) to
  density + epsilon (largest), linear in the rank); density >= 1 keeps everything, density <= 0 nothing.
  `rescale` multiplies a sparsified tau by sum|tau| / sum|kept| (the L1 mass, per tensor; not 1/density).
  Then delta_i = weight_i * kept_i; with sign consensus ("sum") the elected sign is that of sum_i delta_i
  (zero counts as +) and only the deltas of that sign (non-zero) are kept; `normalize` divides by the sum of
  the weights of the kept deltas (consensus) or of all weights (no consensus), a divisor below 1e-8 counting
  as 1; the result is base + lambda * that. `int8_mask` only saves memory in mergekit: results are equal.
- Random draws: `mergekit-yaml --random-seed S` seeds torch's generator once; each tensor, in name order,
  draws one mask per model in config order (`torch.bernoulli`). Passing one `torch.Generator().manual_seed(S)`
  through the tensors in sorted name order reproduces its masks exactly (single-threaded, same torch).
- slerp: over the whole tensor flattened (not per row): both normalized (norm floored at 1e-8); where
  |cos| > 0.9995 it interpolates linearly; t = 0 gives the base model.
- model_stock: cos = mean pairwise cosine of the task vectors (per row with `filter_wise`), N models,
  t = N cos / (1 + (N - 1) cos), result t * mean(models) + (1 - t) * base; it takes no weights.
- passthrough: the one input, times `scale` when given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleModelsError
from .schema import METHODS as RULEBOOK
from .schema import SLERP_LINEAR_FALLBACK, MethodSpec

NORM_EPS = 1e-8  # slerp's floor on a norm; also the smallest divisor `normalize` accepts


@dataclass(frozen=True)
class Inputs:
    """One tensor set: the merged models' tensors (compute dtype), the base's, and resolved parameters."""

    tensors: list[Tensor]
    base: Tensor | None
    params: dict[str, Any]
    generator: torch.Generator | None


def merge_tensors(
    method: str,
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    parameters: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The merged tensor of one parameter name.

    `tensors` are the merged models' tensors in config order (without the base); `base` the base model's
    (required by the task-vector methods, slerp and model_stock; ignored by linear and passthrough, as
    mergekit ignores it). `parameters`: a per-model parameter is one value or a list with one per tensor.
    `generator` drives the random methods (None: torch's global generator, as mergekit without a seed).
    The method's counts, parameters and base policy are the rulebook's (`schema.METHODS`).
    """
    spec = RULEBOOK.get(method)
    if spec is None or method not in IMPLEMENTATIONS:
        known = ", ".join(sorted(IMPLEMENTATIONS))
        if spec is None:
            raise ConfigError(f"unknown merge method {method!r}; known: {known}")
        raise ConfigError(f"merge method {method!r} is not implemented in mergelens' in-memory merge; mergekit "
                          f"can run it (mergekit-yaml). Implemented here: {known}")
    count = len(tensors)
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        most = "" if spec.max_models is None else f" and at most {spec.max_models}"
        raise ConfigError(f"{method} merges at least {spec.min_models}{most} models besides the base; got {count}")
    if spec.needs_base and base is None:
        raise ConfigError(f"{method} needs a base model: name one with `base_model:`")
    used = [*tensors, *([base] if spec.needs_base and base is not None else [])]
    shapes = {tuple(t.shape) for t in used}
    if len(shapes) > 1:
        raise IncompatibleModelsError(f"{method}: the tensors to merge have different shapes {sorted(shapes)}")
    params = resolve_parameters(spec, parameters or {}, count)
    work = torch.float64 if any(t.dtype == torch.float64 for t in used) else torch.float32
    result_dtype = out_dtype or _promoted(used)
    inputs = Inputs(
        tensors=[t.to(work) for t in tensors],
        base=base.to(work) if spec.needs_base and base is not None else None,
        params=params,
        generator=generator,
    )
    return IMPLEMENTATIONS[method](inputs).to(result_dtype)


def resolve_parameters(spec: MethodSpec, given: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The method's parameters for one tensor set: defaults filled, per-model values as lists of `count`."""
    unknown = sorted(set(given) - set(spec.parameter_names))
    if unknown:
        known = ", ".join(spec.parameter_names) or "none"
        raise ConfigError(f"{spec.name} has no parameter {', '.join(unknown)}; its parameters: {known}")
    out: dict[str, Any] = {}
    for p in spec.parameters:
        if p.required and p.name not in given:
            where = " for every model" if p.per_model else ""
            raise ConfigError(f"{spec.name} needs `{p.name}`{where}; add it under `parameters:`")
        value = given.get(p.name, p.default)
        if p.per_model:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * count
            if len(values) != count:
                raise ConfigError(f"{spec.name}: `{p.name}` has {len(values)} values for {count} models")
            value = values
        out[p.name] = value
    return out


def _promoted(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---- sparsification of task vectors -----------------------------------------------------------------------


def keep_largest(tau: Tensor, density: float, *, mergekit_ties: bool = True) -> Tensor:
    """TIES trimming: the max(1, int(density * numel)) entries of largest |tau|, mergekit's tie order
    (`mergekit_ties=False`: equal values straddling the cut are taken in storage order, in O(n), for
    measurements on huge tensors where which of them mergekit keeps does not matter)."""
    if density >= 1.0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    flat = tau.flatten()
    n = flat.numel()
    k = max(1, int(density * n))
    order = (lambda mag: mag.argsort(descending=True)[:k]) if mergekit_ties else None
    keep = _window(flat.abs(), n - k, n, order)
    return (flat * keep).view_as(tau)


def keep_middle(tau: Tensor, density: float, gamma: float, *, mergekit_ties: bool = True) -> Tensor:
    """Breadcrumbs: drop the int(gamma * numel) largest |tau| (at most numel - k), keep the k =
    int(density * numel) next ones (`mergekit_ties` as in `keep_largest`)."""
    if density >= 1.0:
        return tau
    flat = tau.flatten()
    n = flat.numel()
    k = max(0, int(density * n))
    top = min(int(gamma * n), n - k)
    order = (lambda mag: mag.argsort()[n - top - k:n - top]) if mergekit_ties else None
    keep = _window(flat.abs(), n - top - k, n - top, order)
    return (flat * keep).view_as(tau)


def _window(mag: Tensor, start: int, stop: int, order: Callable[[Tensor], Tensor] | None) -> Tensor:
    """Mask of the entries at ascending ranks [start, stop) of `mag`. Two selections (O(n)) find the bounds;
    only when a run of equal values straddles a bound does `order` (the unstable sort mergekit uses, whose
    order among equal values decides which of them are kept) pick the entries; without `order`, the first
    equal values in storage order fill the window."""
    keep = torch.zeros_like(mag, dtype=torch.bool)
    if stop <= start:
        return keep
    low = mag.kthvalue(start + 1).values
    high = mag.kthvalue(stop).values if stop < mag.numel() else mag.max()
    window = (mag >= low) & (mag <= high)
    if int(window.sum()) == stop - start:
        return window
    if order is not None:
        keep[order(mag)] = True
        return keep
    keep = (mag > low) & (mag < high)
    if bool(low == high):
        _take_first(keep, mag == low, stop - start)
    else:
        _take_first(keep, mag == low, int((mag <= low).sum()) - start)
        _take_first(keep, mag == high, stop - int((mag < high).sum()))
    return keep


def _take_first(keep: Tensor, candidates: Tensor, count: int) -> None:
    keep[candidates.nonzero().flatten()[:max(0, count)]] = True


def keep_random(tau: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: each entry kept with probability `density` (one Bernoulli draw per entry, even at density 0)."""
    if density >= 1.0:
        return tau
    return tau * torch.bernoulli(torch.full_like(tau, density), generator=generator)


def keep_by_rank(tau: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """DELLA: Bernoulli with p linear in each entry's |tau| rank within its row, density -/+ epsilon."""
    if density >= 1.0:
        return tau
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ConfigError(
            f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1); lower epsilon"
        )
    rows = tau.reshape(-1, tau.shape[-1]) if tau.dim() else tau.reshape(1, 1)
    n = rows.shape[-1]
    rank = rows.abs().argsort(dim=-1).argsort(dim=-1).to(tau.dtype)
    p = density - epsilon + 2.0 * epsilon * rank / (n - 1) if n > 1 else torch.full_like(rows, density)
    return tau * torch.bernoulli(p, generator=generator).view_as(tau)


def rescale_l1(tau: Tensor, kept: Tensor) -> Tensor:
    """`rescale`: the kept entries scaled so the task vector keeps its L1 mass."""
    mass = kept.abs().sum()
    return kept * (tau.abs().sum() / mass) if float(mass) > 0 else kept


# ---- the methods ----------------------------------------------------------------------------------------

Sparsify = Callable[[Tensor, int, Inputs], Tensor]  # (tau, model index, inputs) -> kept


def _magnitude(tau: Tensor, i: int, x: Inputs) -> Tensor:
    return keep_largest(tau, x.params["density"][i], mergekit_ties=x.params.get("mergekit_ties", True))


def _random(tau: Tensor, i: int, x: Inputs) -> Tensor:
    return keep_random(tau, x.params["density"][i], x.generator)


def _outliers(tau: Tensor, i: int, x: Inputs) -> Tensor:
    return keep_middle(tau, x.params["density"][i], x.params["gamma"][i],
                       mergekit_ties=x.params.get("mergekit_ties", True))


def _della(tau: Tensor, i: int, x: Inputs) -> Tensor:
    return keep_by_rank(tau, x.params["density"][i], x.params["epsilon"][i], x.generator)


# the implementation of each `MethodSpec.sparsification` the rulebook names
SPARSIFIERS: dict[str, Sparsify] = {
    "magnitude": _magnitude, "random": _random, "magnitude_outliers": _outliers, "della": _della,
}


def sparsify(
    kind: str | None, tau: Tensor, *, density: float, gamma: float = 0.01, epsilon: float = 0.15,
    generator: torch.Generator | None = None, mergekit_ties: bool = True,
) -> Tensor:
    """The kept part of one task vector under the sparsification `kind` (a `MethodSpec.sparsification`;
    None keeps everything), before any rescaling: the merge's own code, for callers outside a merge (the
    simulation). `mergekit_ties=False` breaks ties at a magnitude cut in storage order (O(n), see
    `keep_largest`)."""
    if kind is None:
        return tau
    params = {"density": [density], "gamma": [gamma], "epsilon": [epsilon], "mergekit_ties": mergekit_ties}
    return SPARSIFIERS[kind](tau, 0, Inputs([tau], None, params, generator))


def elect_signs(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """TIES sign election over stacked weighted deltas (model first): the elected sign of their sum (zero
    counts as +) and the mask of the deltas that carry it (non-zero)."""
    sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return sign, deltas.sign() == sign


def _task_vector_merge(spec: MethodSpec) -> Callable[[Inputs], Tensor]:
    """base + lambda * the mix of the sparsified, weighted task vectors, driven by the spec's
    `sparsification` and `sign_consensus`."""
    sparsifier = None if spec.sparsification is None else SPARSIFIERS[spec.sparsification]

    def merge(x: Inputs) -> Tensor:
        assert x.base is not None
        p = x.params
        kept = []
        for i, tensor in enumerate(x.tensors):
            tau = tensor - x.base
            if sparsifier is not None:
                trimmed = sparsifier(tau, i, x)
                tau = rescale_l1(tau, trimmed) if p.get("rescale") else trimmed
            kept.append(tau)
        shape = (-1, *([1] * x.base.dim()))
        weights = torch.tensor(p["weight"], dtype=x.base.dtype).view(shape)
        deltas = torch.stack(kept) * weights
        if spec.sign_consensus:
            _, mask = elect_signs(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum()
        if p["normalize"]:
            divisor = torch.where(divisor.abs() < NORM_EPS, torch.ones_like(divisor), divisor)
            mixed = mixed / divisor
        return x.base + p["lambda"] * mixed

    return merge


# the task-vector family: the rulebook's methods that take `lambda` (base + lambda x the sparsified deltas)
TASK_VECTOR_METHODS = tuple(name for name, spec in RULEBOOK.items() if spec.parameter("lambda") is not None)


def _linear(x: Inputs) -> Tensor:
    weights = x.params["weight"]
    mixed = sum(w * t for w, t in zip(weights, x.tensors, strict=True))
    assert isinstance(mixed, Tensor)
    return mixed / sum(weights) if x.params["normalize"] else mixed



def slerp_cosine(v0: Tensor, v1: Tensor) -> float:
    """The cosine slerp decides on: of the two whole tensors flattened, norms floored at NORM_EPS (mergekit
    interpolates linearly where its absolute value exceeds SLERP_LINEAR_FALLBACK)."""
    n0 = v0 / max(float(v0.norm()), NORM_EPS)
    n1 = v1 / max(float(v1.norm()), NORM_EPS)
    return float((n0 * n1).sum())


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation of two tensors seen as flat vectors; linear where |cos| > 0.9995."""
    dot = slerp_cosine(v0, v1)
    if abs(dot) > SLERP_LINEAR_FALLBACK:
        return (1.0 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return (math.sin((1.0 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


def _slerp(x: Inputs) -> Tensor:
    assert x.base is not None
    return slerp(float(x.params["t"]), x.base, x.tensors[0])



def _model_stock(x: Inputs) -> Tensor:
    assert x.base is not None
    taus = [t - x.base for t in x.tensors]
    rowwise = bool(x.params["filter_wise"]) and x.base.dim() > 1
    cosines = [
        torch.nn.functional.cosine_similarity(a, b, dim=-1) if rowwise
        else torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        for a, b in itertools.combinations(taus, 2)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    if rowwise:
        cos = cos.unsqueeze(-1)
    n = len(taus)
    t = n * cos / (1 + (n - 1) * cos)
    return t * torch.stack(x.tensors).mean(dim=0) + (1 - t) * x.base



def _passthrough(x: Inputs) -> Tensor:
    scale = x.params["scale"][0]
    return x.tensors[0] if scale is None else x.tensors[0] * float(scale)



# the implementation of each method of the rulebook that mergelens merges in memory, by the rulebook's name
IMPLEMENTATIONS: dict[str, Callable[[Inputs], Tensor]] = {
    **{name: _task_vector_merge(RULEBOOK[name]) for name in TASK_VECTOR_METHODS},
    "linear": _linear, "slerp": _slerp, "model_stock": _model_stock, "passthrough": _passthrough,
}
# the rulebook's methods that are refused on purpose: mergekit runs them, mergelens does not merge them
UNIMPLEMENTED = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
# the rulebook's entries of the methods implemented here (the same MethodSpec objects, not a copy)
METHODS: dict[str, MethodSpec] = {name: RULEBOOK[name] for name in IMPLEMENTATIONS}


def seeded_stream(seed: int) -> torch.Generator:
    """The generator that reproduces `mergekit-yaml --random-seed seed` when passed through every tensor in
    sorted name order (see the module docstring)."""
    return torch.Generator().manual_seed(seed)
