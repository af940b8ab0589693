"""The tools' outputs: compact views of a `CompareResult` sized for an assistant's context, with the full
per-layer detail only on request. Each is a pydantic model, so every tool publishes an `outputSchema`."""

from __future__ import annotations

from typing import Any, TypeVar

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, Field

from ..analysis.predict import mci_source
from ..analysis.score import CATALOGUE, WEAK_BELOW
from ..models import (
    CompareResult,
    ConfigDiagnosis,
    ConflictZone,
    Finding,
    LayerExplanation,
    LayerInterference,
    LayerMetrics,
    MergeAdvice,
    MergeMethod,
    ModelInfo,
    PairScore,
    Verdict,
)

T = TypeVar("T")
WORST_LAYERS = 5
WEAK_ASSESSMENTS = ("risky", "bad")
EXAMPLES = 3  # findings of one kind, and reasons, shown before a count of the rest (detail=true: all)
MAX_REASONS = 6
DETAIL_PAGE = 8  # layer entries per page of `detail` output
ADVISED_DOC = "the decision: yes, with_care or no (read this first)"
ANSWER_DOC = "the decision in one sentence, to quote to the user"
SCORE_DOC = "Merge Compatibility Index 0-100, higher is safer (None: the models cannot be compared at all)"
WEAK_COMPONENT = WEAK_BELOW
PREDICTIONS_DOC = ("merge method -> [predicted retention, low, high]: the expected share of each model's own "
                   "accuracy the merge keeps, 0..1, with its 80% interval (two models; fitted on synthetic tasks "
                   "with tiny Llama-style models)")
SCORE_METHOD_DOC = ("the merge method whose predicted retention x 100 the score is (capped at the composite for a "
                    "pair outside the fitted range); null: the score is the weight-space composite (three or more "
                    "models, no predictions, or keep one model)")
COMPOSITE_DOC = ("the hand-weighted weight-space composite 0-100 (the per-layer scores and conflict zones use it); "
                 "null where it is the score")
COMPONENTS_DOC = "mean 0..1 score of each MCI component (1 = ideal): " + "; ".join(
    f"{c.name}: {c.description}" for c in CATALOGUE
)


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ModelBrief(View):
    label: str = Field(description="how the results name this model: its folder's name, made unique, or 'base'")
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
    why: str = Field(description="the rule that chose the method (suggest_strategy has the full rationale)")
    warnings: list[str]


class Comparison(View):
    """The answer to 'can these models be merged?' in a few hundred tokens."""

    merge_advised: MergeAdvice | None = Field(description=ADVISED_DOC)
    answer: str | None = Field(description=ANSWER_DOC)
    score: float | None = Field(description=SCORE_DOC)
    verdict: Verdict
    confidence: str
    score_method: str | None = Field(default=None, description=SCORE_METHOD_DOC)
    composite: float | None = Field(default=None, description=COMPOSITE_DOC)
    predictions: dict[str, list[float]] = Field(default_factory=dict, description=PREDICTIONS_DOC)
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
        default=None, description=f"detail=true only: one page of {DETAIL_PAGE} layers' metrics (see `page`)"
    )
    page: int | None = Field(default=None, description="detail=true only: this page's number (from 1)")
    pages: int | None = Field(default=None, description="detail=true only: how many pages there are")


class Score(View):
    merge_advised: MergeAdvice | None = Field(description=ADVISED_DOC)
    answer: str | None = Field(description=ANSWER_DOC)
    score: float | None = Field(description=SCORE_DOC)
    verdict: Verdict
    confidence: str
    score_method: str | None = Field(default=None, description=SCORE_METHOD_DOC)
    composite: float | None = Field(default=None, description=COMPOSITE_DOC)
    predictions: dict[str, list[float]] = Field(default_factory=dict, description=PREDICTIONS_DOC)
    reasons: list[str]
    used_base: bool
    pairwise: list[PairScore]
    cached: bool


class Zones(View):
    merge_advised: MergeAdvice | None = Field(description=ADVISED_DOC)
    answer: str | None = Field(description=ANSWER_DOC)
    score: float | None
    verdict: Verdict
    zones: list[ConflictZone] = Field(
        description="contiguous runs of layers that score badly, worst severity first"
    )
    layers_scored: int = Field(description="layers (per pair) that were scored")
    cached: bool
    layers: list[LayerMetrics] | None = Field(
        default=None, description=f"detail=true only: one page of {DETAIL_PAGE} zone layers' metrics"
    )
    page: int | None = None
    pages: int | None = None


class StrategyAdvice(View):
    merge_advised: MergeAdvice | None = Field(description=ADVISED_DOC)
    answer: str | None = Field(description=ANSWER_DOC)
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
    predictions: dict[str, list[float]] = Field(default_factory=dict, description=PREDICTIONS_DOC)
    cached: bool


class LayerReport(View):
    layer: str
    explanations: list[LayerExplanation] = Field(
        description="one per pair of models; its readings are the risky or bad ones unless detail=true"
    )
    definitions: dict[str, str] | None = Field(
        default=None, description="detail=true only: what each metric measures, once for all pairs"
    )
    cached: bool


class Report(View):
    merge_advised: MergeAdvice | None = Field(default=None, description=ADVISED_DOC)
    answer: str | None = Field(default=None, description=ANSWER_DOC)
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


def diagnosis_headline(view: Diagnosis) -> str:
    """One line: will mergekit run it, how many problems, what the simulation found."""
    errors = [f for f in view.findings if f.level.value == "error"]
    warnings = [f for f in view.findings if f.level.value == "warning"]
    head = "Valid: mergekit should run it" if view.valid else f"Will fail or misbehave: {len(errors)} error(s)"
    head += f", {len(warnings)} warning(s)" if warnings else ""
    if view.overall_interference is not None:
        head += f"; simulated interference {view.overall_interference:.2f} (0 = nothing lost)"
    first = (errors or warnings or [None])[0]
    return head + (f". First: {first.message}" if first is not None else ".")


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


def paged(items: list[T], page: int) -> tuple[list[T], int, int]:
    """One page of `items` (pages of DETAIL_PAGE, from 1), the page number and the page count."""
    pages = max(1, -(-len(items) // DETAIL_PAGE))
    page = min(max(page, 1), pages)
    return items[(page - 1) * DETAIL_PAGE:page * DETAIL_PAGE], page, pages


def strategy_brief(result: CompareResult) -> StrategyBrief | None:
    s = result.strategy
    if s is None:
        return None
    return StrategyBrief(method=s.method, confidence=s.confidence, runner_up=s.runner_up,
                         why=s.rationale[0] if s.rationale else "", warnings=s.warnings)


def summarised(findings: list[Finding]) -> list[Finding]:
    """At most EXAMPLES findings of each kind, then one that counts the rest (a shape mismatch lists every
    tensor otherwise)."""
    by_code: dict[str, list[Finding]] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    out: list[Finding] = []
    for code, group in by_code.items():
        out.extend(group[:EXAMPLES])
        if len(group) > EXAMPLES:
            out.append(Finding(level=group[0].level, code=code, fix=group[0].fix,
                               message=f"... and {len(group) - EXAMPLES} more {code} findings like these "
                                       "(detail=true lists them)"))
    return out


def short_reasons(reasons: list[str], findings: list[Finding]) -> list[str]:
    """The reasons, with those repeating a summarised-away finding left out, at most MAX_REASONS."""
    kept = {f.message for f in summarised(findings)}
    hidden = {f.message for f in findings} - kept
    shown = [r for r in reasons if r not in hidden]
    if len(shown) > MAX_REASONS or len(shown) < len(reasons):
        rest = len(reasons) - len(shown[:MAX_REASONS])
        return [*shown[:MAX_REASONS], f"... and {rest} more (see findings; detail=true lists them)"]
    return shown


CLI_WORDS = {"pass --base": "pass base_model"}  # the engine's notes name the CLI flag; tools take base_model


def tool_notes(notes: list[str]) -> list[str]:
    """The result's notes, in the words of the tools' parameters."""
    out = []
    for note in notes:
        for cli, tool in CLI_WORDS.items():
            note = note.replace(cli, tool)
        out.append(note)
    return out


def compact_predictions(result: CompareResult) -> dict[str, list[float]]:
    """Each method's predicted retention and 80% interval as [retention, low, high], best first."""
    ranked = sorted(result.predictions.items(), key=lambda kv: -kv[1].retention)
    return {m: [round(p.retention, 2), round(p.low, 2), round(p.high, 2)] for m, p in ranked}


def composite(result: CompareResult) -> float | None:
    """The weight-space composite where the score is a prediction (None where it is the score)."""
    return result.mci.composite if result.mci.method is not None else None


def comparison(result: CompareResult, cached: bool, detail: bool, page: int = 1) -> Comparison:
    mci = result.mci
    findings = result.findings if detail else summarised(result.findings)
    reasons = mci.reasons if detail else short_reasons(mci.reasons, result.findings)
    layers, page, pages = paged(result.layer_metrics, page) if detail else (None, None, None)
    return Comparison(
        merge_advised=result.merge_advised, answer=result.answer,
        score=mci.score, verdict=mci.verdict, confidence=mci.confidence, score_method=mci.method,
        composite=composite(result), predictions=compact_predictions(result), reasons=reasons,
        used_base=mci.used_base, models=[brief(m) for m in result.models],
        base=brief(result.base) if result.base else None, pairwise=result.pairwise, components=mci.components,
        conflict_zones=result.conflict_zones, worst_layers=worst_layers(result), findings=findings,
        strategy=strategy_brief(result), notes=tool_notes(result.notes), cached=cached, elapsed_s=result.elapsed_s,
        layers=layers, page=page, pages=pages,
    )


def score(result: CompareResult, cached: bool) -> Score:
    mci = result.mci
    return Score(merge_advised=result.merge_advised, answer=result.answer, score=mci.score,
                 verdict=mci.verdict, confidence=mci.confidence, score_method=mci.method, composite=composite(result),
                 predictions=compact_predictions(result), reasons=short_reasons(mci.reasons, result.findings),
                 used_base=mci.used_base, pairwise=result.pairwise, cached=cached)


SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}


def zones(result: CompareResult, cached: bool, detail: bool, page: int = 1) -> Zones:
    ordered = sorted(result.conflict_zones, key=lambda z: (SEVERITY_ORDER[z.severity.value], z.score))
    inside = {(z.model_a, z.model_b, name) for z in ordered for name in z.layer_names}
    layers = [lm for lm in result.layer_metrics if (lm.model_a, lm.model_b, lm.layer_name) in inside]
    shown, page, pages = paged(layers, page) if detail else (None, None, None)
    return Zones(merge_advised=result.merge_advised, answer=result.answer, score=result.mci.score,
                 verdict=result.mci.verdict, zones=ordered, layers_scored=len(result.layer_metrics),
                 cached=cached, layers=shown, page=page, pages=pages)


def strategy_advice(result: CompareResult, cached: bool) -> StrategyAdvice:
    s = result.strategy
    assert s is not None
    return StrategyAdvice(
        merge_advised=result.merge_advised, answer=result.answer, method=s.method, confidence=s.confidence,
        rationale=s.rationale, runner_up=s.runner_up, parameters=s.parameters, warnings=s.warnings,
        mergekit_yaml=s.mergekit_yaml, peft_snippet=s.peft_snippet, score=result.mci.score,
        verdict=result.mci.verdict, predictions=compact_predictions(result), cached=cached,
    )


def layer_report(found: list[LayerExplanation], cached: bool, detail: bool) -> LayerReport:
    """The explanations; each metric's meaning once (detail only), never repeated per reading. By default only
    the readings that hurt the merge (risky or bad), the others with detail."""
    definitions = {r.name: r.meaning for e in found for r in e.readings if r.meaning} if detail else None
    explanations = [
        e.model_copy(update={"readings": [
            r.model_copy(update={"meaning": None, "why": r.why if detail else None}) for r in e.readings
            if detail or r.assessment in WEAK_ASSESSMENTS
        ]})
        for e in found
    ]
    return LayerReport(layer=found[0].layer_name, explanations=explanations, definitions=definitions,
                       cached=cached)


def reply(view: View, headline: str) -> CallToolResult:
    """The tool result: a one-line headline, then the view as compact JSON (text), and the view (structured)."""
    data = view.model_dump(mode="json")
    text = headline.strip() + "\n" + view.model_dump_json(exclude_none=True)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def summary(result: CompareResult) -> str:
    mci = result.mci
    score_text = "n/a" if mci.score is None else f"{mci.score:.1f}/100"
    text = f"MCI {score_text}, {mci.verdict.value.replace('_', ' ')} (confidence {mci.confidence})"
    source = mci_source(result)
    if source is not None:
        text += f" = {source}"
    n = len(result.conflict_zones)
    text += f"; {n} conflict zone{'s' if n != 1 else ''}"
    if result.strategy is not None:
        text += f"; recommended merge: {result.strategy.method.value}"
    return text + "."
