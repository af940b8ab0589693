"""The benchmark's merges: two fine-tunes of one base, merged tensor by tensor by the product's methods.

The methods are mergelens_mcp.mergekit.methods (mergekit 0.1.5's, checked against mergekit itself); this
module only holds the benchmark's choice of parameters (`METHODS`), reads a recommendation into one
(`spec_from_strategy`) and streams two state dicts through a method. Random methods draw from one generator
seeded once and passed through the tensors in name order, as `mergekit-yaml --random-seed` does, so each
merge here is the merge mergekit would write.

- `linear`: weighted mean of the models (weights normalized to sum to 1).
- `task_arithmetic`: base + lambda * sum_i w_i * tau_i, with tau_i = model_i - base (no normalization).
- `ties`: each tau_i trimmed to its top-`density` entries by magnitude, the sign of each coordinate elected by
  the summed weighted mass, then the disjoint mean of the entries that agree with it (normalize=True).
- `dare_ties` / `dare_linear`: each tau_i keeps a seeded Bernoulli(`density`) share of its entries, rescaled
  to keep its L1 mass (mergekit's `rescale`); `dare_ties` then applies the TIES sign election, `dare_linear`
  sums them (normalize=False for both).
- `slerp`: spherical interpolation from model a (t = 0) to model b (t = 1), per tensor; linear when
  |cos| > 0.9995.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergelens_mcp.mergekit.methods import METHODS as REGISTRY
from mergelens_mcp.mergekit.methods import merge_tensors, seeded_stream

State = dict[str, Tensor]


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
        if self.normalize is not None:
            return self.normalize
        parameter = REGISTRY[self.name].parameter("normalize")
        return bool(parameter and parameter.default)

    def describe(self) -> dict:
        """The parameters as a mergekit config would spell them (and as the product's method takes them)."""
        if self.name == "slerp":
            return {"t": self.t}
        if self.name == "linear":
            return {"weight": list(self.weights), "normalize": True}
        out: dict = {"weight": list(self.weights), "lambda": self.lam, "normalize": self.normalizes}
        if self.name != "task_arithmetic":
            out["density"] = self.density
        if self.name.startswith("dare_"):
            out["rescale"] = True  # mergekit's default: the kept entries keep their task vector's L1 mass
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


def merge_states(spec: MergeSpec, base: State, a: State, b: State, seed: int = 0) -> State:
    """The merged state dict of `a` and `b` (fine-tunes of `base`) by `spec`'s method, in float32."""
    if spec.name not in METHODS:
        raise ValueError(f"unknown merge method {spec.name!r}; known: {sorted(METHODS)}")
    parameters = spec.describe()
    generator = seeded_stream(seed)
    merged: State = {}
    for name in sorted(base):
        if spec.name == "slerp":
            tensors, origin = [b[name]], a[name]
        else:
            tensors, origin = [a[name], b[name]], base[name]
        merged[name] = merge_tensors(spec.name, tensors, base=origin, parameters=parameters,
                                     generator=generator, out_dtype=torch.float32)
    return {name: merged[name] for name in base}


METHODS: dict[str, MergeSpec] = {
    "linear": MergeSpec("linear", weights=(0.5, 0.5)),
    "task_arithmetic": MergeSpec("task_arithmetic", weights=(1.0, 1.0), lam=1.0),
    "ties": MergeSpec("ties", weights=(1.0, 1.0), density=0.5),
    "dare_ties": MergeSpec("dare_ties", weights=(1.0, 1.0), density=0.5),
    "dare_linear": MergeSpec("dare_linear", weights=(1.0, 1.0), density=0.5),
    "slerp": MergeSpec("slerp", t=0.5),
}
