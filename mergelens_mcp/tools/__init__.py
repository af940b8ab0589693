"""The MCP tools: thin async adapters over `service`, the only place with tool names and annotations."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from . import analysis, diagnose, merge, prompts, report, zoo
from .arguments import one_line_argument_errors

TOOL_FUNCTIONS = {  # name -> function; the one-line argument errors re-check the arguments against it
    "compare_models": analysis.compare_models, "get_compatibility_score": analysis.get_compatibility_score,
    "get_conflict_zones": analysis.get_conflict_zones, "suggest_strategy": analysis.suggest_strategy,
    "explain_layer": analysis.explain_layer, "diagnose_merge": diagnose.diagnose_merge,
    "generate_report": report.generate_report, "preview_merge": merge.preview_merge,
    "verify_merge": merge.verify_merge, "rank_merge_partners": zoo.rank_merge_partners,
}
TOOL_NAMES = tuple(TOOL_FUNCTIONS)


def register_all(server: MCPServer) -> None:
    for module in (analysis, diagnose, report, merge, zoo, prompts):
        module.register(server)
    server.middleware.append(one_line_argument_errors(TOOL_FUNCTIONS))
