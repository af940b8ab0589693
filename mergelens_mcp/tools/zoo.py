"""The zoo tool: rank_merge_partners, a thin adapter over `zoo.compare_zoo` with a compact answer."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel, Field

from ..analysis.types import Cancelled, Progress
from ..models import ZooResult, ZooSet
from .params import READ_ONLY, BaseModelPath
from .runtime import AppContext, guard_for, run_in_worker, state_of

MAX_PAIRS, MAX_GROUPS = 8, 6


class Pair(BaseModel):
    models: list[str]
    mci: float = Field(description="the weight-space composite MCI estimated from sketches (not the predicted "
                       "retention compare_models gives two models); the exact composite lies within mci_range")
    mci_range: list[float]
    verdict: str
    exact_mci: float | None = None


class ZooAnswer(BaseModel):
    """The compact answer: the best sets, the best pairs, and the groups."""

    models: int
    target: str | None
    best_sets: list[ZooSet]
    best_pairs: list[Pair]
    near_duplicates: list[list[str]]
    compatible_groups: list[list[str]]
    conflicting_pairs: int
    mergekit_yaml: str | None = Field(default=None, description="the top set's merge (with exact_top >= 1)")
    cached_sketches: int = Field(description="models whose sketch came from the cache (not read again)")
    notes: list[str]


def compact(result: ZooResult, top: int) -> ZooAnswer:
    pairs = [p for p in result.pairs if result.target is None or result.target in (p.model_a, p.model_b)]
    return ZooAnswer(
        models=len(result.models), target=result.target, best_sets=result.best_sets[:top],
        best_pairs=[Pair(models=[p.model_a, p.model_b], mci=p.mci, mci_range=[p.mci_low, p.mci_high],
                         verdict=p.verdict.value, exact_mci=p.exact_mci) for p in pairs[:MAX_PAIRS]],
        near_duplicates=result.near_duplicates[:MAX_GROUPS], compatible_groups=result.clusters[:MAX_GROUPS],
        conflicting_pairs=len(result.conflicts),
        mergekit_yaml=result.strategy.mergekit_yaml if result.strategy else None,
        cached_sketches=sum(m.cached for m in result.models), notes=result.notes[:2],
    )


async def rank_merge_partners(
    models: Annotated[list[str], Field(
        min_length=1, description="the zoo: two or more model folders, .safetensors files or Hub ids, or one "
        "folder holding model folders; local paths must be under the server's allowed folders")],
    ctx: AppContext,
    base_model: BaseModelPath = None,
    target: Annotated[str | None, Field(
        description="rank the best partners of this one model (its path or folder name)")] = None,
    top: Annotated[int, Field(ge=1, le=20, description="best sets to return")] = 5,
    set_size: Annotated[int, Field(ge=2, le=5, description="the largest set of models to consider")] = 3,
    exact_top: Annotated[int, Field(ge=0, le=5, description="recompute the best N pairs exactly "
                                                             "(reads those models again) and the top set's YAML")] = 0,
) -> ZooAnswer:
    from ..zoo import compare_zoo

    state = state_of(ctx)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> ZooResult:
        return compare_zoo(
            models, base_model, target=target, top=top, set_size=set_size, exact_top=exact_top,
            settings=state.settings, guard=guard, progress=progress, cancelled=cancelled,
        )

    return compact(await run_in_worker(ctx, job), top)


def register(server: MCPServer) -> None:
    server.add_tool(
        rank_merge_partners, title="Rank merge partners in a model zoo",
        annotations=READ_ONLY,
        description=(
            "Answer 'which of these N models should I merge?' for a zoo of fine-tunes (ideally of one base): "
            "each model is read once into a small cached sketch, then every pair's Merge Compatibility Index "
            "is estimated with its error range. Returns the best sets of 2..set_size models (ranked by their "
            "weakest pair), the best pairs, near-duplicates and compatible groups; with target, the best "
            "partners of that model. Adding a model to a zoo already seen reads only the new model. Then "
            "use compare_models or suggest_strategy on the chosen set for the full picture."
        ),
    )
