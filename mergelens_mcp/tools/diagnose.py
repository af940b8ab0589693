"""diagnose_merge: check a mergekit YAML (a path or inline text) before running it."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult
from pydantic import Field

from .. import service
from ..analysis.types import Cancelled, Progress
from ..models import ConfigDiagnosis
from . import views
from .params import READ_ONLY, Detail
from .runtime import AppContext, guard_for, run_in_worker, state_of


async def diagnose_merge(
    config: Annotated[str, Field(description="a mergekit YAML config: a path to a .yml/.yaml file under the "
                                             "allowed folders, or the YAML text itself")],
    ctx: AppContext,
    base_model: Annotated[str | None, Field(
        description="the models' common base, when the YAML names none (linear, slerp): without it the "
                    "simulation cannot see whether the fine-tunes' changes cancel")] = None,
    detail: Detail = False,
) -> Annotated[CallToolResult, views.Diagnosis]:
    state = state_of(ctx)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> ConfigDiagnosis:
        return state.isolated(service.diagnose, config, settings=state.settings, guard=guard, progress=progress,
                              cancelled=cancelled, base=base_model)

    view = views.diagnosis(await run_in_worker(ctx, job), detail)
    return views.reply(view, views.diagnosis_headline(view))


def register(server: MCPServer) -> None:
    server.add_tool(
        diagnose_merge, title="Diagnose a mergekit config",
        annotations=READ_ONLY,
        description=(
            "Check a mergekit YAML before running it: whether mergekit will accept it (unknown keys, bad "
            "parameters for the method, missing or mismatched models, layer ranges), each problem with a "
            "fix, and, where the models can be read, a simulation of how much of each model's change the "
            "merge would cancel or discard per layer (interference, 0 = nothing lost). Give the YAML text "
            "itself or a path to it."
        ),
    )
