"""The tools' outputs: compact views of a `CompareResult` sized for an assistant's context, with the full
per-layer detail only on request. Each is a pydantic model, so every tool publishes an `outputSchema`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..analysis.score import CATALOGUE, WEAK_BELOW
from ..models import (
    CompareResult,
    ConfigDiagnosis,
    ConflictZone,
    Finding,
    LayerExplanation,
    LayerInterference,
    LayerMetrics,
    MergeMethod,
    ModelInfo,
    PairScore,
    Verdict,
)

WORST_LAYERS = 5
SCORE_DOC = "Merge Compatibility Index 0-100, higher is safer (None: the models cannot be compared at all)"
WEAK_COMPONENT = WEAK_BELOW
COMPONENTS_DOC = "mean 0..1 score of each MCI component (1 = ideal): " + "; ".join(
    f"{c.name}: {c.description}" for c in CATALOGUE
)


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ModelBrief(View):
    label: str = Field(description="how the results name this model: 'model_a', 'model_b', ... or 'base'")
    source: str
    architecture: str | None
    n_params: int


class LayerBrief(View):
    model_a: str
    model_b: str
    layer_name: str
    score: float = Field(description="0-100, higher is safer to merge")
    weak_components: list[str] = Field(
        description=f"MCI components below {WEAK_COMPONENT} in this layer, worst first"
    )


class StrategyBrief(View):
    method: MergeMethod
    confidence: float
    runner_up: MergeMethod | None


class Comparison(View):
    """The answer to 'can these models be merged?' in a few hundred tokens."""

    score: float | None = Field(description=SCORE_DOC)
    verdict: Verdict
    confidence: str
    reasons: list[str]
    used_base: bool
    models: list[ModelBrief]
    base: ModelBrief | None
    pairwise: list[PairScore]
    components: dict[str, float] = Field(description=COMPONENTS_DOC)
    conflict_zones: list[ConflictZone]
    worst_layers: list[LayerBrief] = Field(description=f"the {WORST_LAYERS} lowest-scoring layers")
    findings: list[Finding]
    strategy: StrategyBrief | None = Field(description="the recommended merge method, when available")
    notes: list[str]
    cached: bool = Field(description="true when the analysis came from the server's cache (no weights read)")
    elapsed_s: float = Field(description="seconds the analysis took when it ran")
    layers: list[LayerMetrics] | None = Field(
        default=None, description="every layer's metrics (detail=true only)"
    )


class Score(View):
    score: float | None = Field(description=SCORE_DOC)
    verdict: Verdict
    confidence: str
    reasons: list[str]
    used_base: bool
    pairwise: list[PairScore]
    cached: bool


class Zones(View):
    score: float | None
    verdict: Verdict
    zones: list[ConflictZone] = Field(
        description="contiguous runs of layers that score badly, worst severity first"
    )
    layers_scored: int = Field(description="layers (per pair) that were scored")
    cached: bool
    layers: list[LayerMetrics] | None = Field(
        default=None, description="metrics of every layer inside a zone (detail=true only)"
    )


class StrategyAdvice(View):
    method: MergeMethod
    confidence: float = Field(description="0..1")
    rationale: list[str]
    runner_up: MergeMethod | None
    parameters: dict[str, Any]
    warnings: list[str]
    mergekit_yaml: str = Field(
        description="a mergekit config to start from; check the paths before running it"
    )
    peft_snippet: str | None = Field(
        default=None, description="for LoRA adapters: PEFT code that merges them with add_weighted_adapter"
    )
    score: float | None
    verdict: Verdict
    cached: bool


class LayerReport(View):
    layer: str
    explanations: list[LayerExplanation] = Field(description="one per pair of models")
    cached: bool


class Report(View):
    path: str = Field(description="the HTML file written")
    bytes: int
    score: float | None
    verdict: Verdict
    summary: str
    cached: bool


class Diagnosis(View):
    """A mergekit config checked: will it run, what is wrong with it, and what would the merge lose."""

    valid: bool = Field(description="no error-level finding: mergekit should accept and run this config")
    merge_method: str | None
    findings: list[Finding]
    overall_interference: float | None = Field(
        description="0..1 share of the models' changes the merge would cancel or discard (None: not "
                    "simulated)"
    )
    worst_layers: dict[str, float] = Field(
        description=f"the {WORST_LAYERS} layers with the most interference"
    )
    models_checked: list[str]
    notes: list[str]
    layers: list[LayerInterference] | None = Field(
        default=None, description="every simulated layer (detail=true only)"
    )


def diagnosis(result: ConfigDiagnosis, detail: bool) -> Diagnosis:
    worst = sorted(result.interference_scores.items(), key=lambda kv: -kv[1])[:WORST_LAYERS]
    return Diagnosis(
        valid=result.valid, merge_method=result.merge_method, findings=result.findings,
        overall_interference=result.overall_interference, worst_layers=dict(worst),
        models_checked=result.models_checked, notes=result.notes, layers=result.layers if detail else None,
    )


def brief(info: ModelInfo) -> ModelBrief:
    return ModelBrief(
        label=info.label, source=info.source, architecture=info.architecture, n_params=info.n_params
    )


def weak_components(components: dict[str, float]) -> list[str]:
    return [name for value, name in sorted((v, n) for n, v in components.items() if v < WEAK_COMPONENT)]


def worst_layers(result: CompareResult, count: int = WORST_LAYERS) -> list[LayerBrief]:
    ranked = sorted(result.layer_metrics, key=lambda lm: lm.score)[:count]
    return [
        LayerBrief(
            model_a=lm.model_a, model_b=lm.model_b, layer_name=lm.layer_name, score=lm.score,
            weak_components=weak_components(lm.components),
        )
        for lm in ranked
    ]


def comparison(result: CompareResult, cached: bool, detail: bool) -> Comparison:
    mci, strategy = result.mci, result.strategy
    return Comparison(
        score=mci.score, verdict=mci.verdict, confidence=mci.confidence, reasons=mci.reasons,
        used_base=mci.used_base, models=[brief(m) for m in result.models],
        base=brief(result.base) if result.base else None, pairwise=result.pairwise, components=mci.components,
        conflict_zones=result.conflict_zones, worst_layers=worst_layers(result), findings=result.findings,
        strategy=StrategyBrief(
            method=strategy.method, confidence=strategy.confidence, runner_up=strategy.runner_up
        ) if strategy else None,
        notes=result.notes, cached=cached, elapsed_s=result.elapsed_s,
        layers=result.layer_metrics if detail else None,
    )


def score(result: CompareResult, cached: bool) -> Score:
    mci = result.mci
    return Score(score=mci.score, verdict=mci.verdict, confidence=mci.confidence, reasons=mci.reasons,
                 used_base=mci.used_base, pairwise=result.pairwise, cached=cached)


SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}


def zones(result: CompareResult, cached: bool, detail: bool) -> Zones:
    ordered = sorted(result.conflict_zones, key=lambda z: (SEVERITY_ORDER[z.severity.value], z.score))
    inside = {(z.model_a, z.model_b, name) for z in ordered for name in z.layer_names}
    layers = [lm for lm in result.layer_metrics if (lm.model_a, lm.model_b, lm.layer_name) in inside]
    return Zones(score=result.mci.score, verdict=result.mci.verdict, zones=ordered,
                 layers_scored=len(result.layer_metrics), cached=cached, layers=layers if detail else None)


def summary(result: CompareResult) -> str:
    mci = result.mci
    score_text = "n/a" if mci.score is None else f"{mci.score:.1f}/100"
    text = f"MCI {score_text}, {mci.verdict.value.replace('_', ' ')} (confidence {mci.confidence})"
    n = len(result.conflict_zones)
    text += f"; {n} conflict zone{'s' if n != 1 else ''}"
    if result.strategy is not None:
        text += f"; recommended merge: {result.strategy.method.value}"
    return text + "."
