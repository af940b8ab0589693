"""Compatibility findings, from configs and headers alone, before any metric is computed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import Finding, FindingLevel
from .layers import classify
from .loading import Checkpoint

STRUCTURAL_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
)
SOFT_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")
MIN_SHARED_FRACTION = 0.5
HEAD_ARCHITECTURES = ("CausalLM", "LMHead", "MaskedLM", "ConditionalGeneration")
TOKENIZER_FIX = (
    "mergekit needs a tokenizer section to merge different vocabularies, e.g. `tokenizer: {source: union}` "
    "(or `tokenizer_source: union`); only the shared rows are compared here"
)


@dataclass
class Plan:
    """What can be compared: the shared tensors, how many rows of each, and why not, if not."""

    tensors: list[str] = field(default_factory=list)
    row_limits: dict[str, int] = field(default_factory=dict)
    base_tensors: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    n_blocks: int = 0

    def add(
        self, level: FindingLevel, code: str, message: str, fix: str | None = None, path: str | None = None
    ) -> None:
        self.findings.append(Finding(level=level, code=code, message=message, fix=fix, path=path))
        if level is FindingLevel.ERROR:
            self.fatal.append(message)


def block_count(ckpt: Checkpoint) -> int:
    indices = {classify(n).layer_index for n in ckpt.tensors}
    indices.discard(None)
    return max(indices) + 1 if indices else 0  # type: ignore[type-var]


def plan_comparison(models: list[Checkpoint], base: Checkpoint | None) -> Plan:
    plan = Plan()
    reference = models[0]
    for other in models[1:]:
        _compare_configs(plan, reference, other, fatal=True)
        _compare_block_counts(plan, reference, other)
    for m in models:
        if m.config is None:
            plan.add(
                FindingLevel.INFO, "no_config",
                f"{m.label} has no config.json; architecture checks use tensor names and shapes only",
            )
    _shared_tensors(plan, models)
    _tied_embeddings(plan, models)
    plan.n_blocks = block_count(reference)
    if base is not None and not plan.fatal:
        _plan_base(plan, reference, base)
    return plan


def _compare_configs(plan: Plan, a: Checkpoint, b: Checkpoint, *, fatal: bool) -> None:
    if not a.config or not b.config:
        return
    level = FindingLevel.ERROR if fatal else FindingLevel.WARNING
    if a.architecture and b.architecture and a.architecture != b.architecture:
        plan.add(
            level, "architecture_mismatch",
            f"{b.label} is {b.architecture}, {a.label} is {a.architecture}: different architectures cannot be "
            "merged tensor by tensor",
            "merge only checkpoints of one architecture (fine-tunes of one base model)",
        )
    for key in STRUCTURAL_FIELDS:
        va, vb = a.config.get(key), b.config.get(key)
        if va is not None and vb is not None and va != vb:
            plan.add(
                level, "config_mismatch", f"{b.label} has {key}={vb}, {a.label} {key}={va}",
                "these models do not share a shape; merge fine-tunes of the same base model", path=key,
            )
    for key in SOFT_FIELDS:
        va, vb = a.config.get(key), b.config.get(key)
        if va != vb and (va is not None or vb is not None):
            plan.add(
                FindingLevel.WARNING, "config_difference", f"{b.label} has {key}={vb}, {a.label} {key}={va}",
                "the merged model keeps one config; check that the other model works with it", path=key,
            )
    va, vb = a.config.get("vocab_size"), b.config.get("vocab_size")
    if va is not None and vb is not None and va != vb:
        plan.add(
            FindingLevel.WARNING, "vocab_mismatch", f"{b.label} has vocab_size={vb}, {a.label} {va}",
            TOKENIZER_FIX, path="vocab_size",
        )


def _compare_block_counts(plan: Plan, a: Checkpoint, b: Checkpoint) -> None:
    na, nb = block_count(a), block_count(b)
    if na != nb:
        plan.add(
            FindingLevel.ERROR, "layer_count_mismatch",
            f"{b.label} has {nb} layers, {a.label} {na}: layers cannot be paired one to one",
            "merge checkpoints of the same depth, or use a passthrough merge with explicit slices",
        )


def _shared_tensors(plan: Plan, models: list[Checkpoint]) -> None:
    floats = [m.float_tensors for m in models]  # each table built once: lookups below are per name
    union: dict[str, None] = {}
    for table in floats:
        union.update(dict.fromkeys(table))
    common = [n for n in floats[0] if all(n in table for table in floats[1:])]
    if union and len(common) < MIN_SHARED_FRACTION * len(union):
        plan.add(
            FindingLevel.ERROR, "tensor_mismatch",
            f"the models share only {len(common)} of {len(union)} tensor names: they are not the same architecture",
            "merge fine-tunes of the same base model",
        )
        return
    for m, table in zip(models, floats, strict=True):
        missing = [n for n in union if n not in table]
        if missing:
            plan.add(
                FindingLevel.WARNING, "missing_tensors",
                f"{m.label} lacks {len(missing)} tensor(s) the others have, e.g. {', '.join(missing[:3])}",
                "these tensors are not compared; mergekit will fail on them unless the config excludes them",
                path=missing[0],
            )
    empty: list[str] = []
    for name in common:
        shapes = [m.tensors[name].shape for m in models]
        if any(0 in s for s in shapes):  # nothing to measure, and the metrics need at least one value
            empty.append(name)
            continue
        if all(s == shapes[0] for s in shapes):
            plan.tensors.append(name)
            continue
        role = classify(name)
        same_tail = all(len(s) == len(shapes[0]) and s[1:] == shapes[0][1:] for s in shapes)
        if role.kind in ("embed", "lm_head") and same_tail:
            rows = min(s[0] for s in shapes)
            plan.row_limits[name] = rows
            plan.tensors.append(name)
            if not any(f.code == "vocab_mismatch" for f in plan.findings):
                plan.add(
                    FindingLevel.WARNING, "vocab_mismatch",
                    f"{name} has {' vs '.join(str(s[0]) for s in shapes)} rows: the vocabularies differ",
                    TOKENIZER_FIX, path=name,
                )
        else:
            plan.add(
                FindingLevel.ERROR, "shape_mismatch",
                f"{name} has shape {' vs '.join(str(list(s)) for s in shapes)} across "
                f"{', '.join(m.label for m in models)}",
                "merge checkpoints with the same hidden and intermediate sizes", path=name,
            )
    if empty:
        plan.add(
            FindingLevel.INFO, "empty_tensors",
            f"{len(empty)} tensor(s) hold no values and are not compared, e.g. {', '.join(empty[:3])}",
            path=empty[0],
        )


def _tied_embeddings(plan: Plan, models: list[Checkpoint]) -> None:
    for m in models:
        kinds = {classify(n).kind for n in m.float_tensors}
        has_head = any(word in (m.architecture or "") for word in HEAD_ARCHITECTURES)
        declared = bool(m.config and m.config.get("tie_word_embeddings") is True)
        if "embed" in kinds and "lm_head" not in kinds and (has_head or (declared and m.architecture is None)):
            plan.add(
                FindingLevel.INFO, "tied_embeddings",
                f"{m.label} ties its output head to the input embeddings; the embedding metrics cover both",
            )
            return


def _plan_base(plan: Plan, reference: Checkpoint, base: Checkpoint) -> None:
    before = len(plan.fatal)
    _compare_configs(plan, reference, base, fatal=False)
    if block_count(base) != block_count(reference):
        plan.add(
            FindingLevel.WARNING, "base_layer_count_mismatch",
            f"base has {block_count(base)} layers, {reference.label} {block_count(reference)}; the base is ignored",
            "pass the base model the candidates were fine-tuned from",
        )
        return
    assert len(plan.fatal) == before
    base_floats = base.float_tensors
    for name in plan.tensors:
        info = base_floats.get(name)
        if info is None:
            continue
        ref_shape = reference.tensors[name].shape
        same_tail = len(info.shape) == len(ref_shape) > 0 and info.shape[1:] == ref_shape[1:]
        if info.shape == ref_shape:
            plan.base_tensors.add(name)
        elif same_tail and classify(name).kind in ("embed", "lm_head"):
            # another vocabulary size: compare the rows all of them share, base included
            plan.row_limits[name] = min(plan.row_limits.get(name, ref_shape[0]), info.shape[0])
            plan.base_tensors.add(name)
    unused = len(plan.tensors) - len(plan.base_tensors)
    if unused:
        plan.add(
            FindingLevel.WARNING, "base_mismatch",
            f"the base lacks or reshapes {unused} of {len(plan.tensors)} compared tensors; task-vector metrics "
            "skip them",
            "pass the base model the candidates were fine-tuned from",
        )
