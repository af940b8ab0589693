"""Our own pydantic mirror of the mergekit 0.1.5 merge-configuration schema, and its table of merge methods.

Written from mergekit's documentation and observed behaviour, not copied from it. Where mergekit is lenient
(unknown keys dropped, parameter names checked only after the models are downloaded), the mirror is strict:
it refuses what mergekit would ignore or fail on late.

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

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64")
BasePolicy = Literal["required", "optional", "ignored"]
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: type  # float or bool
    scope: Scope
    default: Any = None
    required: bool = False


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

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

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
    ), summary="spherical interpolation from base_model (t=0) to the other model (t=1)"),
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


# ---- the configuration models ---------------------------------------------------------------------


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


class InputModel(Strict):
    model: ModelReference
    parameters: Parameters | None = None


class InputSlice(Strict):
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end < start:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start <= end")
        return value


class OutputSlice(Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelReference | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                f"the sources of one slice must span the same number of layers, not {sorted(lengths)}"
            )
        return self


class OutputModule(Strict):
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_kind(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module needs exactly one of `models` or `slices`")
        return self


class TokenizerConfig(Strict):
    source: ModelReference | Literal["union", "base"] = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(Strict):
    """A mergekit 0.1.5 configuration, checked against the method table as well as the shape."""

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

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of `models`, `slices` or `modules` must be given, not {given or 'none'}"
            )
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either `tokenizer` or `tokenizer_source`, not both")
        spec = method_spec(self.merge_method)
        for where, params in self.parameter_blocks():
            unknown = sorted(set(params) - set(spec.parameter_names))
            if unknown:
                raise ValueError(
                    f"{where}: {spec.name} takes no parameter {', '.join(unknown)} "
                    f"(it takes {', '.join(spec.parameter_names) or 'none'})"
                )
        missing = missing_required(self, spec)
        if missing:
            raise ValueError(f"{spec.name} needs {missing[0][1]!r} for {missing[0][0]}")
        for group, group_base, sliced in self.input_groups():
            keys = {m.key for m in group}
            base = group_base.key if group_base and spec.base != "ignored" else None
            if spec.needs_base and base is None:
                raise ValueError(f"{spec.name} needs a base_model")
            if sliced and base is not None and base not in keys:
                raise ValueError(
                    f"the base model {base!r} must be one of the sources of every slice for {spec.name}"
                )
            count = len(keys | ({base} if base else set()))
            if count < spec.min_inputs or (spec.max_inputs is not None and count > spec.max_inputs):
                wanted = describe_count(spec)
                raise ValueError(f"{spec.name} takes {wanted} input models (base included), not {count}")
            non_base = len(keys - {base})
            if (spec.min_non_base is not None and non_base < spec.min_non_base) or (
                spec.max_non_base is not None and non_base > spec.max_non_base
            ):
                raise ValueError(f"{spec.name} takes {spec.min_non_base}-{spec.max_non_base} non-base models")
        return self

    def parameter_blocks(self) -> list[tuple[str, Parameters]]:
        """Every `parameters` mapping in the config, with its YAML path."""
        blocks: list[tuple[str, Parameters]] = []
        if self.parameters:
            blocks.append(("parameters", self.parameters))
        for i, m in enumerate(self.models or []):
            if m.parameters:
                blocks.append((f"models[{i}].parameters", m.parameters))
        for i, s in enumerate(self.slices or []):
            if s.parameters:
                blocks.append((f"slices[{i}].parameters", s.parameters))
            for j, src in enumerate(s.sources):
                if src.parameters:
                    blocks.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
        return blocks

    def input_groups(self) -> list[tuple[list[ModelReference], ModelReference | None, bool]]:
        """The inputs of each merge group (all models, or each slice's sources), that group's base, and
        whether it is a slice (mergekit adds the base to a `models` list itself, not to a slice's sources)."""
        if self.models:
            return [([m.model for m in self.models], self.base_model, False)]
        slices = list(self.slices or [])
        groups = []
        for module in (self.modules or {}).values():
            if module.models:
                groups.append(([m.model for m in module.models], self.base_model, False))
            slices.extend(module.slices or [])
        groups.extend(
            ([src.model for src in s.sources], s.base_model or self.base_model, True) for s in slices
        )
        return groups


def missing_required(config: MergeConfig, spec: MethodSpec) -> list[tuple[str, str]]:
    """(YAML path, parameter) for each input that no `parameters` block gives a required parameter."""
    missing: list[tuple[str, str]] = []
    base = config.base_model.key if config.base_model else None
    for p in spec.parameters:
        if not p.required or (config.parameters and p.name in config.parameters):
            continue
        for i, m in enumerate(config.models or []):
            skip = p.scope == "non_base" and m.model.key == base
            if not skip and not (m.parameters and p.name in m.parameters):
                missing.append((f"models[{i}]", p.name))
        for i, s in enumerate(config.slices or []):
            if s.parameters and p.name in s.parameters:
                continue
            slice_ref = s.base_model or config.base_model
            slice_base = slice_ref.key if slice_ref else None
            for j, src in enumerate(s.sources):
                skip = p.scope == "non_base" and src.model.key == slice_base
                if not skip and not (src.parameters and p.name in src.parameters):
                    missing.append((f"slices[{i}].sources[{j}]", p.name))
    return missing


TOP_LEVEL_KEYS = tuple(MergeConfig.model_fields)
MODEL_KEYS = tuple(InputModel.model_fields)
SLICE_KEYS = tuple(OutputSlice.model_fields)
SOURCE_KEYS = tuple(InputSlice.model_fields)
TOKENIZER_KEYS = tuple(TokenizerConfig.model_fields)
