"""The mergekit 0.1.5 rulebook: the table of merge methods, the pydantic mirror of the configuration schema,
and the rules a configuration must follow, each declared once and used both ways.

Written from mergekit's documentation and observed behaviour, not copied from it. Where mergekit is lenient
(unknown keys dropped, parameter names checked only after the models are downloaded), we are strict.

One rulebook, two uses: `check_structure` walks a raw YAML mapping and collects every rule it breaks as a
`Finding` (severity, YAML path, fix); `diagnose.py` reports them for a user's YAML, and `MergeConfig` runs the
same walk before its shape validation and refuses what is above `INFO`, so the YAML we emit (`recommend.py`)
is held to exactly the rules a user's is. What the rules read is declared here: `METHODS` (base policy, input
counts, parameters with their kind and scope), `BOUNDS` (a parameter's sound range, by name), the models' fields
(the known keys), `DTYPES`, and mergekit's numeric constants (`SLERP_LINEAR_FALLBACK`, `NUMBER_STRING`).

Configuration shape (`mergekit-yaml` input)::

    merge_method: ties                   # one of METHODS
    base_model: org/base                 # "path[@revision][+lora]" or {model: ..., lora: ...}
    models:                              # either `models` ...
      - model: org/ft-a
        parameters: {weight: 0.5, density: 0.6}
    slices:                              # ... or `slices` (or `modules`), exactly one of them
      - sources:
          - {model: org/ft-a, layer_range: [0, 16]}   # layer_range is [start, end), end exclusive
    parameters:                          # shared by every model / slice, lowest precedence
      t: [0.0, 0.5, 1.0]                 # a gradient: interpolated over the layers of a slice
      density:                           # a filtered list: first matching filter (substring of the tensor
        - {filter: self_attn, value: 0.5}  # name) wins; no filter = fallback
        - {value: 0.7}
    dtype: bfloat16
    tokenizer_source: union              # or `tokenizer: {source: union}`, never both
    chat_template: auto

Parameter scopes: `shared` parameters take one value for the whole merge (set at top or slice level),
`input` parameters one per input model (base included), `non_base` one per model other than the base.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from ..models import Finding, FindingLevel

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64")
BasePolicy = Literal["required", "optional", "ignored"]
Scope = Literal["shared", "input", "non_base"]
ERR, WARN, INFO = FindingLevel.ERROR, FindingLevel.WARNING, FindingLevel.INFO
REFUSED_IN_OURS = (ERR, WARN)  # what `MergeConfig` refuses in the YAML we emit; INFO findings are remarks
# YAML 1.1 reads `1e-3` (no dot before the exponent) as a string; mergekit 0.1.5 converts such strings
NUMBER_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# mergekit 0.1.5's SLERP interpolates linearly where |cos| of the two tensors is above this; it decides once
# per tensor, over the whole tensor flattened (not per output row: running mergekit showed it, see methods.py)
SLERP_LINEAR_FALLBACK = 0.9995
# the sparsifications that draw random masks (seeded by `mergekit-yaml --random-seed`)
RANDOM_SPARSIFICATIONS = ("random", "della")


@dataclass(frozen=True)
class Bounds:
    """A numeric parameter's sound range, and the finding a value outside it gives. `message` and `fix` are
    formatted with the parameter's `name` and the `value`."""

    low: float
    high: float
    level: FindingLevel
    code: str
    message: str
    fix: str
    low_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


def _unit(name: str) -> tuple[str, Bounds]:
    return name, Bounds(0.0, 1.0, WARN, "out_of_range", "{name} = {value} is outside [0, 1]; mergekit extrapolates",
                        "use a {name} between 0 and 1")


BOUNDS: dict[str, Bounds] = {
    "density": Bounds(
        0.0, 1.0, ERR, "density_out_of_range",
        "density {value} is outside (0, 1]: it is the share of each task vector kept (mergekit runs anyway, "
        "keeping all or nothing)", "use e.g. 0.5 (keep half); 1 keeps everything", low_open=True,
    ),
    **dict(map(_unit, ("t", "gamma", "select_topk"))),
    "weight": Bounds(0.0, math.inf, WARN, "negative_weight", "weight {value} is negative: it subtracts this model",
                     "use a positive weight unless you mean to subtract (task negation)"),
}


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: type  # float or bool
    scope: Scope
    default: Any = None
    required: bool = False

    @property
    def bounds(self) -> Bounds | None:
        """The sound range of this parameter (declared once per name in `BOUNDS`), if it has one."""
        return BOUNDS.get(self.name)

    @property
    def per_model(self) -> bool:
        """One value per model (`input` or `non_base` scope) rather than one for the whole merge."""
        return self.scope != "shared"


@dataclass(frozen=True)
class MethodSpec:
    """What one mergekit merge method takes: its base policy, how many inputs, which parameters."""

    name: str
    base: BasePolicy
    min_inputs: int = 1  # inputs include the base model where it is one
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    parameters: tuple[ParameterSpec, ...] = ()
    sign_consensus: bool = False
    sparsification: str | None = None  # 'magnitude', 'random', 'magnitude_outliers', 'della'
    summary: str = ""
    count_fix: str | None = None  # how to fix a wrong number of models, where the general advice is unclear

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def random(self) -> bool:
        """Whether the method draws random masks (its result depends on the seed)."""
        return self.sparsification in RANDOM_SPARSIFICATIONS

    @property
    def min_models(self) -> int:
        """The fewest models besides the base (at least one), from the input counts."""
        counted = 1 if self.base == "required" else 0
        return max(1, self.min_inputs - counted, self.min_non_base or 0)

    @property
    def max_models(self) -> int | None:
        """The most models besides the base (None: no limit), from the input counts."""
        counted = 1 if self.base == "required" else 0
        limits = [n for n in (None if self.max_inputs is None else self.max_inputs - counted, self.max_non_base)
                  if n is not None]
        return min(limits) if limits else None

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)


def _task_parameters(
    normalize: bool, rescale: bool, extra: tuple[ParameterSpec, ...] = ()
) -> tuple[ParameterSpec, ...]:
    return (
        ParameterSpec("weight", float, "non_base", required=True),
        ParameterSpec("density", float, "non_base", default=1.0),
        *extra,
        ParameterSpec("lambda", float, "shared", default=1.0),
        ParameterSpec("normalize", bool, "shared", default=normalize),
        ParameterSpec("rescale", bool, "shared", default=rescale),
        ParameterSpec("int8_mask", bool, "shared", default=False),
    )


GAMMA = ParameterSpec("gamma", float, "non_base", default=0.01)
EPSILON = ParameterSpec("epsilon", float, "non_base", default=0.15)

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("linear", "ignored", parameters=(
        ParameterSpec("weight", float, "input", required=True),
        ParameterSpec("normalize", bool, "shared", default=True),
    ), summary="weighted average of the weights"),
    MethodSpec("slerp", "required", min_inputs=2, max_inputs=2, parameters=(
        ParameterSpec("t", float, "shared", required=True),
    ), summary="spherical interpolation from base_model (t=0) to the other model (t=1)",
        count_fix="list exactly two models and set base_model to one of them"),
    MethodSpec("nuslerp", "optional", min_non_base=2, max_non_base=2, parameters=(
        ParameterSpec("weight", float, "non_base", required=True),
        ParameterSpec("nuslerp_row_wise", bool, "shared", default=False),
        ParameterSpec("nuslerp_flatten", bool, "shared", default=True),
    ), summary="slerp of two models, or of their task vectors when a base is given"),
    MethodSpec("multislerp", "optional", min_non_base=1, parameters=(
        ParameterSpec("weight", float, "non_base", required=True),
        ParameterSpec("normalize_weights", bool, "shared", default=True),
        ParameterSpec("eps", float, "shared", default=1e-8),
    ), summary="barycentric interpolation on the hypersphere"),
    MethodSpec("karcher", "ignored", parameters=(
        ParameterSpec("max_iter", float, "shared", default=10),
        ParameterSpec("tol", float, "shared", default=1e-5),
    ), summary="Riemannian (Karcher) mean of the weights"),
    MethodSpec("task_arithmetic", "required", parameters=_task_parameters(False, False),
               summary="base + weighted sum of task vectors"),
    MethodSpec("ties", "required", parameters=_task_parameters(True, False), sign_consensus=True,
               sparsification="magnitude", summary="magnitude trimming + sign election"),
    MethodSpec("dare_ties", "required", parameters=_task_parameters(False, True), sign_consensus=True,
               sparsification="random", summary="random drop-and-rescale + sign election"),
    MethodSpec("dare_linear", "required", parameters=_task_parameters(False, True), sparsification="random",
               summary="random drop-and-rescale, summed"),
    MethodSpec("breadcrumbs", "required", parameters=_task_parameters(False, False, (GAMMA,)),
               sparsification="magnitude_outliers", summary="drop the largest and smallest changes, summed"),
    MethodSpec("breadcrumbs_ties", "required", parameters=_task_parameters(False, False, (GAMMA,)),
               sign_consensus=True, sparsification="magnitude_outliers",
               summary="drop the largest and smallest changes + sign election"),
    MethodSpec("della", "required", parameters=_task_parameters(True, True, (EPSILON,)), sign_consensus=True,
               sparsification="della", summary="magnitude-ranked random drop + sign election"),
    MethodSpec("della_linear", "required", parameters=_task_parameters(False, True, (EPSILON,)),
               sparsification="della", summary="magnitude-ranked random drop, summed"),
    MethodSpec("sce", "required", parameters=(
        ParameterSpec("select_topk", float, "shared", default=1.0),
        ParameterSpec("int8_mask", bool, "shared", default=False),
    ), sign_consensus=True, summary="variance selection, matrix-level weights, sign election"),
    MethodSpec("model_stock", "required", min_inputs=3, parameters=(
        ParameterSpec("filter_wise", bool, "shared", default=False),
    ), summary="interpolation towards the fine-tunes' mean, weight from their task-vector angles"),
    MethodSpec("nearswap", "required", min_inputs=2, max_inputs=2, parameters=(
        ParameterSpec("t", float, "shared", required=True),
    ), summary="take the other model's values where they are already close to the base"),
    MethodSpec("arcee_fusion", "required", min_inputs=2, max_inputs=2,
               summary="fuse the most salient differences of two models"),
    MethodSpec("passthrough", "ignored", max_inputs=1, parameters=(
        ParameterSpec("scale", float, "input"),
    ), summary="copy tensors from one model (layer stacking with slices)"),
    MethodSpec("ram", "required", parameters=(ParameterSpec("epsilon", float, "shared", default=1e-5),),
               summary="reinforced agent merging"),
    MethodSpec("ramplus_tl", "required", parameters=(
        ParameterSpec("r", float, "shared", default=0.1),
        ParameterSpec("alpha", float, "shared", default=0.2),
        ParameterSpec("epsilon", float, "shared", default=1e-5),
    ), summary="reinforced agent merging with layer-wise scaling"),
)}


def describe_count(spec: MethodSpec) -> str:
    """How many inputs a method takes, in words."""
    if spec.max_inputs == spec.min_inputs:
        return f"exactly {spec.min_inputs}"
    if spec.max_inputs is None:
        return f"at least {spec.min_inputs}"
    return f"{spec.min_inputs} to {spec.max_inputs}"


def method_spec(name: str) -> MethodSpec:
    """The spec of a merge method; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown merge_method {name!r}; mergekit 0.1.5 knows {known}") from None


# ---- the configuration models: the shape (what each key holds) ------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(Strict):
    """One entry of a filtered list: `value` applies to tensors whose name contains `filter` (None: all)."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient
Parameters = dict[str, ParameterSetting]


class ModelPath(Strict):
    path: str
    revision: str | None = None


class ModelReference(Strict):
    """A model: "path", "path@revision" or "path+lora" as a string, or this mapping."""

    model: str | ModelPath
    lora: str | ModelPath | None = None
    override_architecture: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("a model reference is an empty string")
            if value.count("@") > 1 or value.count("+") > 1:
                raise ValueError(f"model reference {value!r} has more than one '@' or '+'")
            model, _, lora = value.partition("+")
            return {"model": model, "lora": lora or None}
        return value

    @property
    def key(self) -> str:
        """The path or id, with its revision, as mergekit names the model."""
        ref = self.model if isinstance(self.model, str) else (
            self.model.path + (f"@{self.model.revision}" if self.model.revision else "")
        )
        return ref


def reference_key(value: Any) -> str | None:
    """`ModelReference.key` of a raw YAML value, or None where the value is not a model reference."""
    try:
        return ModelReference.model_validate(value).key
    except ValidationError:
        return None


class InputModel(Strict):
    model: ModelReference
    parameters: Parameters | None = None


class InputSlice(Strict):
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(Strict):
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None


class TokenizerConfig(Strict):
    source: ModelReference | Literal["union", "base"] = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(Strict):
    """A mergekit 0.1.5 configuration: the rulebook's `check_structure` first (anything above INFO is
    refused), then the shape."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: ModelReference | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Literal["union", "base"] | ModelReference | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _follows_the_rules(cls, data: Any) -> Any:
        if isinstance(data, dict):
            report = Report()  # the rules read plain YAML data: models given as objects are dumped first
            check_structure(to_jsonable_python(data, exclude_none=True), report)
            refused = [f for f in report.findings if f.level in REFUSED_IN_OURS]
            if refused:
                raise ValueError("; ".join(
                    f"{f.code} at {f.path or 'the top level'}: {f.message}" + (f" (fix: {f.fix})" if f.fix else "")
                    for f in refused
                ))
        return data


TOP_LEVEL_KEYS = tuple(MergeConfig.model_fields)
MODEL_KEYS = tuple(InputModel.model_fields)
SLICE_KEYS = tuple(OutputSlice.model_fields)
SOURCE_KEYS = tuple(InputSlice.model_fields)
MODULE_KEYS = tuple(OutputModule.model_fields)
TOKENIZER_KEYS = tuple(TokenizerConfig.model_fields)
FILTER_KEYS = tuple(ConditionalParameter.model_fields)


# ---- the rules: one walk over a raw YAML mapping, every broken rule a finding ------------------------


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


@dataclass
class Inputs:
    """Where each model appears, and each `parameters` block with the models it applies to."""

    # (path, models, base, is a slice)
    groups: list[tuple[str, list[str], str | None, bool]] = field(default_factory=list)
    # (path, block, the models it applies to: None = all)
    blocks: list[tuple[str, dict[str, Any], list[str] | None]] = field(default_factory=list)
    # (path, model, start, end)
    ranges: list[tuple[str, str, int, int]] = field(default_factory=list)


def _unknown_keys(report: Report, mapping: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        report.add(WARN, "unknown_key", f"{where}.{key}" if where else str(key),
                   f"unknown key {key!r}{f' in {where}' if where else ''}: mergekit ignores it silently",
                   f"did you mean {close[0]!r}?" if close else f"remove it; known keys: {', '.join(known)}")


def _entry_key(entry: Any) -> str | None:
    """The model of a `- model: ...` entry (of `models` or a slice's `sources`)."""
    return reference_key(entry.get("model")) if isinstance(entry, dict) else None


def check_structure(data: dict[str, Any], report: Report) -> tuple[MethodSpec | None, Inputs]:
    """Every rule that needs no model file, over a parsed YAML mapping: findings go to `report`; returns the
    method's spec (None when unknown) and where the models and parameters are."""
    _unknown_keys(report, data, TOP_LEVEL_KEYS, "")
    spec = _check_method(data, report)
    inputs = Inputs()
    present = _check_one_input_kind(data, "", report)
    base = reference_key(data.get("base_model")) if data.get("base_model") is not None else None
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
        _check_modules(data["modules"], report)
    _check_tokenizer(data, report)
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and str(value).removeprefix("torch.") not in DTYPES:
            report.add(ERR, "unknown_dtype", key, f"{key} {value!r} is not a dtype mergekit knows",
                       f"use one of {', '.join(DTYPES[:3])}")
    checked = spec or closest_method(data)  # a misspelt method still gets its parameters checked
    if checked is not None:
        _check_inputs(checked, inputs, report)
        _check_parameters(checked, inputs, report)
    return spec, inputs


def _check_one_input_kind(data: dict[str, Any], where: str, report: Report) -> list[str]:
    """Exactly one of `models`, `slices` (or, at the top level, `modules`); the ones given."""
    kinds = ("models", "slices", "modules") if not where else ("models", "slices")
    present = [k for k in kinds if data.get(k)]
    prefix = f"{where}." if where else ""
    if len(present) > 1:
        report.add(ERR, "models_and_slices", prefix + present[1],
                   f"the config has both {' and '.join(present)}" + (f" in {where}" if where else ""),
                   "keep one: `models` merges whole models, `slices` picks layer ranges")
    elif not present:
        report.add(ERR, "no_models", prefix + "models",
                   "the config lists no models (`models`, `slices` or `modules`)" if not where
                   else f"{where} lists no models (`models` or `slices`)",
                   "add `models:` with one `- model: path-or-hub-id` entry per model")
    return present


def _check_modules(modules: Any, report: Report) -> None:
    if not isinstance(modules, dict):
        report.add(ERR, "invalid_modules", "modules", "`modules` must be a mapping of name: module",
                   "write `modules: {text: {models: [...]}}`")
        return
    for name, module in modules.items():
        where = f"modules.{name}"
        if not isinstance(module, dict):
            report.add(ERR, "invalid_modules", where, f"{where} is not a mapping",
                       "give the module `models:` or `slices:`")
            continue
        _unknown_keys(report, module, MODULE_KEYS, where)
        _check_one_input_kind(module, where, report)


def _check_method(data: dict[str, Any], report: Report) -> MethodSpec | None:
    method = data.get("merge_method")
    if method is None:
        report.add(ERR, "missing_method", "merge_method", "the config has no merge_method",
                   "add e.g. `merge_method: ties` (see `mergelens` strategy for a recommendation)")
        return None
    if not isinstance(method, str) or method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        assumed = f"; the rest of the config is checked against {close[0]}'s parameters" if close else ""
        report.add(ERR, "unknown_method", "merge_method",
                   f"merge_method {method!r} is not a mergekit method{assumed}",
                   f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(sorted(METHODS))}")
        return None
    return METHODS[method]


def closest_method(data: dict[str, Any]) -> MethodSpec | None:
    """The known method closest to an unknown `merge_method` (a typo like 'tie'), to check the rest against."""
    method = data.get("merge_method")
    close = difflib.get_close_matches(str(method), list(METHODS), n=1) if method is not None else []
    return METHODS[close[0]] if close else None


def _check_models(models: Any, base: str | None, report: Report, inputs: Inputs) -> None:
    if not isinstance(models, list):
        report.add(ERR, "invalid_models", "models", "`models` must be a list of `- model: ...` entries",
                   "write each model as `- model: org/name`")
        return
    names = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        name = _entry_key(entry)
        if name is None:
            report.add(ERR, "invalid_model", where, f"{where} is not a `model: ...` mapping",
                       "write `- model: org/name` (optionally with `parameters:`)")
            continue
        _unknown_keys(report, entry, MODEL_KEYS, where)
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
        slice_base = reference_key(s["base_model"]) if s.get("base_model") else base
        names, lengths = [], set()
        for j, src in enumerate(s["sources"]):
            src_where = f"{where}.sources[{j}]"
            name = _entry_key(src)
            if name is None:
                report.add(ERR, "invalid_model", src_where, f"{src_where} is not a `model: ...` mapping",
                           "write `{model: org/name, layer_range: [start, end]}`")
                continue
            _unknown_keys(report, src, SOURCE_KEYS, src_where)
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


def _check_inputs(spec: MethodSpec, inputs: Inputs, report: Report) -> None:
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
            fix = spec.count_fix or f"give {spec.name} {describe_count(spec)} models (the base counts)"
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
                _check_value(ps, value, value_path, report)
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
        _unknown_keys(report, setting, FILTER_KEYS, path)
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


def _check_value(ps: ParameterSpec, value: Any, path: str, report: Report) -> None:
    name = ps.name
    if isinstance(value, str):
        if NUMBER_STRING.match(value.strip()):
            report.add(WARN, "string_number", path,
                       f"{name} is the string {value!r}: YAML 1.1 reads numbers like 1e-3 (no dot before the "
                       "exponent) as text; mergekit 0.1.5 converts it, other tools and older versions do not",
                       f"write {float(value)!r} (e.g. 1.0e-3)")
            value = float(value)
        elif ps.kind is float:
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not a number", "use a number")
            return
    if ps.kind is bool:
        if not isinstance(value, bool):
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not true/false", "true or false")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        if isinstance(value, bool):
            report.add(ERR, "invalid_value", path, f"{name} = {value!r} is not a number", "use a number")
        return
    bounds = ps.bounds
    if not math.isfinite(value):
        report.add(ERR, "invalid_value", path, f"{name} = {value} is not finite", "use a finite number")
    elif bounds is not None and not bounds.contains(value):
        report.add(bounds.level, bounds.code, path, bounds.message.format(name=name, value=value),
                   bounds.fix.format(name=name, value=value))


def scalar_setting(setting: Any) -> float | None:
    """A setting's single number (a number, or a string mergekit reads as one); None for anything else."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, str) and NUMBER_STRING.match(setting.strip()):
        return float(setting)
    return None


def _check_weights(spec: MethodSpec, inputs: Inputs, report: Report) -> None:
    weight = spec.parameter("weight")
    if weight is None or not inputs.groups:
        return
    where, names, group_base, _ = inputs.groups[0]
    top = next((b for p, b, m in inputs.blocks if m is None and p == "parameters"), {})
    weights: dict[str, float] = {}
    for name in names:
        if weight.scope == "non_base" and name == group_base:
            continue
        own = next((b for p, b, m in inputs.blocks if m == [name] and "weight" in b), None)
        setting = own["weight"] if own else top.get("weight")
        value = scalar_setting(setting)
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
        density, epsilon = scalar_setting(block.get("density")), scalar_setting(block.get("epsilon"))
        if density is None or epsilon is None:
            continue
        if density - epsilon <= 0 or density + epsilon > 1:
            report.add(WARN, "epsilon_out_of_range", f"{where}.epsilon",
                       f"density {density} +/- epsilon {epsilon} leaves (0, 1]: DELLA's keep probabilities "
                       "are clipped", "lower epsilon")
