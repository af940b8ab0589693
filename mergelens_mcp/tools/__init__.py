"""The MCP tools: thin async adapters over `service`, the only place with tool names and annotations."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from . import analysis, diagnose, prompts, report, zoo

TOOL_NAMES = (
    "compare_models", "get_compatibility_score", "get_conflict_zones", "suggest_strategy", "explain_layer",
    "diagnose_merge", "generate_report", "rank_merge_partners",
)


def register_all(server: MCPServer) -> None:
    for module in (analysis, diagnose, report, prompts, zoo):
        module.register(server)
