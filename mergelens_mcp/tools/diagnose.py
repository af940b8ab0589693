"""diagnose_merge: check a mergekit YAML (a path or inline text) before running it."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from .. import service
from ..analysis.engine import Cancelled, Progress
from .runtime import AppContext, guard_for, run_in_worker, state_of


async def diagnose_merge(
    config: Annotated[str, Field(description="a mergekit YAML config: a path to a .yml/.yaml file under the "
                                             "allowed folders, or the YAML text itself")],
    ctx: AppContext,
) -> dict[str, Any]:
    diagnose = getattr(service, "diagnose", None)
    if diagnose is None:
        raise ToolError(
            "diagnose_merge is not available: this mergelens build has no mergekit config diagnosis "
            "(service.diagnose); compare_models and suggest_strategy can still assess the models"
        )
    state = state_of(ctx)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> dict[str, Any]:
        result = diagnose(config, settings=state.settings, guard=guard, progress=progress,
                          cancelled=cancelled)
        return result.model_dump(mode="json")

    return await run_in_worker(ctx, job)


def register(server: MCPServer) -> None:
    server.add_tool(
        diagnose_merge, name="diagnose_merge", title="Diagnose a mergekit config",
        annotations=ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True,
                                    openWorldHint=False),
        description=(
            "Check a mergekit YAML before running it: parse errors, unknown keys, bad parameters for the "
            "method, missing or mismatched models, and the compatibility of the models it merges, each with "
            "a fix. Give the YAML text itself or a path to it."
        ),
    )
