"""Diagnosis of a user's mergekit YAML: what mergekit would silently accept or fail on only after downloading
(the rulebook's `schema.check_structure`, the same rules our own YAML is held to), what needs the models (layer
counts, shapes), then, where the referenced models can be read, the configured merge simulated per layer
(`simulate.py`).

Findings are collected, not raised, so one pass reports everything; only YAML that cannot be parsed at all
raises `ConfigError`. Each finding has a severity, the YAML path (`models[1].parameters.density`) and a fix.
Model references go through the same loader and path guard as `compare`; Hub ids are not downloaded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from ..analysis.adapters import adapter_findings
from ..analysis.compat import block_count, plan_comparison
from ..analysis.loading import Checkpoint, load_checkpoint
from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    LimitExceededError,
    MergeLensError,
    PathNotAllowedError,
)
from ..models import ConfigDiagnosis, LayerInterference
from ..security.limits import Limits
from ..security.paths import PathGuard, looks_like_hub_id, read_text_file
from .schema import ERR, INFO, WARN, Inputs, MethodSpec, Report, check_structure
from .simulate import (
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
    # the guarded open, as for checkpoint files: a regular file only (no FIFO or device, no link swapped in
    # after the check), and never more than the cap read
    return read_text_file(path, "config", MAX_CONFIG_BYTES, "a mergekit config is a few KiB", ConfigError), str(path)


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


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader whose scalars that cannot be built (`2001-02-30`, `!!int abc`, a 5000-digit integer) fail
    with the line they are on, like any other YAML error, instead of a bare ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            shown = value if len(value) <= 40 else value[:37] + "..."
            problem = f"{shown!r} cannot be read as {node.tag.rsplit(':', 1)[-1]} ({str(exc)[:120]})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def parse_config(text: str, where: str = "config") -> dict[str, Any]:
    """yaml.safe_load, with errors that name the line and the fix."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
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


# ---- layer counts (need the models) -----------------------------------------------------------------


def check_layer_counts(inputs: Inputs, counts: dict[str, int], report: Report) -> None:
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


def config_jobs(spec: MethodSpec, inputs: Inputs, ckpts: dict[str, Checkpoint]) -> tuple[list[Job], list[str]]:
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


HIGH_INTERFERENCE = 0.5  # above this share of the models' changes lost, the diagnosis warns


def diagnose(
    config: str, *, guard: PathGuard | None = None, limits: Limits | None = None,
    progress: Progress | None = None, cancelled: Cancelled | None = None, base: str | None = None,
) -> ConfigDiagnosis:
    """Check a mergekit YAML (a .yaml path or the text) and simulate it on the models that can be read.

    `base` is a hint: the common base of the models, for a config that names none (a linear or SLERP merge):
    the simulation then measures how much of the fine-tunes' changes cancel, which it cannot see without it.
    """
    text, where = read_config_text(config, guard)
    data = parse_config(text, where)
    report = Report()
    spec, inputs = check_structure(data, report)
    notes: list[str] = []
    if base and spec is not None and spec.name != "slerp":
        inputs.groups = [(path, group, b or base, sliced) for path, group, b, sliced in inputs.groups]
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
        check_layer_counts(inputs, counts, report)
        check_compatibility(inputs, data, ckpts, report)
        adapter_checks(ckpts, report)
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
            jobs, job_notes = config_jobs(spec, inputs, ckpts)
            sim = simulate(spec, jobs, ckpts, progress, cancelled)
            layers, overall = sim.layers, sim.overall
            report.findings.extend(sim.findings)
            notes.extend(job_notes)
            _interference_findings(spec, inputs, layers, overall, report)
    return ConfigDiagnosis(
        valid=not report.has_errors, merge_method=spec.name if spec else _method_name(data),
        findings=report.findings, overall_interference=overall,
        interference_scores={lm.layer_name: lm.interference for lm in layers}, layers=layers,
        models_checked=list(ckpts), notes=notes,
    )


def _interference_findings(
    spec: MethodSpec, inputs: Inputs, layers: list[LayerInterference], overall: float | None, report: Report
) -> None:
    """A warning above HIGH_INTERFERENCE; without a base, what the simulation could not measure."""
    if overall is not None and overall > HIGH_INTERFERENCE:
        worst = sorted(layers, key=lambda lm: -lm.interference)[:3]
        report.add(WARN, "high_interference", None,
                   f"the merge would cancel or discard {overall:.0%} of the models' changes (warned above "
                   f"{HIGH_INTERFERENCE:.0%}), most in {', '.join(lm.layer_name for lm in worst)}: the models "
                   "undo each other there",
                   "keep one model, or take the worst layers from one model (a weight gradient of 0/1); "
                   "compare_models with the base shows where the fine-tunes conflict")
    if spec.name != "passthrough" and all(b is None for _, _, b, _ in inputs.groups):
        report.add(INFO, "no_base_for_cancellation", "base_model",
                   "no base model: the simulation measures how the weights average, not whether the fine-tunes' "
                   "changes cancel (that needs their task vectors, against the base)",
                   "pass the common base (diagnose_merge's base_model, or base_model in the YAML) to measure it")


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
        exists = _exists(name, guard)
    except _AdapterMissing as exc:
        report.add(WARN, "adapter_missing", None, f"{name}: the LoRA adapter {exc} does not exist",
                   "fix the adapter's path (mergekit's `base+adapter` names a base and a PEFT adapter folder)")
        return None
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


class _AdapterMissing(Exception):
    pass


def _exists(name: str, guard: PathGuard | None) -> bool:
    """Whether the model `name` is local; for mergekit's `base+adapter`, both parts (an _AdapterMissing when the
    base is local and the adapter is no path nor Hub id)."""
    def local(path: str) -> bool:
        return guard.check(path, name).exists() if guard else Path(path).expanduser().exists()

    if "+" not in name or local(name):
        return local(name)
    base, adapter = name.rsplit("+", 1)
    if not local(base):
        return False
    try:
        found = local(adapter)
    except CheckpointNotFoundError:
        found = False
    if not found and not looks_like_hub_id(adapter):
        raise _AdapterMissing(adapter)
    return found


def adapter_checks(ckpts: dict[str, Checkpoint], report: Report) -> None:
    """The LoRA adapters among the models: different bases, targets and ranks, DoRA (analysis/adapters.py)."""
    models = list(ckpts.values())
    for found in adapter_findings(models, None):
        report.add(found.level, found.code, None, found.message, found.fix)


def _layer_count(ckpt: Checkpoint) -> int:
    layers = (ckpt.config or {}).get("num_hidden_layers")
    return int(layers) if isinstance(layers, int) and not isinstance(layers, bool) else block_count(ckpt)
