"""build_server(settings) -> MCPServer, and `run` over stdio, streamable HTTP or SSE.

The lifespan state (settings, path guard, capacity limiter, analysis cache) is created once per server and
shared by every session, so a second client, or a second HTTP session, reuses the cached analyses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette

from .analysis.engine import VERSION
from .settings import Settings
from .tools import register_all
from .tools.runtime import AppState

log = logging.getLogger(__name__)

Transport = Literal["stdio", "http", "sse"]
TRANSPORTS: tuple[Transport, ...] = ("stdio", "http", "sse")
INSTRUCTIONS = (
    "mergelens answers 'should I merge these models, and how?' before a merge runs. Start with "
    "compare_models "
    "(pass the common base model when there is one), then get_conflict_zones / explain_layer for detail, "
    "suggest_strategy for a mergekit config, diagnose_merge to check an existing mergekit YAML, and "
    "generate_report for an HTML report. Paths must be under the folders the server was started with."
)


def build_server(settings: Settings | None = None) -> MCPServer[AppState]:
    """The MCP server with every tool and the prompt registered."""
    state = AppState.create(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        yield state

    server: MCPServer[AppState] = MCPServer(
        "mergelens", title="mergelens", version=VERSION, instructions=INSTRUCTIONS, lifespan=lifespan,
        log_level="WARNING",
    )
    register_all(server)
    return server


def build_http_app(server: MCPServer[AppState], transport: Transport, host: str) -> Starlette:
    """The ASGI app for an HTTP transport: streamable HTTP at /mcp, or SSE at /sse (+ /messages/)."""
    if transport == "http":
        return server.streamable_http_app(host=host)
    if transport == "sse":
        return server.sse_app(host=host)
    raise ValueError(f"transport {transport!r} has no HTTP app; use one of http, sse")


def run(transport: Transport = "stdio", host: str = "127.0.0.1", port: int = 8000,
        settings: Settings | None = None) -> None:
    """Serve until interrupted. Logs go to stderr; under stdio, stdout carries only protocol messages."""
    server = build_server(settings)
    if transport == "stdio":
        anyio.run(server.run_stdio_async)
        return
    import uvicorn

    app = build_http_app(server, transport, host)
    log.warning("mergelens MCP server (%s) on http://%s:%d%s", transport, host, port,
                "/mcp" if transport == "http" else "/sse")
    uvicorn.run(app, host=host, port=port, log_level="warning")
