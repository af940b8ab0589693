"""A configured mergekit merge, simulated per tensor on the real checkpoints; nothing is written.

Per tensor (task vectors tau_i = model_i - base where the method has a base):
- TIES family (`ties`, `dare_ties`, `breadcrumbs_ties`, `della`): each tau_i is trimmed at its configured
  density by the merge's own sparsification (`methods.sparsify`: magnitude top-k for TIES; a seeded
  Bernoulli(density) mask for DARE; DELLA's rank-weighted mask; the largest `gamma` and the smallest values
  removed for breadcrumbs); the sign of sum_i w_i kept_i is elected as the merge elects it (zero counts as
  +); `sign_conflict` = the share of the kept weighted |.| mass whose sign loses. That is the interference
  of these methods.
- Summing methods (`task_arithmetic`, `dare_linear`, `breadcrumbs`, `della_linear`, `linear`, ...):
  interference = 1 - sum|sum_i w_i x_i| / sum_i sum|w_i x_i|, the share of the weighted mass that cancels.
  `linear` ignores a base, but where the config names one its task vectors show the conflict better.
- `slerp`: the same cancellation for the weights (1 - t, t), plus the share of the layer's parameters in
  tensors whose |cos| (whole tensor, flattened) exceeds SLERP_LINEAR_FALLBACK, where mergekit 0.1.5
  interpolates linearly (it decides once per tensor, as `methods.slerp` does).
- `survival[model]` = the share of tau_i's |.| mass that trimming / dropping keeps.
Layer scores are parameter-weighted means over the layer's tensors; the overall score likewise over layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis import stream
from ..analysis.compat import block_count
from ..analysis.layers import ANY_INDEX, BLOCK_INDEX, classify, group_sort_key
from ..analysis.loading import Checkpoint
from ..analysis.types import Cancelled, Progress
from ..models import Finding, FindingLevel, LayerInterference
from .methods import elect_signs, slerp_cosine, sparsify
from .schema import NUMBER_STRING, SLERP_LINEAR_FALLBACK, MethodSpec

Lookup = Callable[[str, "str | None", str, float, Any], Any]  # name, model, tensor, t, default -> value
HIGH_SIGN_CONFLICT = 0.3
LOW_SURVIVAL = 0.5
SEED = 0
DELLA_MARGIN = 1e-6  # how far inside (0, 1) a narrowed DELLA window stays


def resolve(setting: Any, tensor: str, t: float) -> float | bool | None:
    """A setting's value for one tensor at relative depth t, as mergekit reads it: the first matching filter
    (a substring of the tensor name; none or '*' matches all), gradients interpolated linearly over t."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, str) and NUMBER_STRING.match(setting.strip()):
        return float(setting)
    if isinstance(setting, (bool, int, float)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(x, dict) for x in setting):
            for cond in setting:
                filt = cond.get("filter")
                if filt in (None, "*") or (isinstance(filt, str) and filt in tensor):
                    return resolve(cond.get("value"), tensor, t)
            return None
        values = [resolve(x, tensor, t) for x in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(values[i0]) + frac * float(values[i1])  # type: ignore[arg-type]
    return None


def trim(
    tau: torch.Tensor, density: float, method: str | None, gamma: float, generator: torch.Generator,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """The kept part of a task vector under mergekit's sparsification `method`, before any rescaling: the
    merge's own code (`methods.sparsify`), with ties at a magnitude cut taken in storage order (O(n) on a 7B
    model's tensors; which of equal values mergekit keeps does not change the measurement). DELLA's
    epsilon is narrowed to keep density +/- epsilon inside (0, 1), where the diagnosis already warns."""
    density = min(1.0, max(0.0, density))
    if method is None or density >= 1.0 or tau.numel() == 0:
        return tau
    if density <= 0.0:
        return torch.zeros_like(tau)
    if method == "della":
        epsilon = max(0.0, min(epsilon, (1 - DELLA_MARGIN) * min(density, 1.0 - density)))
    return sparsify(method, tau, density=density, gamma=gamma, epsilon=epsilon, generator=generator,
                    mergekit_ties=False)


def cancellation(weighted: list[torch.Tensor]) -> float:
    """1 - sum|sum_i x_i| / sum_i sum|x_i|: 0 when the inputs agree coordinate-wise, 1 when they cancel."""
    total = sum(float(x.abs().sum()) for x in weighted)
    if total <= 0:
        return 0.0
    return max(0.0, 1.0 - float(torch.stack(weighted).sum(0).abs().sum()) / total)


def sign_election_loss(weighted: list[torch.Tensor]) -> float:
    """Share of the weighted |.| mass that loses TIES' sign election (the merge's `elect_signs`: the sign of
    the sum, zero counting as +)."""
    stacked = torch.stack(weighted)
    magnitude = stacked.abs()
    mass = float(magnitude.sum())
    if mass <= 0:
        return 0.0
    _, carries = elect_signs(stacked)
    lost = ~carries & (stacked != 0)
    return float(magnitude[lost].sum()) / mass


@dataclass
class _LayerSums:
    index: int | None
    n_params: int = 0
    interference: float = 0.0
    conflict: float | None = None
    linear_params: int = 0  # slerp: parameters of the tensors mergekit interpolates linearly
    survival: dict[str, list[float]] = field(default_factory=dict)  # model -> [kept mass, total mass]


@dataclass
class Simulation:
    layers: list[LayerInterference]
    overall: float | None
    findings: list[Finding]


@dataclass(frozen=True)
class Job:
    """One output tensor: the input tensors it is merged from, and the parameters that apply to it."""

    output: str  # the merged model's tensor name; its layer names the score
    inputs: tuple[tuple[str, str], ...]  # (model, tensor name) in config order; SLERP: its base first
    base: tuple[str, str] | None  # (model, tensor name) the task vectors are taken against
    t: float  # relative depth inside the slice, for gradients
    lookup: Lookup

    @property
    def sources(self) -> list[tuple[str, str]]:
        """(model, tensor name) of every tensor the job reads: the inputs, then the base."""
        return [*self.inputs, *([self.base] if self.base else [])]


@dataclass(frozen=True)
class SliceSpec:
    """One output slice: its sources (model, first layer, end layer), its base model and its parameters."""

    sources: tuple[tuple[str, int, int], ...]
    base: str | None
    lookup: Lookup


def model_jobs(
    spec: MethodSpec, names: list[str], base: str | None, ckpts: dict[str, Checkpoint], lookup: Lookup,
) -> tuple[list[Job], list[str]]:
    """Jobs for a `models:` config: every tensor the inputs share, layer for layer (mergekit: one slice over
    all layers, so gradients run from the first block to the last; other tensors take t = 0)."""
    models, base = _roles(spec, names, base)
    readers = [ckpts[m] for m in models] + ([ckpts[base]] if base else [])
    first = readers[0]
    shared = [n for n, info in first.float_tensors.items()
              if all(n in c.float_tensors and c.tensors[n].shape == info.shape for c in readers[1:])]
    notes = []
    if len(shared) < len(first.float_tensors):
        notes.append(f"{len(first.float_tensors) - len(shared)} tensors differ in name or shape across the "
                     "models and were not simulated")
    n_blocks = max(block_count(c) for c in readers)
    jobs = []
    for name in shared:
        index = classify(name).layer_index
        t = 0.0 if index is None else index / (n_blocks - 1) if n_blocks > 1 else 1.0
        jobs.append(Job(name, tuple((m, name) for m in models), (base, name) if base else None, t, lookup))
    return jobs, notes


def slice_jobs(
    spec: MethodSpec, slices: list[SliceSpec], ckpts: dict[str, Checkpoint]
) -> tuple[list[Job], list[str]]:
    """Jobs for a `slices:` config: output layer k of a slice merges layer start_i + k of each source; the
    embeddings come from the first slice's sources and the final norm and head from the last's (t = 0)."""
    jobs: list[Job] = []
    notes: list[str] = []
    out_index = 0
    for number, sl in enumerate(slices):
        models, base = _roles(spec, [m for m, _, _ in sl.sources], sl.base)
        starts = {m: start for m, start, _ in sl.sources}
        base = base if base in starts else None
        length = sl.sources[0][2] - sl.sources[0][1]
        first = ckpts[models[0]]
        templates = [n for n in first.float_tensors if classify(n).layer_index == starts[models[0]]]
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            for template in templates:
                names = {m: renumber(template, starts[m] + k) for m in [*models, *([base] if base else [])]}
                if not all(_readable(ckpts[m], n, first.tensors[template].shape) for m, n in names.items()):
                    continue
                jobs.append(Job(renumber(template, out_index + k), tuple((m, names[m]) for m in models),
                                (base, names[base]) if base else None, t, sl.lookup))
        out_index += length
        first_slice, last_slice = number == 0, number == len(slices) - 1
        if first_slice or last_slice:
            jobs.extend(_edge_jobs(models, base, ckpts, sl.lookup, first=first_slice, last=last_slice))
    if not jobs:
        notes.append("no tensor of the slices could be read in every source")
    return jobs, notes


def _edge_jobs(
    models: list[str], base: str | None, ckpts: dict[str, Checkpoint], lookup: Lookup, *,
    first: bool, last: bool,
) -> list[Job]:
    jobs = []
    for name, info in ckpts[models[0]].float_tensors.items():
        kind = classify(name).kind
        wanted = (first and kind == "embed") or (last and kind in ("norm", "lm_head"))
        readable = all(_readable(ckpts[m], name, info.shape) for m in [*models, *([base] if base else [])])
        if wanted and readable:
            base_tensor = (base, name) if base else None
            jobs.append(Job(name, tuple((m, name) for m in models), base_tensor, 0.0, lookup))
    return jobs


def _readable(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> bool:
    info = ckpt.float_tensors.get(name)
    return info is not None and info.shape == shape


def renumber(name: str, index: int) -> str:
    """The tensor name with its block index replaced: model.layers.3.mlp... -> model.layers.{index}.mlp..."""
    match = BLOCK_INDEX.search(name) or ANY_INDEX.search(name)
    if match is None:
        return name
    return f"{name[:match.start(1)]}{index}{name[match.end(1):]}"


def _roles(spec: MethodSpec, names: list[str], base: str | None) -> tuple[list[str], str | None]:
    """(the merged inputs in order, the base of the task vectors) as the method uses them."""
    if spec.name == "slerp":  # interpolates from its base (t = 0) to the other model; no task vectors
        return list(dict.fromkeys([*([base] if base else []), *names]))[:2], None
    if spec.base == "ignored":  # linear & co. ignore a base, but task vectors against it show conflict
        return list(dict.fromkeys(names)), base if base not in names else None
    return list(dict.fromkeys(n for n in names if n != base)), base


def simulate(
    spec: MethodSpec, jobs: list[Job], ckpts: dict[str, Checkpoint],
    progress: Progress | None = None, cancelled: Cancelled | None = None,
) -> Simulation:
    """Run the merge's arithmetic job by job and keep per-layer sums. The input tensors of each job come
    from the one tensor stream (stream.read), read once, as compare reads them."""
    generator = torch.Generator().manual_seed(SEED)
    sums: dict[str, _LayerSums] = {}
    roles = {}
    sets = [stream.TensorSet(job.output, [(ckpts[m], name) for m, name in job.sources]) for job in jobs]
    for job, current in zip(jobs, stream.read(sets, "diagnosis", cancelled=cancelled, progress=progress),
                            strict=True):
        role = classify(job.output)
        roles[role.layer_name] = role
        layer = sums.setdefault(role.layer_name, _LayerSums(role.layer_index))
        views = [view.float() for view in current.views]  # a LoRA adapter's come with its delta (the stream)
        base = views.pop() if job.base else None
        tensors = [(m, view) for (m, _), view in zip(job.inputs, views, strict=True)]
        numel = tensors[0][1].numel()
        layer.n_params += numel
        _tensor(spec, job, tensors, base, layer, numel, generator)
        del tensors, views, base
    ordered = sorted(sums.items(), key=lambda kv: group_sort_key(roles[kv[0]]))
    layers = [_layer(name, s, spec) for name, s in ordered]
    total = sum(lm.n_params for lm in layers)
    overall = round(sum(lm.interference * lm.n_params for lm in layers) / total, 6) if total else None
    return Simulation(layers, overall, _findings(spec, layers))


def _layer(name: str, s: _LayerSums, spec: MethodSpec) -> LayerInterference:
    n = max(s.n_params, 1)
    return LayerInterference(
        layer_name=name, layer_index=s.index, n_params=s.n_params, interference=round(s.interference / n, 6),
        sign_conflict=None if s.conflict is None else round(s.conflict / n, 6),
        survival={m: round(kept / total, 6) if total > 0 else 1.0 for m, (kept, total) in s.survival.items()},
        slerp_linear_share=round(s.linear_params / n, 6) if spec.name == "slerp" and s.n_params else None,
    )


def _tensor(
    spec: MethodSpec, job: Job, tensors: list[tuple[str, torch.Tensor]], base: torch.Tensor | None,
    layer: _LayerSums, numel: int, generator: torch.Generator,
) -> None:
    name, t, lookup = job.output, job.t, job.lookup
    if spec.name == "slerp":
        frac = float(lookup("t", None, name, t, 0.5))
        (_, a), (_, b) = tensors[0], tensors[-1]
        if abs(slerp_cosine(a, b)) > SLERP_LINEAR_FALLBACK:  # mergekit decides per whole tensor
            layer.linear_params += numel
        layer.interference += cancellation([(1 - frac) * a, frac * b]) * numel
        return
    weighted = []
    for m, x in tensors:
        if spec.name == "model_stock" or spec.parameter("weight") is None:
            weight = 1.0 / len(tensors)
        else:
            weight = float(lookup("weight", m, name, t, 1.0))
        tau = x - base if base is not None else x
        kept = tau
        if spec.sparsification and base is not None:
            density = float(lookup("density", m, name, t, 1.0))
            gamma = float(lookup("gamma", m, name, t, _default(spec, "gamma")))
            epsilon = float(lookup("epsilon", m, name, t, _default(spec, "epsilon")))
            kept = trim(tau, density, spec.sparsification, gamma, generator, epsilon)
            entry = layer.survival.setdefault(m, [0.0, 0.0])
            entry[0] += float(kept.abs().sum())
            entry[1] += float(tau.abs().sum())
        weighted.append(weight * kept)
    if spec.sign_consensus and base is not None:
        loss = sign_election_loss(weighted)
        layer.conflict = (layer.conflict or 0.0) + loss * numel
        layer.interference += loss * numel
    else:
        layer.interference += cancellation(weighted) * numel


def _default(spec: MethodSpec, name: str) -> float:
    parameter = spec.parameter(name)
    return 0.0 if parameter is None or parameter.default is None else float(parameter.default)


def _findings(spec: MethodSpec, layers: list[LayerInterference]) -> list[Finding]:
    findings = []
    conflicted = [lm.layer_name for lm in layers if (lm.sign_conflict or 0.0) > HIGH_SIGN_CONFLICT]
    if conflicted:
        findings.append(Finding(
            level=FindingLevel.WARNING, code="sign_conflict",
            message=f"at the configured density more than {HIGH_SIGN_CONFLICT:.0%} of the kept task-vector "
            f"mass loses the sign election in {', '.join(conflicted[:5])}",
            fix="lower the density, or give the conflicting model weight 0 in those layers (a gradient)",
        ))
    starving: dict[str, list[str]] = {}
    if spec.sparsification in ("magnitude", "magnitude_outliers"):  # random dropping keeps ~density by design
        for lm in layers:
            for m, share in lm.survival.items():
                if share < LOW_SURVIVAL:
                    starving.setdefault(m, []).append(lm.layer_name)
    for m, names in starving.items():
        findings.append(Finding(
            level=FindingLevel.WARNING, code="low_survival",
            message=f"trimming keeps less than {LOW_SURVIVAL:.0%} of {m}'s task-vector mass in {len(names)} "
            f"layer(s), e.g. {', '.join(names[:3])}", fix=f"raise {m}'s density",
        ))
    degenerate = [lm.layer_name for lm in layers if (lm.slerp_linear_share or 0.0) > 0.5]
    if degenerate:
        findings.append(Finding(
            level=FindingLevel.INFO, code="slerp_degenerate",
            message=f"mergekit's SLERP interpolates linearly (|cos| > {SLERP_LINEAR_FALLBACK}) in most of "
            f"{', '.join(degenerate[:5])}: the models are nearly parallel there",
            fix="harmless; `linear` gives the same result in those layers",
        ))
    return findings
