"""Diagnosis of a user's mergekit YAML: what mergekit would silently accept or fail on only after downloading,
then, where the referenced models can be read, the configured merge simulated per layer (`simulation.py`).

Findings are collected, not raised, so one pass reports everything; only YAML that cannot be parsed at all
raises `ConfigError`. Each finding has a severity, the YAML path (`models[1].parameters.density`) and a fix.
Model references go through the same loader and path guard as `compare`; Hub ids are not downloaded here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    LimitExceededError,
    MergeLensError,
    PathNotAllowedError,
)
from ..models import ConfigDiagnosis, Finding, FindingLevel, LayerInterference
from ..security.limits import Limits
from ..security.paths import PathGuard, looks_like_hub_id
from .compat import block_count, plan_comparison
from .loading import Checkpoint, load_checkpoint
from .mergekit_schema import (
    DTYPES,
    METHODS,
    MODEL_KEYS,
    SLICE_KEYS,
    SOURCE_KEYS,
    TOKENIZER_KEYS,
    TOP_LEVEL_KEYS,
    MethodSpec,
    describe_count,
)
from .simulation import (
    NUMBER_STRING,
    Cancelled,
    Job,
    Lookup,
    Progress,
    SliceSpec,
    model_jobs,
    resolve,
    simulate,
    slice_jobs,
)

MAX_CONFIG_BYTES = 1 << 20
ERR, WARN, INFO = FindingLevel.ERROR, FindingLevel.WARNING, FindingLevel.INFO
MAX_YAML_VALUES = 100_000


# ---- parsing -----------------------------------------------------------------------------------------


def read_config_text(config: str, guard: PathGuard | None = None) -> tuple[str, str]:
    """(YAML text, where it came from): `config` is a path to a .yaml/.yml file or the YAML itself."""
    stripped = config.strip()
    looks_like_path = "\n" not in stripped and (
        stripped.endswith((".yaml", ".yml")) or (":" not in stripped and _is_allowed_file(stripped, guard))
    )
    if not looks_like_path:
        if len(config) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config: the YAML text is over {MAX_CONFIG_BYTES:,} characters; a mergekit "
                              "config is a few KiB")
        return config, "inline YAML"
    path = guard.check(stripped, "config") if guard else Path(stripped).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config: {stripped!r} is not a file; pass a mergekit .yaml path or the YAML text")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {path.name} is over 1 MiB; a mergekit config is a few KiB")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path.name} is not UTF-8 text") from None


def _is_allowed_file(text: str, guard: PathGuard | None) -> bool:
    """Whether one line of text names a file (inside the guard's roots: nothing is revealed about others)."""
    try:
        path = guard.check(text, "config") if guard else Path(text).expanduser()
        return path.is_file()
    except (MergeLensError, OSError, RuntimeError):
        return False


def _check_expanded_size(data: Any, where: str) -> None:
    """Refuse YAML whose aliases expand to an absurd number of values (a "billion laughs" document), which
    any later walk over the config, or its error messages, would otherwise take forever to go through."""
    budget = MAX_YAML_VALUES
    stack = [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where}: expands to over {MAX_YAML_VALUES:,} values (YAML anchors and "
                              "aliases); a mergekit config has a few hundred at most")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_config(text: str, where: str = "config") -> dict[str, Any]:
    """yaml.safe_load, with errors that name the line and the fix."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: is nested too deeply to be a mergekit config") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown line"
        if "expected a single document" in str(exc):
            raise ConfigError(f"{where}: holds several YAML documents (mergekit-multi format); diagnose one "
                              "merge at a time: split it at the `---` lines") from None
        raise ConfigError(
            f"{where}: invalid YAML at {line}: {exc.problem or exc}; check the indentation and quoting there "
            "(a mergekit config is a mapping: `merge_method: ...`, `models: ...`)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    _check_expanded_size(data, where)
    if data is None:
        raise ConfigError(f"{where}: is empty; a mergekit config needs at least `merge_method` and `models`")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: is a YAML {type(data).__name__}, not a mapping; a mergekit config "
                          "starts with keys like `merge_method:` and `models:`")
    return data


# ---- structural checks -------------------------------------------------------------------------------


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(
        self, level: FindingLevel, code: str, path: str | None, message: str, fix: str | None = None
    ) -> None:
        self.findings.append(Finding(level=level, code=code, message=message, fix=fix, path=path))

    @property
    def has_errors(self) -> bool:
        return any(f.level is ERR for f in self.findings)


def model_key(ref: Any) -> str | None:
    """The model a reference names ("path", "path@rev", {model: ...}), without a LoRA suffix."""
    if isinstance(ref, str):
        return ref.split("+", 1)[0].strip() or None
    if isinstance(ref, dict):
        inner = ref.get("model")
        if isinstance(inner, dict):
            path, rev = inner.get("path"), inner.get("revision")
            if not isinstance(path, str):
                return None
            return f"{path}@{rev}" if rev else path
        return model_key(inner)
    return None


def _unknown_keys(report: Report, mapping: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        report.add(WARN, "unknown_key", f"{where}.{key}" if where else str(key),
                   f"unknown key {key!r}{f' in {where}' if where else ''}: mergekit ignores it silently",
                   f"did you mean {close[0]!r}?" if close else f"remove it; known keys: {', '.join(known)}")


@dataclass
class Inputs:
    """Where each model appears, and each `parameters` block with the models it applies to."""

    # (path, models, base, is a slice)
    groups: list[tuple[str, list[str], str | None, bool]] = field(default_factory=list)
    # (path, block, the models it applies to: None = all)
    blocks: list[tuple[str, dict[str, Any], list[str] | None]] = field(default_factory=list)
    # (path, model, start, end)
    ranges: list[tuple[str, str, int, int]] = field(default_factory=list)


def check_structure(data: dict[str, Any], report: Report) -> tuple[MethodSpec | None, Inputs]:
    _unknown_keys(report, data, TOP_LEVEL_KEYS, "")
    spec = _check_method(data, report)
    inputs = Inputs()
    present = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(present) > 1:
        report.add(ERR, "models_and_slices", present[1], f"the config has both {' and '.join(present)}",
                   "keep one: `models` merges whole models, `slices` picks layer ranges")
    elif not present:
        report.add(ERR, "no_models", "models", "the config lists no models (`models`, `slices` or `modules`)",
                   "add `models:` with one `- model: path-or-hub-id` entry per model")
    base = model_key(data.get("base_model")) if data.get("base_model") is not None else None
    if data.get("base_model") is not None and base is None:
        report.add(ERR, "invalid_model", "base_model", "base_model is not a model reference",
                   "write `base_model: org/name` or a local path")
    if isinstance(data.get("parameters"), dict):
        inputs.blocks.append(("parameters", data["parameters"], None))
    elif data.get("parameters") is not None:
        report.add(ERR, "invalid_parameters", "parameters", "`parameters` must be a mapping of name: value",
                   "write e.g. `parameters: {density: 0.5}`")
    if "models" in present[:1]:
        _check_models(data["models"], base, report, inputs)
    elif "slices" in present[:1]:
        _check_slices(data["slices"], base, report, inputs)
    elif "modules" in present[:1]:
        report.add(INFO, "modules_not_checked", "modules", "`modules` configs are checked for keys only",
                   None)
    _check_tokenizer(data, report)
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and str(value).removeprefix("torch.") not in DTYPES:
            report.add(ERR, "unknown_dtype", key, f"{key} {value!r} is not a dtype mergekit knows",
                       f"use one of {', '.join(DTYPES[:3])}")
    if spec is not None:
        _check_inputs(spec, base, inputs, report)
        _check_parameters(spec, inputs, report)
    return spec, inputs


def _check_method(data: dict[str, Any], report: Report) -> MethodSpec | None:
    method = data.get("merge_method")
    if method is None:
        report.add(ERR, "missing_method", "merge_method", "the config has no merge_method",
                   "add e.g. `merge_method: ties` (see `mergelens` strategy for a recommendation)")
        return None
    if not isinstance(method, str) or method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        report.add(ERR, "unknown_method", "merge_method", f"merge_method {method!r} is not a mergekit method",
                   f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(sorted(METHODS))}")
        return None
    return METHODS[method]


def _check_models(models: Any, base: str | None, report: Report, inputs: Inputs) -> None:
    if not isinstance(models, list):
        report.add(ERR, "invalid_models", "models", "`models` must be a list of `- model: ...` entries",
                   "write each model as `- model: org/name`")
        return
    names = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or model_key(entry) is None:
            report.add(ERR, "invalid_model", where, f"{where} is not a `model: ...` mapping",
                       "write `- model: org/name` (optionally with `parameters:`)")
            continue
        _unknown_keys(report, entry, MODEL_KEYS, where)
        name = model_key(entry)
        assert name is not None
        names.append(name)
        if isinstance(entry.get("parameters"), dict):
            inputs.blocks.append((f"{where}.parameters", entry["parameters"], [name]))
    inputs.groups.append(("models", names, base, False))


def _check_slices(slices: Any, base: str | None, report: Report, inputs: Inputs) -> None:
    if not isinstance(slices, list):
        report.add(ERR, "invalid_slices", "slices", "`slices` must be a list of `- sources: [...]` entries",
                   "write each slice as `- sources: [{model: org/name, layer_range: [0, 32]}]`")
        return
    for i, s in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            report.add(ERR, "invalid_slice", where, f"{where} has no `sources` list",
                       "write `- sources: [{model: org/name, layer_range: [0, 32]}]`")
            continue
        _unknown_keys(report, s, SLICE_KEYS, where)
        slice_base = model_key(s["base_model"]) if s.get("base_model") else base
        names, lengths = [], set()
        for j, src in enumerate(s["sources"]):
            src_where = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or model_key(src) is None:
                report.add(ERR, "invalid_model", src_where, f"{src_where} is not a `model: ...` mapping",
                           "write `{model: org/name, layer_range: [start, end]}`")
                continue
            _unknown_keys(report, src, SOURCE_KEYS, src_where)
            name = model_key(src)
            assert name is not None
            names.append(name)
            lr = src.get("layer_range")
            integers = isinstance(lr, list) and all(type(x) is int for x in lr)
            if not (integers and len(lr) == 2 and 0 <= lr[0] <= lr[1]):
                report.add(ERR, "invalid_layer_range", f"{src_where}.layer_range",
                           f"layer_range {lr!r} is not [start, end] with 0 <= start <= end (mergekit copies "
                           "no layers for a reversed range, silently)",
                           "write `layer_range: [0, 32]` (end exclusive)")
            else:
                lengths.add(lr[1] - lr[0])
                inputs.ranges.append((f"{src_where}.layer_range", name, lr[0], lr[1]))
            if isinstance(src.get("parameters"), dict):
                inputs.blocks.append((f"{src_where}.parameters", src["parameters"], [name]))
        if len(lengths) > 1:
            report.add(ERR, "slice_length_mismatch", f"{where}.sources",
                       f"the sources of {where} span {sorted(lengths)} layers; mergekit needs one length",
                       "give every source of a slice a layer_range of the same length")
        if isinstance(s.get("parameters"), dict):
            inputs.blocks.append((f"{where}.parameters", s["parameters"], names))
        inputs.groups.append((where, names, slice_base, True))


def _check_tokenizer(data: dict[str, Any], report: Report) -> None:
    if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
        report.add(ERR, "tokenizer_conflict", "tokenizer_source",
                   "both `tokenizer` and `tokenizer_source` are set; mergekit refuses that",
                   "keep `tokenizer: {source: ...}` and delete `tokenizer_source`")
    if isinstance(data.get("tokenizer"), dict):
        _unknown_keys(report, data["tokenizer"], TOKENIZER_KEYS, "tokenizer")


def _check_inputs(spec: MethodSpec, base: str | None, inputs: Inputs, report: Report) -> None:
    for where, names, group_base, sliced in inputs.groups:
        used_base = group_base if spec.base != "ignored" else None
        if spec.needs_base and group_base is None:
            report.add(ERR, "missing_base", "base_model", f"{spec.name} needs a base_model; there is none",
                       "add `base_model: <the model the others were fine-tuned from>`")
        if spec.base == "ignored" and group_base is not None and where in ("models", "slices[0]"):
            report.add(INFO, "base_ignored", "base_model", f"{spec.name} ignores base_model", None)
        if sliced and used_base is not None and used_base not in names:
            report.add(ERR, "base_not_in_slice", f"{where}.sources",
                       f"the base model is not a source of {where}; mergekit adds it to `models` lists "
                       "but not to slices",
                       f"add `{{model: {used_base}, layer_range: [...]}}` to the slice's sources")
            continue
        count = len(set(names) | ({used_base} if used_base else set()))
        if count < spec.min_inputs or (spec.max_inputs is not None and count > spec.max_inputs):
            fix = ("list exactly two models and set base_model to one of them" if spec.name == "slerp"
                   else f"give {spec.name} {describe_count(spec)} models (the base counts)")
            report.add(ERR, "model_count", where,
                       f"{spec.name} takes {describe_count(spec)} input models (base included); {where} "
                       f"gives {count}", fix)
        non_base = len(set(names) - {used_base})
        if (spec.min_non_base is not None and non_base < spec.min_non_base) or (
            spec.max_non_base is not None and non_base > spec.max_non_base
        ):
            report.add(ERR, "model_count", where,
                       f"{spec.name} takes {spec.min_non_base} to {spec.max_non_base} models besides the "
                       f"base; {where} gives {non_base}", "adjust the model list")


def _check_parameters(spec: MethodSpec, inputs: Inputs, report: Report) -> None:
    given: dict[str, set[str | None]] = {}
    for where, block, models in inputs.blocks:
        for name, setting in block.items():
            path = f"{where}.{name}"
            ps = spec.parameter(str(name))
            if ps is None:
                close = difflib.get_close_matches(str(name), spec.parameter_names, n=1)
                takes = f"{spec.name} takes: {', '.join(spec.parameter_names) or 'no parameters'}"
                report.add(WARN, "unknown_parameter", path,
                           f"{spec.name} takes no parameter {name!r}; mergekit 0.1.5 ignores it silently",
                           f"did you mean {close[0]!r}?" if close else takes)
                continue
            for value_path, value in _values(setting, path, report):
                _check_value(ps.name, ps.kind, value, value_path, report)
            given.setdefault(ps.name, set()).update(models or [None])
    for ps in spec.parameters:
        if not ps.required or None in given.get(ps.name, set()):
            continue
        for where, names, group_base, _ in inputs.groups:
            needing = [n for n in names if not (ps.scope == "non_base" and n == group_base)]
            missing = [n for n in needing if n not in given.get(ps.name, set())]
            if missing:
                report.add(ERR, "missing_parameter", f"{where}", f"{spec.name} needs `{ps.name}` for "
                           f"{', '.join(missing)}; mergekit stops on it mid-merge",
                           f"add `parameters: {{{ps.name}: ...}}` to each model or at the top level")
    _check_weights(spec, inputs, report)
    _check_della(spec, inputs, report)


def _values(setting: Any, path: str, report: Report) -> Iterator[tuple[str, Any]]:
    """Every scalar in a setting (scalar, gradient, {filter, value} or a list of those), with its path."""
    if isinstance(setting, dict):
        _unknown_keys(report, setting, ("value", "filter"), path)
        if "value" not in setting:
            report.add(ERR, "invalid_value", path, "a filtered parameter needs a `value`",
                       "write `- {filter: self_attn, value: 0.5}`")
            return
        yield from _values(setting["value"], f"{path}.value", report)
    elif isinstance(setting, list):
        for k, item in enumerate(setting):
            if isinstance(item, list):
                report.add(ERR, "invalid_value", f"{path}[{k}]", "nested lists are not a parameter value",
                           "a gradient is a flat list of numbers")
                continue
            yield from _values(item, f"{path}[{k}]", report)
    else:
        yield path, setting


def _check_value(name: str, kind: type, value: Any, path: str, report: Report) -> None:
    if isinstance(value, str):
        if NUMBER_STRING.match(value.strip()):
            report.add(WARN, "string_number", path,
                       f"{name} is the string {value!r}: YAML 1.1 reads numbers like 1e-3 (no dot before the "
                       "exponent) as text; mergekit 0.1.5 converts it, other tools and older versions do not",
                       f"write {float(value)!r} (e.g. 1.0e-3)")
            value = float(value)
        elif kind is float:
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not a number", "use a number")
            return
    if kind is bool:
        if not isinstance(value, bool):
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not true/false", "true or false")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        if isinstance(value, bool):
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not a number", "use a number")
        return
    if not math.isfinite(value):
        report.add(ERR, "invalid_value", path, f"{name} = {value} is not finite", "use a finite number")
    elif name == "density" and not 0 < value <= 1:
        report.add(ERR, "density_out_of_range", path,
                   f"density {value} is outside (0, 1]: it is the share of each task vector kept (mergekit "
                   "runs anyway, keeping all or nothing)",
                   "use e.g. 0.5 (keep half); 1 keeps everything")
    elif name in ("t", "gamma", "select_topk") and not 0 <= value <= 1:
        report.add(WARN, "out_of_range", path, f"{name} = {value} is outside [0, 1]; mergekit extrapolates",
                   f"use a {name} between 0 and 1")
    elif name == "weight" and value < 0:
        report.add(WARN, "negative_weight", path, f"weight {value} is negative: it subtracts this model",
                   "use a positive weight unless you mean to subtract (task negation)")


def _scalar_weight(setting: Any) -> float | None:
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, str) and NUMBER_STRING.match(setting.strip()):
        return float(setting)
    return None


def _check_weights(spec: MethodSpec, inputs: Inputs, report: Report) -> None:
    if spec.parameter("weight") is None or not inputs.groups:
        return
    where, names, group_base, _ = inputs.groups[0]
    top = next((b for p, b, m in inputs.blocks if m is None and p == "parameters"), {})
    weights: dict[str, float] = {}
    for name in names:
        if spec.parameter("weight").scope == "non_base" and name == group_base:  # type: ignore[union-attr]
            continue
        own = next((b for p, b, m in inputs.blocks if m == [name] and "weight" in b), None)
        setting = own["weight"] if own else top.get("weight")
        value = _scalar_weight(setting)
        if value is None:
            return  # gradients, filters or missing: no single sum to check
        weights[name] = value
    if not weights:
        return
    total = sum(weights.values())
    normalize_spec = spec.parameter("normalize")
    normalize = top.get("normalize", normalize_spec.default if normalize_spec else False) is True
    if all(w == 0 for w in weights.values()):
        report.add(ERR, "weights_sum", f"{where}", "every weight is 0: the merge has nothing to add (and "
                   "normalising divides by zero)", "give at least one model a positive weight")
    elif not normalize and abs(total - 1) > 0.05:
        level = WARN if spec.name == "linear" or total > 1.5 or total < 0.5 else INFO
        effect = ("the merged weights are scaled by it" if spec.name == "linear"
                  else "the summed task vectors are scaled by it")
        report.add(level, "weights_sum", f"{where}", f"the weights sum to {total:g} and normalize is off: "
                   f"{effect}", "make them sum to 1, or set `parameters: {normalize: true}` for ratios")


def _check_della(spec: MethodSpec, inputs: Inputs, report: Report) -> None:
    if spec.parameter("epsilon") is None or spec.parameter("density") is None:
        return
    for where, block, _ in inputs.blocks:
        density, epsilon = _scalar_weight(block.get("density")), _scalar_weight(block.get("epsilon"))
        if density is None or epsilon is None:
            continue
        if density - epsilon <= 0 or density + epsilon > 1:
            report.add(WARN, "epsilon_out_of_range", f"{where}.epsilon",
                       f"density {density} +/- epsilon {epsilon} leaves (0, 1]: DELLA's keep probabilities "
                       "are clipped", "lower epsilon")


# ---- layer counts (need the models) -----------------------------------------------------------------


def check_layer_counts(inputs: Inputs, data: dict[str, Any], counts: dict[str, int], report: Report) -> None:
    for path, name, _start, end in inputs.ranges:
        n = counts.get(name)
        if n is not None and end > n:
            report.add(ERR, "slice_out_of_range", path,
                       f"layer_range ends at {end} but {name} has {n} layers (end is exclusive)",
                       f"end the range at {n} or lower")
    group_layers = _output_layers(inputs, counts)
    if group_layers is None:
        return
    for where, block, _ in inputs.blocks:
        for name, setting in block.items():
            for path, gradient in _gradients(setting, f"{where}.{name}"):
                if len(gradient) > group_layers:
                    report.add(WARN, "gradient_too_long", path,
                               f"the gradient has {len(gradient)} values for {group_layers} layers: mergekit "
                               "interpolates over the layers, so values are skipped",
                               f"give at most {group_layers} values")


def check_compatibility(
    inputs: Inputs, data: dict[str, Any], ckpts: dict[str, Checkpoint], report: Report
) -> None:
    """For a `models:` config whose models could be read: the same header checks as `compare` (architecture,
    shapes, layer counts, vocabularies), so a merge of models that cannot be merged is caught here."""
    if not inputs.groups or inputs.groups[0][3]:
        return
    _, names, base, _ = inputs.groups[0]
    models = [ckpts[n] for n in dict.fromkeys(names) if n != base and n in ckpts]
    base_ckpt = ckpts.get(base) if base else None
    if len(models) == 1 and base_ckpt is not None:  # one fine-tune: check it against its base
        models, base_ckpt = [*models, base_ckpt], None
    if len(models) < 2:
        return
    plan = plan_comparison(models, base_ckpt)
    tokenizer = data.get("tokenizer") is not None or data.get("tokenizer_source") is not None
    for f in plan.findings:
        if f.level is INFO or (tokenizer and f.code == "vocab_mismatch"):
            continue
        report.findings.append(f.model_copy(update={"path": "models"}) if f.code == "vocab_mismatch" else f)


def _output_layers(inputs: Inputs, counts: dict[str, int]) -> int | None:
    if inputs.ranges:
        lengths = [end - start for _, _, start, end in inputs.ranges]
        return max(lengths) if lengths else None
    for _, names, _, _ in inputs.groups:
        known = [counts[n] for n in names if n in counts]
        if known:
            return min(known)
    return None


def _gradients(setting: Any, path: str) -> Iterator[tuple[str, list[Any]]]:
    if isinstance(setting, dict):
        yield from _gradients(setting.get("value"), f"{path}.value")
    elif isinstance(setting, list):
        if setting and all(not isinstance(x, (dict, list)) for x in setting):
            yield path, setting
        else:
            for k, item in enumerate(setting):
                if isinstance(item, dict):
                    yield from _gradients(item, f"{path}[{k}]")


def lookup_for(inputs: Inputs, where: str = "models") -> Lookup:
    """mergekit's precedence: the model's own setting (in `where`: `models` or `slices[i]`), then the
    slice's, then the top level's."""
    def lookup(name: str, model: str | None, tensor: str, t: float, default: Any) -> Any:
        for block in _blocks_in_order(inputs, where, model):
            if name in block:
                value = resolve(block[name], tensor, t)
                if value is not None:
                    return value
        return default

    return lookup


def _blocks_in_order(inputs: Inputs, where: str, model: str | None) -> Iterator[dict[str, Any]]:
    """`parameters` blocks from the highest precedence down: the model's, its slice's, the top level's."""
    prefix = "models[" if where == "models" else f"{where}.sources["
    for path, block, models in inputs.blocks:
        if model is not None and models == [model] and path.startswith(prefix):
            yield block
    for path, block, _ in inputs.blocks:
        if path == f"{where}.parameters":
            yield block
    for path, block, _ in inputs.blocks:
        if path == "parameters":
            yield block


def _jobs(spec: MethodSpec, inputs: Inputs, ckpts: dict[str, Checkpoint]) -> tuple[list[Job], list[str]]:
    """What to simulate: each merged tensor, from a `models:` list or from each slice's layer ranges."""
    _, names, base, sliced = inputs.groups[0]
    if not sliced:
        return model_jobs(spec, names, base, ckpts, lookup_for(inputs))
    slices = []
    for where, _, slice_base, _ in inputs.groups:
        sources = tuple((m, start, end) for path, m, start, end in inputs.ranges
                        if path.startswith(f"{where}."))
        slices.append(SliceSpec(sources, slice_base, lookup_for(inputs, where)))
    return slice_jobs(spec, slices, ckpts)


# ---- the whole diagnosis ----------------------------------------------------------------------------


def diagnose(
    config: str, *, guard: PathGuard | None = None, limits: Limits | None = None,
    progress: Progress | None = None, cancelled: Cancelled | None = None,
) -> ConfigDiagnosis:
    """Check a mergekit YAML (a .yaml path or the text) and simulate it on the models that can be read."""
    text, where = read_config_text(config, guard)
    data = parse_config(text, where)
    report = Report()
    spec, inputs = check_structure(data, report)
    notes: list[str] = []
    names = list(dict.fromkeys(
        [n for _, group, _, _ in inputs.groups for n in group]
        + [b for _, _, b, _ in inputs.groups if b is not None]
    ))
    with ExitStack() as stack:
        ckpts: dict[str, Checkpoint] = {}
        for name in names:
            ckpt = _open(name, guard, limits, report, stack, notes)
            if ckpt is not None:
                ckpts[name] = ckpt
        counts = {n: _layer_count(c) for n, c in ckpts.items()}
        too_big = _over_limit(ckpts, limits)
        check_layer_counts(inputs, data, counts, report)
        check_compatibility(inputs, data, ckpts, report)
        layers: list[LayerInterference] = []
        overall = None
        needed = _simulation_inputs(spec, inputs)
        if spec is None or report.has_errors:
            notes.append("the merge was not simulated: fix the error-level findings first")
        elif spec.name == "passthrough":
            notes.append("passthrough copies tensors: nothing to simulate")
        elif not inputs.groups or "modules" in data:
            notes.append("the merge is simulated for `models:` and `slices:` configs, not `modules:`")
        elif too_big:
            notes.append(f"the merge was not simulated: {too_big}")
        elif not needed or any(n not in ckpts for n in needed):
            notes.append("the merge was not simulated: not every referenced model could be read")
        else:
            jobs, job_notes = _jobs(spec, inputs, ckpts)
            sim = simulate(spec, jobs, ckpts, progress, cancelled)
            layers, overall = sim.layers, sim.overall
            report.findings.extend(sim.findings)
            notes.extend([*job_notes, *sim.notes])
    return ConfigDiagnosis(
        valid=not report.has_errors, merge_method=spec.name if spec else _method_name(data),
        findings=report.findings, overall_interference=overall,
        interference_scores={lm.layer_name: lm.interference for lm in layers}, layers=layers,
        models_checked=list(ckpts), notes=notes,
    )


def _over_limit(ckpts: dict[str, Checkpoint], limits: Limits | None) -> str | None:
    try:
        (limits or Limits()).check_request(sum(c.nbytes for c in ckpts.values()))
    except LimitExceededError as exc:
        return str(exc)
    return None


def _method_name(data: dict[str, Any]) -> str | None:
    method = data.get("merge_method")
    return method if isinstance(method, str) else None


def _simulation_inputs(spec: MethodSpec | None, inputs: Inputs) -> list[str]:
    if spec is None or not inputs.groups:
        return []
    needed = [n for _, names, _, _ in inputs.groups for n in names]
    needed += [base for _, _, base, _ in inputs.groups if base and spec.base != "ignored"]
    return list(dict.fromkeys(needed))


def _open(
    name: str, guard: PathGuard | None, limits: Limits | None, report: Report, stack: ExitStack,
    notes: list[str],
) -> Checkpoint | None:
    try:  # with a guard, containment comes first: nothing is revealed about paths outside the roots
        exists = guard.check(name, name).exists() if guard else Path(name).expanduser().exists()
    except PathNotAllowedError as exc:
        if looks_like_hub_id(name):
            exists = False
        else:
            report.add(WARN, "model_unreadable", None, f"{name} could not be read: {exc}",
                       "the structural checks still apply; fix the path to simulate the merge")
            return None
    except (CheckpointNotFoundError, OSError):
        exists = False
    if not exists:
        notes.append(f"{name}: not a local path; Hub models are not downloaded for a diagnosis")
        return None
    try:
        return stack.enter_context(load_checkpoint(name, name, guard=guard, limits=limits))
    except MergeLensError as exc:
        report.add(WARN, "model_unreadable", None, f"{name} could not be read: {exc}",
                   "the structural checks still apply; fix the path to simulate the merge")
        return None


def _layer_count(ckpt: Checkpoint) -> int:
    layers = (ckpt.config or {}).get("num_hidden_layers")
    return int(layers) if isinstance(layers, int) and not isinstance(layers, bool) else block_count(ckpt)
