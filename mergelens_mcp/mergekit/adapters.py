"""Merging LoRA adapters: mergekit's `base+adapter` model references and PEFT's `add_weighted_adapter` snippet.

mergekit applies an adapter to its base when a model is written `base+adapter`; PEFT merges the adapters
themselves. The PEFT combination type follows the recommended method and the measurements: `ties`,
`dare_ties`, `dare_linear` and `magnitude_prune` trim the summed deltas (then refactor them by SVD), `cat`
stacks the weighted factors and is the exact weighted sum of the deltas at any ranks, `linear` mixes the
factors themselves (only for equal ranks and targets, and then not the sum of the deltas: cross terms), and
`svd` refactors the exact sum to the largest rank.
"""

from __future__ import annotations

from typing import Any

from ..models import CompareResult, MergeMethod, ModelInfo

PEFT_TYPES = {
    MergeMethod.TIES: "ties",
    MergeMethod.DARE_TIES: "dare_ties",
    MergeMethod.DARE_LINEAR: "dare_linear",
    MergeMethod.BREADCRUMBS: "magnitude_prune",
    MergeMethod.BREADCRUMBS_TIES: "ties",
    MergeMethod.DELLA: "dare_ties",
    MergeMethod.TASK_ARITHMETIC: "cat",
    MergeMethod.LINEAR: "cat",
}
DENSITY_TYPES = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
MERGED_NAME = "merged"


def model_reference(model: ModelInfo) -> str:
    """How mergekit names the model: `base+adapter` for a LoRA adapter, its source otherwise."""
    return f"{model.adapter.base}+{model.source}" if model.adapter is not None else model.source


def combination_type(result: CompareResult, method: MergeMethod) -> tuple[str, str]:
    """PEFT's combination type for the recommended method and why: the trimming types work on the factors
    themselves when the ranks are equal, and on the deltas (their `_svd` forms) when they differ."""
    chosen = PEFT_TYPES.get(method)
    if chosen is None:
        return "svd", f"PEFT has no {method.value}: svd refactors the exact weighted sum of the deltas"
    if chosen == "cat":
        return "cat", "cat stacks the weighted factors: the exact weighted sum of the deltas, at any ranks"
    ranks = {tuple(m.adapter.ranks) for m in result.models if m.adapter is not None}
    if len(ranks) > 1:
        return f"{chosen}_svd", f"{chosen}_svd trims the deltas as {method.value} does, then refactors them by SVD"
    return chosen, f"{chosen} trims the factors as {method.value} does (the adapters' ranks are equal)"


def peft_snippet(result: CompareResult, method: MergeMethod, params: dict[str, Any]) -> str | None:
    """Python that merges the compared adapters with PEFT (None unless every model is an adapter of one base)."""
    adapters = [m.adapter for m in result.models]
    if any(a is None for a in adapters) or len({a.base for a in adapters if a is not None}) != 1:
        return None
    base = adapters[0].base  # type: ignore[union-attr]
    labels = [m.label for m in result.models]
    weights = params.get("weights") or {}
    values = [float(weights.get(label, 1.0 / len(labels))) for label in labels]
    kind, why = combination_type(result, method)
    ranks = {tuple(a.ranks) for a in adapters if a is not None}
    arguments = [f"adapters={labels!r}", f"weights={values!r}", f"adapter_name={MERGED_NAME!r}",
                 f"combination_type={kind!r}"]
    if kind.removesuffix("_svd") in DENSITY_TYPES:
        arguments.append(f"density={float(params.get('density', 0.5))!r}")
    lines = [
        f"# {why}" + ("" if len(ranks) == 1 else "; the ranks differ, so `linear` is not available"),
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {result.models[0].source!r}, adapter_name={labels[0]!r})",
    ]
    lines += [f"model.load_adapter({m.source!r}, adapter_name={m.label!r})" for m in result.models[1:]]
    lines += [
        f"model.add_weighted_adapter({', '.join(arguments)})",
        f"model.set_adapter({MERGED_NAME!r})",
        f"model.save_pretrained('merged-adapter', selected_adapters=[{MERGED_NAME!r}])",
    ]
    return "\n".join(lines) + "\n"
