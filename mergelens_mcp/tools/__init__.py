"""The MCP tools: thin async adapters over `service`, the only place with tool names and annotations."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from . import analysis, diagnose, merge, prompts, report, zoo
from .arguments import one_line_argument_errors

TOOLS = (  # every tool; its name is its function's name (`add_tool`'s default, which every `register` keeps)
    analysis.compare_models, analysis.get_compatibility_score, analysis.get_conflict_zones,
    analysis.suggest_strategy, analysis.explain_layer, diagnose.diagnose_merge, report.generate_report,
    merge.preview_merge, merge.verify_merge, zoo.rank_merge_partners,
)
TOOL_FUNCTIONS = {fn.__name__: fn for fn in TOOLS}  # the one-line argument errors re-check the arguments against it
TOOL_NAMES = tuple(TOOL_FUNCTIONS)


def register_all(server: MCPServer) -> None:
    for module in (analysis, diagnose, report, merge, zoo, prompts):
        module.register(server)
    server.middleware.append(one_line_argument_errors(TOOL_FUNCTIONS))
