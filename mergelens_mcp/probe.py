"""Preview and verify: merged weights measured on probe inputs.

- `verify_merge`: a merge already written, checked (1) in its weights: per layer, least-squares coefficients of
  each source's task vector (its weights without a base) in MERGED - base, and the share of MERGED - base they
  do not explain; NaN/Inf, dtype, shape and vocabulary changes; with the mergekit config, every tensor merged
  again by our methods (`mergekit/methods.py`) and compared with MERGED, layer by layer; (2) in its behaviour,
  with transformers: MERGED against each source on the probes, with the practice's rules (perplexity more than
  10% above the best source's: warning; more than twice: failed).
- `preview_merge`: candidate merges (a mergekit YAML each: by default the recommended method, its runner-up and
  linear) merged in memory into a Hugging Face model and measured against each source on the probes.

Every tensor is read through the one tensor stream (`analysis/stream.read`), one tensor set at a time; a
config is read by the diagnosis' parser and rulebook and its parameters resolved per tensor by its `lookup_for`
(gradients, filters). Preview holds one model's weights at a time: the sources' probe outputs are computed and
cached first, then each candidate is merged, run and dropped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .analysis import stream
from .analysis.layers import classify, group_sort_key
from .analysis.loading import Checkpoint, load_checkpoint
from .analysis.types import Cancelled, Progress
from .errors import (
    AnalysisCancelledError,
    CheckpointFormatError,
    ConfigError,
    InputError,
    LimitExceededError,
)
from .mergekit import methods as registry
from .mergekit.diagnose import config_jobs, parse_config, read_config_text
from .mergekit.schema import MethodSpec, Report, check_structure
from .mergekit.simulate import Job
from .models import (
    CompareResult,
    Finding,
    FindingLevel,
    LayerMatch,
    MethodPreview,
    PreviewResult,
    SourceRetention,
    VerifyResult,
)
from .security.limits import Limits
from .security.paths import PathGuard, read_text_file
from .settings import Settings

SEED = 0  # the random methods' masks, as `mergekit-yaml --random-seed 0` draws them (override: random_seed)
NONE_RESIDUAL = 0.5  # a layer whose change the sources explain less than half of matches none of them
ONE_SOURCE_SHARE = 0.95  # a layer whose coefficients are this much one source's matches that source only
SAME_RESIDUAL = 0.05
# |merged - re-merged| beyond one ulp of the written dtype, over |re-merged - origin| (L2 over the layer; origin:
# the base, else the first input), above which a layer is not what the config gives: mergekit's rounding differs
# from ours by at most one ulp, so it counts 0; weights 0.9/0.1 written for 0.5/0.5 give 0.8
CONFIG_TOLERANCE = 0.1
RANDOM_TOLERANCE = 0.1  # random methods (other seeds draw other masks): task-vector norms within 10%,
RANDOM_DRAWS = 2.0  # plus 2 / sqrt(n) for the sampling noise of a layer's n random draws (a norm vector: n = 64)
PPL_WARNING, PPL_FAILED = 1.10, 2.0  # the practice's rules: merged perplexity vs the best source's
ENCODER_WARNING, ENCODER_FAILED = 0.9, 0.5  # sentence-embedding cosine with a source
MAX_TOKENS = 64
BATCH = 8
MAX_PROBES = 512
MAX_PROBE_BYTES = 4 << 20


class Phases:
    """One monotonic progress over several phases (reading, merging, running the probes), each of which
    reports its own (done, total): phase i covers [i, i + 1) of `count` on a scale of STEPS per phase."""

    STEPS = 1000

    def __init__(self, progress: Progress | None, count: int) -> None:
        self.progress, self.count, self.next = progress, max(count, 1), 0

    def phase(self, label: str) -> Progress | None:
        if self.progress is None:
            return None
        index, report = self.next, self.progress
        self.next += 1

        def progress(done: int, total: int, message: str) -> None:
            step = index * self.STEPS + (self.STEPS * done // total if total else 0)
            report(min(step, self.count * self.STEPS), self.count * self.STEPS, f"{label}: {message}")

        return progress

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.count * self.STEPS, self.count * self.STEPS, "done")


# ---- configs: a mergekit YAML as jobs, each merged by the registry ------------------------------------------


@dataclass
class ConfiguredMerge:
    """A mergekit config read by the diagnosis' parser and rulebook: its method, jobs and opened models."""

    method: str
    jobs: list[Job]
    models: dict[str, Checkpoint]
    out_dtype: torch.dtype | None
    text: str


def open_config(
    config: str, stack: ExitStack, *, guard: PathGuard | None, limits: Limits | None,
    opened: dict[str, Checkpoint] | None = None,
) -> ConfiguredMerge:
    """Parse and check a mergekit YAML (a path or the text) and open the models it names (reusing `opened`,
    keyed by the reference as written). Error-level findings of the rulebook are raised as ConfigError."""
    text, where = read_config_text(config, guard)
    data = parse_config(text, where)
    report = Report()
    spec, inputs = check_structure(data, report)
    if spec is None or report.has_errors:
        errors = [f"{f.path or 'config'}: {f.message}" for f in report.findings if f.level is FindingLevel.ERROR]
        raise ConfigError(f"{where}: the config cannot be merged: {'; '.join(errors[:3]) or 'unknown method'}; "
                          "run `mergelens diagnose` on it for the fixes")
    if registry.METHODS.get(spec.name) is None:
        raise ConfigError(f"{where}: merge method {spec.name} is not one our methods implement; "
                          f"known: {', '.join(sorted(registry.METHODS))}")
    if not inputs.groups or "modules" in data:
        raise ConfigError(f"{where}: only `models:` and `slices:` configs can be merged again, not `modules:`")
    names = list(dict.fromkeys([n for _, group, _, _ in inputs.groups for n in group]
                               + [b for _, _, b, _ in inputs.groups if b is not None]))
    ckpts = dict(opened or {})
    for name in names:
        if name not in ckpts:
            ckpts[name] = stack.enter_context(load_checkpoint(name, name, guard=guard, limits=limits))
    jobs, _ = config_jobs(spec, inputs, ckpts)
    if not jobs:
        raise ConfigError(f"{where}: no tensor of the config could be read in every model it names")
    dtype = data.get("dtype")
    out_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    return ConfiguredMerge(spec.name, sorted(jobs, key=lambda j: j.output), ckpts,
                           out_dtype if isinstance(out_dtype, torch.dtype) else None, text)


def job_parameters(method: MethodSpec, job: Job, models: Sequence[str]) -> dict[str, Any]:
    """The method's parameters for one tensor, resolved by the config's lookup (gradients, filters, the
    model's block before its slice's before the top level's); absent ones keep the registry's default."""
    missing = object()
    out: dict[str, Any] = {}
    for p in method.parameters:
        if p.per_model:
            values = [job.lookup(p.name, m, job.output, job.t, missing) for m in models]
            if all(v is missing for v in values):
                continue
            lacking = [m for m, v in zip(models, values, strict=True) if v is missing]
            if lacking and p.required:
                raise ConfigError(f"{method.name} needs `{p.name}` for {lacking[0]} too; add it to its parameters")
            out[p.name] = [p.default if v is missing else v for v in values]
        else:
            value = job.lookup(p.name, None, job.output, job.t, missing)
            if value is not missing:
                out[p.name] = value
    return out


def _merge_job(
    merge: ConfiguredMerge, job: Job, views: list[torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """One job's merged tensor from its input views (in `job.sources` order) by the registry's method."""
    method = registry.METHODS[merge.method]
    models = [m for m, _ in job.inputs]
    if merge.method == "slerp":  # the job's first input is slerp's base (t = 0), the second the other model
        tensors, base, merged_models = views[1:2], views[0], models[1:2]
    else:
        tensors = views[:len(job.inputs)]
        base = views[len(job.inputs)] if job.base is not None else None
        merged_models = models
    params = job_parameters(method, job, merged_models)
    return registry.merge_tensors(merge.method, tensors, base=base, parameters=params, generator=generator,
                                  out_dtype=merge.out_dtype)


def checked_seed(random_seed: object) -> int:
    """A `--random-seed` as mergekit takes it (a non-negative integer that torch can seed with)."""
    if isinstance(random_seed, bool) or not isinstance(random_seed, int) or not 0 <= random_seed < 1 << 63:
        raise InputError(f"random_seed {random_seed!r} is not a seed: give a whole number from 0 to 2**63 - 1, "
                         "the value you pass (or will pass) to `mergekit-yaml --random-seed`")
    return random_seed


def merged_tensors(
    merge: ConfiguredMerge, *, extra: Sequence[tuple[Checkpoint, Callable[[Job], str | None]]] = (),
    progress: Progress | None = None, cancelled: Cancelled | None = None, what: str = "merge",
    random_seed: int = SEED,
) -> Iterator[tuple[Job, torch.Tensor, list[torch.Tensor]]]:
    """Each job's merged tensor, in output-name order (the order mergekit draws random masks in), read
    through the one tensor stream; `extra` adds, per job, another checkpoint's tensor (e.g. the written
    merge's) to the same tensor set. The third item is the set's views: the job's sources, then the extras.
    The random methods draw what `mergekit-yaml --random-seed random_seed` draws."""
    generator = registry.seeded_stream(checked_seed(random_seed))
    sets = []
    for job in merge.jobs:
        sources = [(merge.models[m], name) for m, name in job.sources]
        for ckpt, name_of in extra:
            name = name_of(job)
            if name is not None:
                sources.append((ckpt, name))
        sets.append(stream.TensorSet(job.output, sources))
    for job, current in zip(merge.jobs, stream.read(sets, what, cancelled=cancelled, progress=progress),
                            strict=True):
        views = list(current.views)
        yield job, _merge_job(merge, job, views[:len(job.sources)], generator), views


# ---- verify: the weights -----------------------------------------------------------------------------------


@dataclass
class _LayerFit:
    """Per layer: the Gram matrix of the sources' vectors, their products with merged - base, |merged - base|^2."""

    gram: torch.Tensor
    cross: torch.Tensor
    norm: float = 0.0
    numel: int = 0
    base_norm: float = 0.0  # |base|^2 over the layer (with a base)
    rounding: float = 0.0  # the coarsest relative rounding step (eps) of the merged tensors' dtypes
    config_diff: float | None = None  # the config check's error and verdict on the layer (None: not checked)
    config_ok: bool | None = None
    tensors: list[str] = field(default_factory=list)


def fit_layers(
    merged: Checkpoint, sources: list[Checkpoint], base: Checkpoint | None,
    progress: Progress | None = None, cancelled: Cancelled | None = None,
) -> tuple[dict[str, _LayerFit], list[Finding]]:
    """Stream every float tensor the merged model shares (name and shape) with every source and the base,
    accumulating each layer's least-squares system; NaN/Inf in MERGED is counted and named."""
    findings: list[Finding] = []
    reference = [*sources, *([base] if base else [])]
    names = [n for n, info in merged.float_tensors.items()
             if all(n in c.float_tensors and c.tensors[n].shape == info.shape for c in reference)]
    k = len(sources)
    layers: dict[str, _LayerFit] = {}
    sets = [stream.TensorSet(n, [(c, n) for c in [*reference, merged]]) for n in names]
    for current in stream.read(sets, "verify", cancelled=cancelled, progress=progress):
        name = current.key
        views = [v.double().reshape(-1) for v in current.views]
        out = views.pop()
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            layer = classify(name).layer_name
            findings.append(Finding(
                level=FindingLevel.ERROR, code="nonfinite", path=name,
                message=f"{bad} NaN/Inf values in {name} (layer {layer}) of the merged model",
                fix="merge again in float32 (`dtype: float32`); check the sources' tensors for NaN first",
            ))
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        origin = views.pop() if base is not None else None
        vectors = [v - origin for v in views] if origin is not None else views
        delta = out - origin if origin is not None else out
        fit = layers.setdefault(classify(name).layer_name, _LayerFit(
            torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)))
        stacked = torch.stack([torch.nan_to_num(v) for v in vectors])
        fit.gram += stacked @ stacked.T
        fit.cross += stacked @ delta
        fit.norm += float(delta @ delta)
        fit.numel += out.numel()
        if origin is not None:
            fit.base_norm += float(origin @ origin)
        fit.rounding = max(fit.rounding, torch.finfo(current.views[-1].dtype).eps)
        fit.tensors.append(name)
    return layers, findings


def solve_layer(fit: _LayerFit) -> tuple[list[float], float]:
    """Least-squares coefficients of the sources' vectors and the residual share of |merged - base|^2."""
    if fit.norm <= 0:
        return [0.0] * fit.gram.shape[0], 0.0
    ridge = 1e-10 * float(fit.gram.diagonal().max()) + 1e-30
    coef = torch.linalg.solve(fit.gram + ridge * torch.eye(fit.gram.shape[0], dtype=fit.gram.dtype), fit.cross)
    explained = float(2 * coef @ fit.cross - coef @ fit.gram @ coef)
    return [float(c) for c in coef], min(1.0, max(0.0, 1.0 - explained / fit.norm))


def header_findings(merged: Checkpoint, sources: list[Checkpoint]) -> list[Finding]:
    """Tensors missing or added, shapes, vocabulary rows and dtypes of MERGED against the first source."""
    first = sources[0]
    findings: list[Finding] = []
    missing = [n for n in first.float_tensors if n not in merged.tensors]
    if missing:
        findings.append(Finding(
            level=FindingLevel.ERROR, code="missing_tensors", path=missing[0],
            message=f"the merged model lacks {len(missing)} tensor(s) of {first.label}, e.g. {', '.join(missing[:3])} "
                    f"(layer {classify(missing[0]).layer_name})",
            fix="the merge did not finish or dropped layers: check the slices' layer ranges and merge again",
        ))
    extra = [n for n in merged.float_tensors if n not in first.tensors]
    if extra:
        findings.append(Finding(
            level=FindingLevel.WARNING, code="extra_tensors", path=extra[0],
            message=f"the merged model has {len(extra)} tensor(s) no source has, e.g. {', '.join(extra[:3])}",
            fix="expected for a passthrough stack of more layers; otherwise check the config's slices",
        ))
    dtypes: dict[tuple[str, str], int] = {}
    for name, info in merged.float_tensors.items():
        theirs = first.tensors.get(name)
        if theirs is None:
            continue
        if theirs.shape != info.shape:
            kind = classify(name).kind
            vocab = kind in ("embed", "lm_head") and theirs.shape[1:] == info.shape[1:]
            findings.append(Finding(
                level=FindingLevel.WARNING if vocab else FindingLevel.ERROR,
                code="vocab_change" if vocab else "shape_change", path=name,
                message=f"{name} (layer {classify(name).layer_name}) is {list(info.shape)} in the merged model, "
                        f"{list(theirs.shape)} in {first.label}"
                        + (": the vocabulary changed" if vocab else ""),
                fix="check the merged tokenizer matches (`tokenizer_source`)" if vocab
                else "the merge mixed models of different architectures; merge models of one shape only",
            ))
        if theirs.dtype != info.dtype:
            dtypes[(theirs.dtype, info.dtype)] = dtypes.get((theirs.dtype, info.dtype), 0) + 1
    for (was, now), count in dtypes.items():
        findings.append(Finding(
            level=FindingLevel.INFO, code="dtype_change",
            message=f"{count} tensor(s) are {now} in the merged model, {was} in {first.label}",
            fix="set `dtype:` in the config to the sources' dtype if that was not intended",
        ))
    return findings


def check_config(
    merged: Checkpoint, merge: ConfiguredMerge, fits: dict[str, _LayerFit],
    progress: Progress | None = None, cancelled: Cancelled | None = None, random_seed: int = SEED,
) -> list[Finding]:
    """Merge every tensor of the config again and compare it with MERGED's tensor of the same output name;
    a layer is off when |difference| beyond one ulp exceeds CONFIG_TOLERANCE of |re-merged - origin| (L2)
    (random methods re-merged with the seed they were made with match as closely; with other masks, a layer is
    off when |merged - base| and |re-merged - base| differ by over RANDOM_TOLERANCE)."""
    findings: list[Finding] = []
    random = registry.METHODS[merge.method].random
    absent = [job.output for job in merge.jobs if job.output not in merged.float_tensors]
    stats: dict[str, list[float]] = {}  # layer -> [|got - want|^2, |want - origin|^2, |got - origin|^2, numel]
    for job, expected, views in merged_tensors(
        merge, extra=[(merged, lambda j: j.output if j.output in merged.float_tensors else None)],
        progress=progress, cancelled=cancelled, what="verify", random_seed=random_seed,
    ):
        if len(views) == len(job.sources):
            continue
        got = torch.nan_to_num(views[-1].double())
        want = expected.double()
        origin = views[len(job.inputs)] if job.base is not None else views[0]
        s = stats.setdefault(classify(job.output).layer_name, [0.0, 0.0, 0.0, 0.0])
        if got.shape != want.shape:
            s[0] = math.inf
            continue
        origin = origin.double() if merge.method != "passthrough" else torch.zeros_like(want)
        slack = torch.maximum(ulp(got, views[-1].dtype), ulp(want, views[-1].dtype))
        s[0] += float(((got - want).abs() - slack).clamp_min(0).pow(2).sum())
        s[1] += float((want - origin).pow(2).sum())
        s[2] += float((got - origin).pow(2).sum())
        s[3] += want.numel()
    off = []
    for layer, (diff, change, got_change, numel) in stats.items():
        error = math.sqrt(diff / change) if change > 0 else math.sqrt(diff)
        bad = error > CONFIG_TOLERANCE
        if bad and random and change > 0 and math.isfinite(diff):  # other masks (another seed): in distribution
            error = abs(math.sqrt(got_change / change) - 1.0)
            bad = error > RANDOM_TOLERANCE + RANDOM_DRAWS / math.sqrt(numel)
        if layer in fits:
            fits[layer].config_diff, fits[layer].config_ok = error, not bad
        if bad:
            off.append((layer, error))
    if off:
        ordered = sorted(off, key=lambda le: le[0])
        named = ", ".join(f"{layer} ({error:.1%})" for layer, error in ordered[:6])
        findings.append(Finding(
            level=FindingLevel.ERROR, code="config_mismatch", path=ordered[0][0],
            message=f"{len(off)} layer(s) are not what the config's {merge.method} merge gives: {named}"
                    + (f" and {len(off) - 6} more" if len(off) > 6 else ""),
            fix="the model was merged from other inputs or settings than this config (a swapped model, another "
                "base, other weights or densities, a shifted layer_range): merge again from the config",
        ))
    if absent:
        findings.append(Finding(
            level=FindingLevel.ERROR, code="config_tensors_missing", path=absent[0],
            message=f"{len(absent)} tensor(s) the config produces are not in the merged model, e.g. {absent[0]}",
            fix="the merged model was not made by this config (other slices?): merge again from it",
        ))
    return findings


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of each value of x in `dtype` (the written tensor's): mergekit and our
    methods may round a value differently by that much."""
    if not dtype.is_floating_point:
        return torch.zeros_like(x)
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(x, info.eps), exponent - 1)


def layer_matches(fits: dict[str, _LayerFit], labels: list[str], has_base: bool, with_config: bool) -> list[LayerMatch]:
    out = []
    for name in sorted(fits, key=lambda n: group_sort_key(classify(_probe_name(n)))):
        fit = fits[name]
        coef, residual = solve_layer(fit)
        total = sum(abs(c) for c in coef)
        if has_base and _is_base(fit):
            matches = "base"
        elif residual > NONE_RESIDUAL:
            matches = "none"
        elif total > 0 and max(abs(c) for c in coef) / total >= ONE_SOURCE_SHARE and residual < SAME_RESIDUAL:
            matches = labels[max(range(len(coef)), key=lambda i: abs(coef[i]))]
        else:
            matches = "all"
        out.append(LayerMatch(
            layer_name=name, coefficients={lab: round(c, 4) for lab, c in zip(labels, coef, strict=True)},
            residual=round(residual, 4), matches=matches,
            config_error=round(fit.config_diff, 6) if with_config and fit.config_diff is not None else None,
            config_matches=fit.config_ok if with_config else None,
        ))
    return out


def _is_base(fit: _LayerFit) -> bool:
    """Whether the merged layer is the base's: no change at all, or, where no source changed the layer, a change
    within the rounding of the dtype the merge was written in (a float32 base written as bfloat16)."""
    if fit.norm <= 1e-24 * max(fit.numel, 1):
        return True
    untouched = fit.numel > 0 and float(fit.gram.diagonal().max()) == 0.0
    return untouched and fit.norm <= (fit.rounding / 2) ** 2 * fit.base_norm  # round to nearest: eps/2 a value


def _probe_name(layer: str) -> str:
    """A tensor name of the layer, for the layer sort key ('layers.3' -> 'model.layers.3.x')."""
    return f"model.{layer}.weight" if layer.startswith("layers.") else f"{layer}.weight"


def config_gives(layer: LayerMatch) -> bool:
    """Whether the config check found the layer to be what the config gives (False without a config, or for a
    layer the check did not reach)."""
    return layer.config_matches is True


def verdict_of(findings: list[Finding], layers: list[LayerMatch], behaviour: list[SourceRetention],
               kind: str | None) -> tuple[str, list[str], list[str]]:
    """ok / warning / failed, the reasons, and what to try next."""
    reasons: list[str] = []
    steps: list[str] = []
    failed = warned = False
    for f in findings:
        if f.level is FindingLevel.ERROR:
            failed = True
            reasons.append(f.message)
            if f.fix:
                steps.append(f.fix)
    # a layer the config was checked to give is explained by it (DARE's random drop leaves much of a layer's
    # change outside the span of the sources' task vectors)
    none = [lm.layer_name for lm in layers if lm.matches == "none" and not config_gives(lm)]
    if none and not any(f.code == "config_mismatch" for f in findings):
        warned = True
        reasons.append(f"{len(none)} layer(s) are not explained by the sources' changes: {', '.join(none[:6])}")
        steps.append(f"take {none[0]} from one source (a slice or a weight gradient), or check that the right "
                     "models and base were merged")
    for s in behaviour:
        if s.retention == 0.0 and s.kl is None and s.perplexity is None and kind == "causal_lm":
            failed = True
            reasons.append(f"on {s.source}'s probes the merged model's outputs are not finite (NaN/Inf)")
        elif kind == "encoder":
            sim = s.embedding_similarity or 0.0
            if sim < ENCODER_FAILED:
                failed = True
                reasons.append(f"{s.source}: sentence embeddings only {sim:.2f} cosine-similar to the source's")
            elif sim < ENCODER_WARNING:
                warned = True
                reasons.append(f"{s.source}: sentence embeddings {sim:.2f} cosine-similar to the source's "
                               f"(below {ENCODER_WARNING})")
        elif s.perplexity is not None and s.best_source_perplexity:
            ratio = s.perplexity / s.best_source_perplexity
            if ratio > PPL_FAILED:
                failed = True
                reasons.append(f"on {s.source}'s probes the merged perplexity {s.perplexity:.3g} is "
                               f"{ratio:.1f}x the best source's {s.best_source_perplexity:.3g} (> {PPL_FAILED:g}x)")
            elif ratio > PPL_WARNING:
                warned = True
                reasons.append(f"on {s.source}'s probes the merged perplexity {s.perplexity:.3g} is "
                               f"{ratio - 1:.0%} above the best source's {s.best_source_perplexity:.3g}")
    if behaviour and (failed or warned) and not steps:
        steps.append("try another method (`mergelens preview` ranks them on your prompts), lower the weight "
                     "of the model whose probes suffer, or take its worst layers from one model")
    verdict = "failed" if failed else "warning" if warned else "ok"
    if verdict == "ok":
        reasons.append("the weights are what the sources (and the config) give, and nothing is non-finite")
    return verdict, reasons, list(dict.fromkeys(steps))


def verify_merge(
    merged: str, sources: Sequence[str], base: str | None = None, *, config: str | None = None,
    probe: str | None = None, behaviour: bool | None = None, settings: Settings | None = None,
    guard: PathGuard | None = None, device: str | None = None, progress: Progress | None = None,
    cancelled: Cancelled | None = None, random_seed: int = SEED,
) -> VerifyResult:
    """Check a written merge: its weights against the sources (and the config), then, where transformers can
    build it (`behaviour` None: when it can; True: required; False: skipped), its behaviour on the probes.
    `random_seed`: the `mergekit-yaml --random-seed` the merge was made with (random methods re-merged with
    it match mask for mask; with another seed they are checked in distribution only)."""
    from .naming import model_names

    started = time.perf_counter()
    settings = settings or Settings()
    limits = settings.limits()
    checked_seed(random_seed)
    if isinstance(sources, str) or len(sources) < 1:
        raise InputError("verify needs the merge's sources: a list of one or more paths or Hub ids")
    options = settings.analysis_options(device)
    records = [] if behaviour is False else read_probes(probe, guard) if probe else shipped_probes()
    notes: list[str] = []
    with ExitStack() as stack:
        out = stack.enter_context(load_checkpoint(merged, "merged", guard=guard, limits=limits))
        labels = model_names(sources)
        srcs = [stack.enter_context(load_checkpoint(s, lab, guard=guard, limits=limits))
                for s, lab in zip(sources, labels, strict=True)]
        base_ckpt = stack.enter_context(load_checkpoint(base, "base", guard=guard, limits=limits)) if base else None
        limits.check_request(sum(c.nbytes for c in [out, *srcs, *([base_ckpt] if base_ckpt else [])]))
        merge = None
        if config is not None:  # checked before any tensor is read
            opened = dict(zip(sources, srcs, strict=True)) | ({base: base_ckpt} if base and base_ckpt else {})
            merge = open_config(config, stack, guard=guard, limits=limits, opened=opened)
        runnable = None
        check_probe_sources(records, labels, list(sources))
        if behaviour is not False:  # whether the probes can run, also checked before any tensor is read
            try:
                skeleton = skeleton_of(srcs[0])
                batch = tokenize(records, skeleton)
                for ckpt in [*srcs, out]:
                    check_fits(ckpt, settings, outputs_bytes(skeleton, batch, len(srcs) + 1))
                runnable = skeleton, batch
            except (CheckpointFormatError, InputError, LimitExceededError) as exc:
                if behaviour:
                    raise
                notes.append(f"behaviour not measured: {exc}")
        phases = Phases(progress, 1 + (merge is not None) + (0 if runnable is None else 2 * (len(srcs) + 1)))
        findings = header_findings(out, srcs)
        fits, nonfinite = fit_layers(out, srcs, base_ckpt, phases.phase("weights"), cancelled)
        findings.extend(nonfinite)
        if merge is not None:
            findings.extend(check_config(out, merge, fits, phases.phase("config"), cancelled, random_seed))
        layers = layer_matches(fits, labels, base_ckpt is not None, merge is not None)
        measured: list[SourceRetention] = []
        kind = None
        if runnable is not None:
            kind, measured = _behaviour(out, srcs, *runnable, settings, options.device.torch_name, phases,
                                        cancelled)
    verdict, reasons, steps = verdict_of(findings, layers, measured, kind)
    return VerifyResult(
        merged=merged, sources=list(sources), base=base, verdict=verdict, reasons=reasons, next_steps=steps,
        findings=findings, layers=layers, behaviour=measured, notes=notes,
        elapsed_s=round(time.perf_counter() - started, 3),
    )


# ---- probes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRecord:
    """One probe input: `prompt` (not scored) then `text` (scored); `source` names the model it tests."""

    text: str
    prompt: str = ""
    source: str | None = None


def shipped_probes() -> list[ProbeRecord]:
    from .analysis.activations import probe_texts

    return [ProbeRecord(t) for t in probe_texts()]


def read_probes(path: str, guard: PathGuard | None = None) -> list[ProbeRecord]:
    """Probe records from a file: text lines, or JSONL records {"text"} / {"prompt", "completion"}, each with
    an optional "source" (a model's name as compare gives it, or the path given for it)."""
    resolved = guard.check(path, "probe file") if guard else Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise InputError(f"probe file {path!r} is not a file; give text lines or JSONL records")
    text = read_text_file(resolved, "probe file", MAX_PROBE_BYTES, "a probe set is a few hundred short texts",
                          too_large=LimitExceededError)
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    jsonl = bool(lines) and all(line.lstrip().startswith("{") for line in lines)
    for number, line in enumerate(lines, 1):
        if not jsonl:
            records.append(ProbeRecord(line.replace("\\n", "\n")))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"probe file {resolved.name}, line {number}: not JSON ({exc.msg})") from None
        source = item.get("source")
        if "text" in item and isinstance(item["text"], str):
            records.append(ProbeRecord(item["text"], source=source if isinstance(source, str) else None))
        elif isinstance(item.get("prompt"), str) and isinstance(item.get("completion"), str):
            records.append(ProbeRecord(item["completion"], item["prompt"],
                                       source if isinstance(source, str) else None))
        else:
            raise InputError(f"probe file {resolved.name}, line {number}: a record needs \"text\", or "
                             "\"prompt\" and \"completion\" (strings)")
    if not records:
        raise InputError(f"probe file {resolved.name} holds no probe")
    if len(records) > MAX_PROBES:
        raise LimitExceededError(f"probe file {resolved.name} has {len(records)} probes; at most {MAX_PROBES}")
    return records


# ---- models built from streamed tensors ----------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("preview and verify's behaviour checks need transformers: "
                         "pip install 'mergelens-mcp[activations]'") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


@dataclass
class Skeleton:
    """What a model is built from: its transformers config and class, and whether it has an LM head."""

    config: Any
    kind: str  # 'causal_lm' or 'encoder'
    root: Path

    def empty(self) -> torch.nn.Module:
        tf = _transformers()
        with torch.device("meta"):
            if self.kind == "causal_lm":
                return tf.AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            return tf.AutoModel.from_config(self.config, dtype=torch.float32)


def skeleton_of(ckpt: Checkpoint) -> Skeleton:
    """The transformers skeleton for a checkpoint folder with a config.json (read offline)."""
    tf = _transformers()
    root = ckpt.model_root
    if not (root / "config.json").is_file():
        raise CheckpointFormatError(f"{ckpt.label}: no config.json next to the weights; transformers needs it "
                                    "to build the model for the probes")
    try:
        config = tf.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointFormatError(f"{ckpt.label}: transformers cannot read its config.json ({exc})") from None
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    return Skeleton(config, "causal_lm" if causal else "encoder", root)


def fill(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], label: str) -> torch.nn.Module:
    """Assign the streamed tensors (float32) to the meta skeleton, then the buffers transformers computes
    (rotary frequencies, position ids) and tied weights; a parameter still missing is an error."""
    expected = dict(model.named_parameters())
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for name, tensor in tensors:
        key = name if name in expected else name.removeprefix(f"{prefix}.") if prefix else name
        if key not in expected:
            continue
        owner, _, attr = key.rpartition(".")
        # the parameter itself replaced (as load_state_dict(assign=True) does), in constant time: one
        # load_state_dict per tensor walked every module each time (cost tensors x modules)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointFormatError(f"{label}: {name} is {list(tensor.shape)}, the model's config gives "
                                        f"{list(expected[key].shape)}; merge models of this config's shape")
        modules[owner]._parameters[attr] = torch.nn.Parameter(tensor.float(), requires_grad=False)
    _materialise_buffers(model)
    if any(p.is_meta for p in model.parameters()):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointFormatError(f"{label}: the weights lack {len(missing)} tensor(s) the model needs, e.g. "
                                    f"{missing[0]}; merge every tensor of the sources")
    return model.eval()


def _materialise_buffers(model: torch.nn.Module) -> None:
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        fresh = None
        config = getattr(model, "config", None)
        try:
            fresh = type(module)(config=config)
        except (TypeError, ValueError, AttributeError):
            fresh = None
        for name in meta:
            buffer = getattr(module, name)
            value = getattr(fresh, name, None) if fresh is not None else None
            if not isinstance(value, torch.Tensor) or value.shape != buffer.shape or value.is_meta:
                value = (torch.arange(buffer.shape[-1]).expand(buffer.shape).clone() if "position" in name
                         else torch.zeros(buffer.shape, dtype=buffer.dtype))
            module.register_buffer(name, value.to(buffer.dtype), persistent=name in module.state_dict())


def stored_tensors(
    ckpt: Checkpoint, cancelled: Cancelled | None = None, progress: Progress | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """One checkpoint's float tensors through the stream, each copied out as float32 (the views die)."""
    sets = [stream.TensorSet(n, [(ckpt, n)]) for n in ckpt.float_tensors]
    for current in stream.read(sets, f"loading {ckpt.label}", cancelled=cancelled, progress=progress):
        yield current.key, current.views[0].to(torch.float32, copy=True)  # one copy, whatever the dtype


def model_bytes(ckpt: Checkpoint) -> int:
    """The float32 model's weights in memory."""
    return 4 * sum(info.numel for info in ckpt.float_tensors.values())


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(ckpt: Checkpoint, settings: Settings, outputs: int = 0) -> None:
    """Refuse up front a model that would not fit (with `outputs` bytes of cached probe outputs beside it):
    the settings' cap, then the machine's available memory."""
    need = model_bytes(ckpt) * 6 // 5 + outputs
    cap = settings.max_probe_model_bytes
    free = available_memory()
    if need > cap:
        raise LimitExceededError(f"{ckpt.label}: building it for the probes needs about {need / 2**30:.1f} GiB "
                                 f"(float32 + 20%), over the cap max_probe_model_bytes = {cap / 2**30:.2f} GiB; "
                                 "raise MERGELENS_MAX_PROBE_MODEL_BYTES or preview smaller models")
    if free is not None and need > free:
        raise LimitExceededError(f"{ckpt.label}: building it for the probes needs about {need / 2**30:.1f} GiB, "
                                 f"and {free / 2**30:.1f} GiB is available; free memory or use a GPU "
                                 "(--device cuda)")


# ---- running the probes --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Tokenized probes: ids (right-padded), mask, the first scored position of each, its source."""

    ids: torch.Tensor
    mask: torch.Tensor
    starts: list[int]
    sources: list[str | None]


def tokenize(records: list[ProbeRecord], skeleton: Skeleton, max_tokens: int = MAX_TOKENS) -> Batch:
    """The model's own tokenizer where the folder has one; else UTF-8 bytes folded into the vocabulary (a
    fixed stand-in: every model sees the same ids)."""
    tok = None
    if any((skeleton.root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            tok = _transformers().AutoTokenizer.from_pretrained(str(skeleton.root), local_files_only=True)
        except (OSError, ValueError, KeyError):
            tok = None
    vocab = int(getattr(skeleton.config, "vocab_size", 256) or 256)
    rows, starts = [], []
    for r in records:
        if tok is not None:
            full = tok(r.prompt + r.text, truncation=True, max_length=max_tokens)["input_ids"]
            start = len(tok(r.prompt)["input_ids"]) if r.prompt else 1
        else:
            full = [1 % vocab, *(b % vocab for b in (r.prompt + r.text).encode("utf-8"))][:max_tokens]
            start = 1 + len(r.prompt.encode("utf-8")) if r.prompt else 1
        if skeleton.kind == "causal_lm":
            start = min(max(start, 1), len(full) - 1) if len(full) > 1 else 1
        rows.append(full)
        starts.append(start)
    width = max(len(r) for r in rows)
    pad = int(getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return Batch(ids, mask, starts, [r.source for r in records])


@dataclass
class Outputs:
    """One model's outputs on the probes, per record: log-probs of the scored positions and the targets'
    (causal LM), or the last hidden states and the sentence embedding (encoder)."""

    logprobs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)


def run_probes(
    model: torch.nn.Module, batch: Batch, kind: str, device: str, cancelled: Cancelled | None = None,
    progress: Progress | None = None,
) -> Outputs:
    model.to(device)
    out = Outputs()
    with torch.inference_mode():
        for first in range(0, batch.ids.shape[0], BATCH):
            if cancelled is not None and cancelled():
                raise AnalysisCancelledError("cancelled between probe batches")
            ids = batch.ids[first:first + BATCH].to(device)
            mask = batch.mask[first:first + BATCH].to(device)
            if kind == "causal_lm":
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                for row in range(ids.shape[0]):
                    n = int(mask[row].sum())
                    start = batch.starts[first + row]
                    out.logprobs.append(torch.log_softmax(logits[row, start - 1:n - 1], -1).cpu())
                    out.targets.append(ids[row, start:n].cpu())
            else:
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                for row in range(ids.shape[0]):
                    n = int(mask[row].sum())
                    h = hidden[row, :n].cpu()
                    out.hidden.append(h)
                    out.embeddings.append(h.mean(0))
            if progress is not None:
                done = min(first + BATCH, batch.ids.shape[0])
                progress(done, batch.ids.shape[0], f"{done} of {batch.ids.shape[0]} probes")
    model.to("cpu")
    return out


def _selected(batch: Batch, label: str, given: str) -> list[int]:
    """The records that test one source: those naming it (by label or as given), else all when none names
    any source."""
    named = [i for i, s in enumerate(batch.sources) if s is not None and s in (label, given, Path(given).name)]
    if named:
        return named
    return [i for i, s in enumerate(batch.sources) if s is None]


def _perplexity(outputs: Outputs, rows: list[int]) -> float | None:
    nll = [-outputs.logprobs[i].gather(-1, outputs.targets[i].unsqueeze(-1)).squeeze(-1) for i in rows]
    nll = [x for x in nll if x.numel()]
    if not nll:
        return None
    return float(torch.exp(torch.cat(nll).mean()))


def measure(
    merged: Outputs, sources: list[Outputs], labels: list[str], given: list[str], batch: Batch, kind: str
) -> list[SourceRetention]:
    """The merged model against each source on the records that test it."""
    out = []
    for k, (label, src) in enumerate(zip(labels, sources, strict=True)):
        rows = _selected(batch, label, given[k])
        if not rows:
            continue
        if kind == "causal_lm":
            kl_parts, agree = [], []
            for i in rows:
                p, q = src.logprobs[i], merged.logprobs[i]
                if p.shape[0] == 0:
                    continue
                kl_parts.append((p.exp() * (p - q)).sum(-1))
                agree.append((p.argmax(-1) == q.argmax(-1)).float())
            kl = float(torch.cat(kl_parts).mean()) if kl_parts else 0.0
            best = min((x for x in (_perplexity(s, rows) for s in sources) if x is not None), default=None)
            finite = math.isfinite(kl)  # NaN/Inf weights give NaN outputs: nothing of the source is kept
            out.append(SourceRetention(
                source=label, probes=len(rows), retention=round(math.exp(-max(kl, 0.0)), 6) if finite else 0.0,
                kl=round(kl, 6) if finite else None,
                agreement=round(float(torch.cat(agree).mean()), 6) if agree else None,
                perplexity=_round(_perplexity(merged, rows)), source_perplexity=_round(_perplexity(src, rows)),
                best_source_perplexity=_round(best),
            ))
        else:
            cos = torch.nn.functional.cosine_similarity
            hidden = float(torch.cat([cos(merged.hidden[i], src.hidden[i], dim=-1) for i in rows]).mean())
            embed = float(torch.stack([cos(merged.embeddings[i], src.embeddings[i], dim=0) for i in rows]).mean())
            out.append(SourceRetention(
                source=label, probes=len(rows), retention=round(max(0.0, embed), 6) if math.isfinite(embed) else 0.0,
                hidden_similarity=_round(hidden), embedding_similarity=_round(embed) if math.isfinite(embed) else 0.0,
            ))
    return out


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)


def outputs_bytes(skeleton: Skeleton, batch: Batch, models: int) -> int:
    """What the cached probe outputs of `models` models take: float32 log-probs over the vocabulary per
    scored token (causal LM), or the hidden states (encoder)."""
    width = getattr(skeleton.config, "vocab_size" if skeleton.kind == "causal_lm" else "hidden_size", 0) or 0
    return 4 * int(batch.mask.sum()) * int(width) * models


def source_outputs(
    srcs: list[Checkpoint], skeleton: Skeleton, batch: Batch, settings: Settings, device: str,
    phases: Phases, cancelled: Cancelled | None,
) -> list[Outputs]:
    """Each source built, run on the probes and dropped, one at a time; their outputs kept (the memory
    check counts them: the last model is built while every source's outputs are held)."""
    outputs = []
    cached = outputs_bytes(skeleton, batch, len(srcs) + 1)
    for ckpt in srcs:
        check_fits(ckpt, settings, cached)
        model = fill(skeleton.empty(), stored_tensors(ckpt, cancelled, phases.phase(f"reading {ckpt.label}")),
                     ckpt.label)
        outputs.append(run_probes(model, batch, skeleton.kind, device, cancelled,
                                  phases.phase(f"probes on {ckpt.label}")))
        del model
    return outputs


def _behaviour(
    merged: Checkpoint, srcs: list[Checkpoint], skeleton: Skeleton, batch: Batch, settings: Settings,
    device: str, phases: Phases, cancelled: Cancelled | None,
) -> tuple[str, list[SourceRetention]]:
    outputs = source_outputs(srcs, skeleton, batch, settings, device, phases, cancelled)
    model = fill(skeleton.empty(), stored_tensors(merged, cancelled, phases.phase("reading merged")), merged.label)
    mine = run_probes(model, batch, skeleton.kind, device, cancelled, phases.phase("probes on merged"))
    del model
    return skeleton.kind, measure(mine, outputs, [c.label for c in srcs], [c.source for c in srcs], batch,
                                  skeleton.kind)


def check_probe_sources(records: list[ProbeRecord], labels: list[str], given: list[str]) -> None:
    """Every "source" a probe record names must name one of the models (its label or the path given)."""
    known = {*labels, *given, *(Path(g).name for g in given)}
    unknown = sorted({r.source for r in records if r.source is not None and r.source not in known})
    if unknown:
        raise InputError(f"probe records name source {', '.join(map(repr, unknown[:3]))}, which is none of the "
                         f"models; name them {', '.join(labels)} or by the path given")


# ---- preview -------------------------------------------------------------------------------------------------


def candidate_configs(result: Any, methods: Sequence[str] | None) -> list[tuple[str, str]]:
    """(method, mergekit YAML) per candidate: the given methods, else the recommended one, its runner-up and
    linear; the YAML is what `recommend` writes for that method on these models (parameters measured)."""
    from .mergekit.recommend import mergekit_yaml, needs_separate_base
    from .models import MergeMethod

    if methods:
        chosen = []
        for name in methods:
            try:
                chosen.append(MergeMethod(name))
            except ValueError:
                raise InputError(f"unknown merge method {name!r}; known: "
                                 f"{', '.join(m.value for m in MergeMethod)}") from None
    else:
        strategy = result.strategy
        if strategy is None:
            raise CheckpointFormatError("no candidate merge: the models could not be compared ("
                                        + "; ".join(result.mci.reasons[:2]) + ")")
        chosen = [strategy.method, *([strategy.runner_up] if strategy.runner_up else []), MergeMethod.LINEAR]
    out = []
    for method in dict.fromkeys(chosen):
        if method is MergeMethod.PASSTHROUGH:
            continue
        if needs_separate_base(method) and result.base is None:
            if methods:
                raise InputError(f"{method.value} needs a base model: pass --base")
            continue
        try:
            out.append((method.value, mergekit_yaml(result, method)))
        except ValueError as exc:
            raise InputError(f"{method.value}: {exc}") from None
    return out


def given_merge(
    config: str, stack: ExitStack, guard: PathGuard | None, settings: Settings, opened: dict[str, Checkpoint]
) -> ConfiguredMerge:
    """A candidate config the user gave: it must merge the previewed models (and base), no others."""
    merge = open_config(config, stack, guard=guard, limits=settings.limits(), opened=opened)
    known = {c.root for c in opened.values()}
    others = sorted(name for name, c in merge.models.items() if c.root not in known)
    if others:
        raise InputError(f"a candidate {merge.method} config merges {', '.join(others[:3])}, which is not among "
                         "the models previewed (or their base); preview the models the config merges")
    return merge


def preview_merge(
    models: Sequence[str], base: str | None = None, *, methods: Sequence[str] | None = None,
    configs: Sequence[str] | None = None, probe: str | None = None, settings: Settings | None = None,
    guard: PathGuard | None = None, device: str | None = None, progress: Progress | None = None,
    cancelled: Cancelled | None = None, random_seed: int = SEED,
) -> PreviewResult:
    """Merge each candidate in memory, run it on the probes and rank the candidates by how much of each
    source's behaviour they keep (see `SourceRetention`). Candidates: `configs` (mergekit YAMLs, paths or
    text, merging these models) and `methods` (the YAML `recommend` writes for each); neither: the
    recommended method, its runner-up and linear. Only `configs` skips the weight comparison. The random
    methods (DARE, della) draw the masks `mergekit-yaml --random-seed random_seed` would: preview with the seed
    you will merge with to measure that very merge."""
    return preview_with_comparison(models, base, methods=methods, configs=configs, probe=probe,
                                   settings=settings, guard=guard, device=device, progress=progress,
                                   cancelled=cancelled, random_seed=random_seed)[0]


def preview_with_comparison(
    models: Sequence[str], base: str | None = None, *, methods: Sequence[str] | None = None,
    configs: Sequence[str] | None = None, probe: str | None = None, settings: Settings | None = None,
    guard: PathGuard | None = None, device: str | None = None, progress: Progress | None = None,
    cancelled: Cancelled | None = None, random_seed: int = SEED,
) -> tuple[PreviewResult, CompareResult | None]:
    """`preview_merge`, with the comparison its candidates came from (for the report; None when only
    `configs` were given: they need none)."""
    from .service import compare_checkpoints, open_checkpoints

    started = time.perf_counter()
    settings = settings or Settings()
    options = settings.analysis_options(device)
    checked_seed(random_seed)
    records = read_probes(probe, guard) if probe else shipped_probes()
    with ExitStack() as stack:
        srcs, base_ckpt = open_checkpoints(models, base, settings, guard, stack)
        skeleton = skeleton_of(srcs[0])
        batch = tokenize(records, skeleton)
        check_probe_sources(records, [c.label for c in srcs], [str(m) for m in models])
        for ckpt in srcs:  # refused before any tensor is read
            check_fits(ckpt, settings, outputs_bytes(skeleton, batch, len(srcs) + 1))
        compared = bool(methods) or not configs
        given = (len(set(methods)) if methods else 0 if configs else 3) + len(configs or ())
        phases = Phases(progress, compared + 2 * len(srcs) + 2 * given)
        opened = {str(m): c for m, c in zip(models, srcs, strict=True)} | (
            {str(base): base_ckpt} if base and base_ckpt else {})
        merges = [given_merge(text, stack, guard, settings, opened) for text in configs or ()]
        result = None
        if compared:
            result = compare_checkpoints(srcs, base_ckpt, options, cancelled=cancelled,
                                         progress=phases.phase("comparing the weights"))
            merges += [open_config(text, stack, guard=guard, limits=settings.limits(), opened=opened)
                       for _, text in candidate_configs(result, methods)]
        device_name = options.device.torch_name
        outputs = source_outputs(srcs, skeleton, batch, settings, device_name, phases, cancelled)
        previews = []
        for merge in merges:
            method, text = merge.method, merge.text
            tensors = ((job.output, tensor) for job, tensor, _ in merged_tensors(
                merge, cancelled=cancelled, progress=phases.phase(f"merging {method}"), random_seed=random_seed))
            model = fill(skeleton.empty(), tensors, f"the {method} merge")
            mine = run_probes(model, batch, skeleton.kind, device_name, cancelled,
                              phases.phase(f"probes on {method}"))
            del model
            measured = measure(mine, outputs, [c.label for c in srcs], [str(m) for m in models], batch,
                               skeleton.kind)
            overall = sum(s.retention for s in measured) / len(measured) if measured else 0.0
            previews.append((overall, method, measured, text))
        phases.finish()
    previews.sort(key=lambda p: -p[0])
    ranked = [MethodPreview(method=m, rank=i + 1, retention=round(r, 6), sources=s, mergekit_yaml=t)
              for i, (r, m, s, t) in enumerate(previews)]
    notes = []
    if skeleton.kind == "encoder":
        notes.append("no LM head: retention is the sentence-embedding cosine with each source")
    return PreviewResult(
        models=[str(m) for m in models], base=base, kind=skeleton.kind, probes=len(records),
        probe_set=Path(probe).name if probe else "shipped", methods=ranked,
        best=ranked[0].method if ranked else "", notes=notes, elapsed_s=round(time.perf_counter() - started, 3),
    ), result
