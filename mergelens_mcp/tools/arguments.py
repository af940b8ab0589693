"""Arguments that fail a tool's input schema: one line per call, each field with its fix, instead of pydantic's
raw report (`List should have at least 2 items ... errors.pydantic.dev`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, TextContent
from pydantic import ValidationError

MAX_FIELD_HINT = 140


def one_line_argument_errors(functions: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """A server middleware: a tools/call rejected for its arguments gets a one-line, fixable message."""

    async def middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method != "tools/call" or not isinstance(ctx.params, dict):
            return result
        answer = CallToolResult.model_validate(result) if isinstance(result, dict) else result
        name = ctx.params.get("name")
        if not isinstance(answer, CallToolResult) or not answer.is_error or name not in functions:
            return result
        if "validation error" not in " ".join(_texts(answer)):
            return result
        message = describe(name, functions[name], ctx.params.get("arguments") or {})
        if message is None:
            return result
        fixed = CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
        return fixed.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(result, dict) else fixed

    return middleware


def describe(name: str, fn: Callable[..., Any], arguments: dict[str, Any]) -> str | None:
    """'compare_models: models: ... (what it takes)' for each invalid field; None when the arguments pass."""
    tool = _tool(name, fn)
    try:
        tool.fn_metadata.validate_arguments(arguments)
    except ValidationError as exc:
        properties = tool.parameters.get("properties", {})
        parts = []
        for error in exc.errors(include_url=False):
            loc = [str(p) for p in error["loc"]]
            field = loc[0] if loc else "arguments"
            hint = str(properties.get(field, {}).get("description", ""))
            hint = hint if len(hint) <= MAX_FIELD_HINT else hint[:MAX_FIELD_HINT - 3] + "..."
            what = error["msg"][:1].lower() + error["msg"][1:]
            parts.append(f"{'.'.join(loc) or field}: {what}" + (f" (expected: {hint})" if hint else ""))
        return f"{name}: invalid arguments: " + "; ".join(parts)
    return None


@cache
def _tool(name: str, fn: Callable[..., Any]) -> Tool:
    return Tool.from_function(fn, name=name)


def _texts(result: CallToolResult) -> list[str]:
    return [c.text for c in result.content if isinstance(c, TextContent)]
