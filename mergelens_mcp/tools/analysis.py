"""The analysis tools: compare_models, get_compatibility_score, get_conflict_zones, suggest_strategy and
explain_layer. Each is a thin adapter over one cached comparison (`runtime.analyse`)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from ..analysis.explain import LAYER_NUMBERING, explain, find_layer
from ..errors import InputError
from ..models import CompareResult
from ..security.redact import redact
from . import views
from .params import READ_ONLY, BaseModelPath, Detail, Models, ReadBase
from .runtime import AppContext, analyse

Page = Annotated[int, Field(ge=1, description="with detail=true: which page of layers to return (from 1; "
                                              "the answer says how many pages there are)")]
LayerDetail = Annotated[bool, Field(description="also say what each metric measures (once) and why each value "
                                                "helps or hurts; leave false for the compact answer")]


def _headline(result: CompareResult) -> str:
    return result.answer or views.summary(result)


async def compare_models(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None, detail: Detail = False, page: Page = 1,
    read_base: ReadBase = False,
) -> Annotated[CallToolResult, views.Comparison]:
    result, cached = await analyse(ctx, models, base_model, read_base)
    return views.reply(views.comparison(result, cached, detail, page), _headline(result))


async def get_compatibility_score(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None
) -> Annotated[CallToolResult, views.Score]:
    result, cached = await analyse(ctx, models, base_model)
    return views.reply(views.score(result, cached), _headline(result))


async def get_conflict_zones(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None, detail: Detail = False, page: Page = 1
) -> Annotated[CallToolResult, views.Zones]:
    result, cached = await analyse(ctx, models, base_model)
    view = views.zones(result, cached, detail, page)
    n = len(view.zones)
    return views.reply(view, f"{n} conflict zone{'s' if n != 1 else ''}. {_headline(result)}")


async def suggest_strategy(
    models: Models, ctx: AppContext, base_model: BaseModelPath = None
) -> Annotated[CallToolResult, views.StrategyAdvice]:
    result, cached = await analyse(ctx, models, base_model)
    if result.strategy is None:
        raise ToolError(f"no merge strategy. {_headline(result)}")
    s = result.strategy
    return views.reply(views.strategy_advice(result, cached), f"{s.method.value}. {_headline(result)}")


async def explain_layer(
    models: Models,
    layer: Annotated[int | str, Field(description=f"the layer to explain: {LAYER_NUMBERING}")],
    ctx: AppContext,
    base_model: BaseModelPath = None,
    detail: LayerDetail = False,
) -> Annotated[CallToolResult, views.LayerReport]:
    result, cached = await analyse(ctx, models, base_model)
    try:
        found = find_layer(result.layer_metrics, str(layer))
    except InputError as exc:
        raise ToolError(redact(str(exc))) from exc
    view = views.layer_report([explain(lm, result) for lm in found], cached, detail)
    return views.reply(view, " ".join(e.summary for e in view.explanations))


def register(server: MCPServer) -> None:
    server.add_tool(
        compare_models, title="Compare models before merging", annotations=READ_ONLY,
        description=(
            "Answer 'can these models be merged, and where will it break?' before running a merge. Reads two "
            "or more checkpoints (and ideally their common base) and returns the decision, merge_advised "
            "(yes / with_care / no) with a one-sentence answer to quote, the Merge Compatibility Index "
            "(0-100; for two models 100 x the predicted retention of the recommended method, capped at the "
            "weight-space composite outside the fitted range, every method's prediction beside it) with a "
            "verdict (highly_compatible / compatible / risky / incompatible), the "
            "reasons, the conflict zones (runs of layers that would merge badly, with a fix), the worst layers, "
            "findings about architecture or vocabulary, and the recommended merge method when available. "
            "Start here. Compact by default; set detail=true (paged) only if you need every layer's raw metrics. "
            "Relative paths resolve against the server's folder. "
            "Repeated calls on the same files are served from a cache."
        ),
    )
    server.add_tool(
        get_compatibility_score, title="Merge compatibility score",
        annotations=READ_ONLY,
        description=(
            "The quick yes/no: merge_advised (yes / with_care / no) and a one-sentence answer, with the Merge "
            "Compatibility Index (0-100, higher is safer), its verdict, the reasons and a score per pair. Use "
            "compare_models for the full picture."
        ),
    )
    server.add_tool(
        get_conflict_zones, title="Conflict zones", annotations=READ_ONLY,
        description=(
            "The layers where these models would merge badly: contiguous runs of low-scoring layers, each "
            "with its severity, the components that pulled it down and a concrete recommendation (e.g. take "
            "these layers from one model, or use ties); the advice agrees with merge_advised and the "
            "recommended method. Use to plan a layer-wise merge."
        ),
    )
    server.add_tool(
        suggest_strategy, title="Suggest a merge strategy", annotations=READ_ONLY,
        description=(
            "Recommend a mergekit merge method (linear, slerp, ties, dare_ties, task_arithmetic, ...) for "
            "these models with its parameters, a rationale, a runner-up, warnings, and a ready-to-edit "
            "mergekit YAML. Pass base_model: the task-vector methods need it."
        ),
    )
    server.add_tool(
        explain_layer, title="Explain one layer", annotations=READ_ONLY,
        description=(
            "Explain one layer's metrics in words: what each number measures, whether its value is good or "
            "bad for merging and why, and what to do about the weak ones. Use after compare_models or "
            "get_conflict_zones to understand a specific bad layer."
        ),
    )
