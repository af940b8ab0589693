"""The analysis tools: compare_models, get_compatibility_score, get_conflict_zones, suggest_strategy and
explain_layer. Each is a thin adapter over one cached comparison (`runtime.analyse`)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from ..analysis.explain import explain, find_layer
from ..errors import InputError
from ..security.redact import redact
from . import views
from .params import READ_ONLY, BaseModelPath, Detail, Models
from .runtime import AppContext, analyse


async def compare_models(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None, detail: Detail = False
) -> views.Comparison:
    result, cached = await analyse(ctx, models, base_model)
    return views.comparison(result, cached, detail)


async def get_compatibility_score(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None
) -> views.Score:
    result, cached = await analyse(ctx, models, base_model)
    return views.score(result, cached)


async def get_conflict_zones(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None, detail: Detail = False
) -> views.Zones:
    result, cached = await analyse(ctx, models, base_model)
    return views.zones(result, cached, detail)


async def suggest_strategy(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None
) -> views.StrategyAdvice:
    result, cached = await analyse(ctx, models, base_model)
    s = result.strategy
    if s is None:
        reasons = "; ".join(result.mci.reasons[:3])
        raise ToolError(f"no merge strategy: these models cannot be merged tensor by tensor ({reasons})")
    return views.StrategyAdvice(
        method=s.method, confidence=s.confidence, rationale=s.rationale, runner_up=s.runner_up,
        parameters=s.parameters, warnings=s.warnings, mergekit_yaml=s.mergekit_yaml, peft_snippet=s.peft_snippet,
        score=result.mci.score, verdict=result.mci.verdict, cached=cached,
    )


async def explain_layer(
    models: Models,
    layer: Annotated[int | str, Field(description="a block index (12) or a layer name: 'layers.12', 'embed', "
                                            "'norm', 'lm_head' (as in compare_models' worst_layers)")],
    ctx: AppContext,
    base_model: BaseModelPath = None,
) -> views.LayerReport:
    result, cached = await analyse(ctx, models, base_model)
    try:
        found = find_layer(result.layer_metrics, str(layer))
    except InputError as exc:
        raise ToolError(redact(str(exc))) from exc
    explanations = [explain(lm) for lm in found]
    return views.LayerReport(layer=found[0].layer_name, explanations=explanations, cached=cached)


def register(server: MCPServer) -> None:
    server.add_tool(
        compare_models, name="compare_models", title="Compare models before merging", annotations=READ_ONLY,
        description=(
            "Answer 'can these models be merged, and where will it break?' before running a merge. Reads two "
            "or more checkpoints (and ideally their common base) and returns the Merge Compatibility Index "
            "(0-100) with a verdict (highly_compatible / compatible / risky / incompatible), the reasons, "
            "the conflict zones (runs of layers that would merge badly, with a fix), the worst layers, "
            "findings about architecture or vocabulary, and the recommended merge method when available. "
            "Start here. Compact by default; set detail=true only if you need every layer's raw metrics. "
            "Repeated calls on the same files are served from a cache."
        ),
    )
    server.add_tool(
        get_compatibility_score, name="get_compatibility_score", title="Merge compatibility score",
        annotations=READ_ONLY,
        description=(
            "Just the Merge Compatibility Index (0-100, higher is safer) and its verdict for two or more "
            "models, with the reasons and a score per pair. Use for a quick yes/no; use compare_models for "
            "the full picture."
        ),
    )
    server.add_tool(
        get_conflict_zones, name="get_conflict_zones", title="Conflict zones", annotations=READ_ONLY,
        description=(
            "The layers where these models would merge badly: contiguous runs of low-scoring layers, each "
            "with its severity, the components that pulled it down and a concrete recommendation (e.g. take "
            "these layers from one model, or use ties). Use to plan a layer-wise merge."
        ),
    )
    server.add_tool(
        suggest_strategy, name="suggest_strategy", title="Suggest a merge strategy", annotations=READ_ONLY,
        description=(
            "Recommend a mergekit merge method (linear, slerp, ties, dare_ties, task_arithmetic, ...) for "
            "these models with its parameters, a rationale, a runner-up, warnings, and a ready-to-edit "
            "mergekit YAML. Pass base_model: the task-vector methods need it."
        ),
    )
    server.add_tool(
        explain_layer, name="explain_layer", title="Explain one layer", annotations=READ_ONLY,
        description=(
            "Explain one layer's metrics in words: what each number measures, whether its value is good or "
            "bad for merging and why, and what to do about the weak ones. Use after compare_models or "
            "get_conflict_zones to understand a specific bad layer."
        ),
    )
