"""build_server(settings) -> MCPServer, and `run` over stdio, streamable HTTP or SSE.

The lifespan state (settings, path guard, capacity limiter, analysis cache) is created once per server and
shared by every session, so a second client, or a second HTTP session, reuses the cached analyses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from ._version import VERSION
from .errors import InputError
from .security import redact
from .settings import Settings
from .tools import register_all
from .tools.runtime import AppState

log = logging.getLogger(__name__)
Transport = Literal["stdio", "http", "sse"]
INSTRUCTIONS = (
    "mergelens answers 'should I merge these models, and how?' before a merge runs. Start with "
    "compare_models (pass the common base model when there is one), then get_conflict_zones / explain_layer "
    "for detail, suggest_strategy for a mergekit config, diagnose_merge to check an existing mergekit YAML, "
    "and generate_report for an HTML report. Paths must be under the folders the server was started with."
)


def build_server(settings: Settings | None = None) -> MCPServer[AppState]:
    """The MCP server with every tool and the prompt registered."""
    state = AppState.create(settings or Settings())
    running = [0]  # lifespans open now: one per server run (in-memory clients each open one)

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        running[0] += 1
        try:
            yield state
        finally:  # no analysis outlives the server (and a running one must not hold up its exit)
            running[0] -= 1
            if state.pool is not None and running[0] == 0:
                state.pool.close()

    server: MCPServer[AppState] = MCPServer(
        "mergelens", title="mergelens", version=VERSION, instructions=INSTRUCTIONS, lifespan=lifespan,
        log_level="WARNING",
    )
    register_all(server)
    return server


def endpoint(transport: Transport, host: str, port: int) -> str:
    shown = f"[{host.strip('[]')}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    return f"http://{shown}:{port}" + ("/mcp" if transport == "http" else "/sse")


def build_http_app(
    server: MCPServer[AppState], transport: Transport, host: str, auth_token: str | None = None,
    body_timeout_s: float | None = None,
) -> ASGIApp:
    """The ASGI app for an HTTP transport: streamable HTTP at /mcp, or SSE at /sse (+ /messages/), with Host
    and Origin checks for `host`, behind a bearer-token check when `auth_token` is given. With
    `body_timeout_s`, a request body that has not fully arrived in that time reads as a disconnect."""
    security = transport_security(host)
    app: Starlette
    if transport == "http":
        app = server.streamable_http_app(host=host, transport_security=security)
    elif transport == "sse":
        app = server.sse_app(host=host, transport_security=security)
    else:
        raise ValueError(f"transport {transport!r} has no HTTP app; use one of http, sse")
    wrapped: ASGIApp = DisconnectCancelsMiddleware(app) if transport == "http" else app
    wrapped = BodyDeadlineMiddleware(wrapped, body_timeout_s) if body_timeout_s else wrapped
    return BearerTokenMiddleware(wrapped, auth_token) if auth_token else wrapped


# ------------------------------------------------------------------------------------------- HTTP exposure

MIN_TOKEN_LENGTH = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transport_security(host: str) -> TransportSecuritySettings:
    """Host and Origin checks against DNS rebinding: requests must name this server, and browsers may only
    call it from pages it serves. On a wildcard address (0.0.0.0, ::) the Host cannot be known in advance,
    so only the bearer token (required there) stands between the network and the tools."""
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    names = list(dict.fromkeys([*LOOPBACK_HOSTS, bound]))
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*names, *(f"{n}:*" for n in names)],
        allowed_origins=[f"{scheme}://{n}:*" for n in names for scheme in ("http", "https")]
        + [f"{scheme}://{n}" for n in names for scheme in ("http", "https")],
    )


def check_exposure(transport: Transport, host: str, auth_token: str | None) -> None:
    """Refuse to start a server the network could reach without a bearer token, or with a weak one."""
    if transport == "stdio":
        return
    if auth_token is not None and len(auth_token) < MIN_TOKEN_LENGTH:
        raise InputError(
            f"the bearer token is {len(auth_token)} characters; use at least {MIN_TOKEN_LENGTH} random ones "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if not is_loopback(host) and not auth_token:
        raise InputError(
            f"refusing to serve on {host!r} without a bearer token: anyone who can reach it could read files "
            "under the allowed folders. Set MERGELENS_AUTH_TOKEN or pass --auth-token-file, or bind 127.0.0.1"
        )


class BearerTokenMiddleware:
    """401 for every HTTP request without `Authorization: Bearer <token>`; the comparison takes constant time
    (both sides are hashed first, so not even the length leaks)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()

    def _authorized(self, scope: Scope) -> bool:
        supplied = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credential.strip()
        return hmac.compare_digest(hashlib.sha256(supplied).digest(), self._digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "unauthorized", "message": "send Authorization: Bearer <token>"}).encode()
        await send({
            "type": "http.response.start", "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer realm="mergelens"')],
        })
        await send({"type": "http.response.body", "body": body})


def run(transport: Transport = "stdio", host: str = "127.0.0.1", port: int = 8000,
        settings: Settings | None = None, *, auth_token: str | None = None) -> None:
    """Serve until interrupted. Logs go to stderr; under stdio, stdout carries only protocol messages.

    HTTP transports bind `host` (loopback by default); any other address needs a bearer token, from
    `auth_token` or MERGELENS_AUTH_TOKEN, which every request must then carry.
    """
    settings = settings or Settings()
    if auth_token is None and settings.auth_token is not None:
        auth_token = settings.auth_token.get_secret_value().strip() or None
    check_exposure(transport, host, auth_token)
    redact.register_secret(auth_token)
    redact.install()
    server = build_server(settings)
    if transport == "stdio":
        anyio.run(server.run_stdio_async)
        return
    import uvicorn

    app = build_http_app(server, transport, host, auth_token, settings.http_body_timeout_s)
    config = uvicorn.Config(  # configures uvicorn's loggers
        app, host=host.strip("[]"), port=port, log_level="warning",  # "[::1]" binds as ::1
        http=guarded_h11(settings.http_header_timeout_s, settings.http_max_connections),
        timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=ACCEPT_BATCH,  # asyncio accepts up to `backlog` sockets at once: the overshoot past the cap
    )
    redact.install(["", "uvicorn", "uvicorn.error", "uvicorn.access"])
    uvicorn.Server(config).run()


# ------------------------------------------------------------------------------------------- HTTP limits

MAX_HEADER_BYTES = 16 * 1024  # a request line and headers larger than this are answered 400 by h11
ACCEPT_BATCH = 128  # connections accepted before the cap is applied to them; keeps cap + batch under 1,024 handles


def guarded_h11(header_timeout_s: float, max_connections: int) -> type[Any]:
    """uvicorn's h11 protocol with what uvicorn lacks against slow clients: a connection must finish each
    request's headers within `header_timeout_s` (uvicorn only times out idle keep-alive connections), and
    when more than `max_connections` are open, the oldest one still sending headers is closed for the new one,
    so connections that never finish their headers cannot hold every file handle and starve a real client.
    (uvicorn's `limit_concurrency` would answer that real client 503 instead.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._answered: object = None  # the request whose headers arrived last
            self._arm()
            if len(self.connections) > max_connections:  # closed ones stay counted until their loss is handled
                waiting = [c for c in self.connections
                           if c is not self and getattr(c, "_waiting_since", None) and not c.transport.is_closing()]
                if waiting:
                    min(waiting, key=lambda c: c._waiting_since)._too_slow()

        def _arm(self) -> None:
            self._waiting_since: float | None = self.loop.time()
            self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            if self._waiting_since is not None and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._answered:  # a request's headers are in
                self._answered, self._waiting_since = self.cycle, None
                self._deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # keep-alive: the next request's headers get the same time
                self._deadline.cancel()
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._waiting_since = None
            self._deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class BodyDeadlineMiddleware:
    """An HTTP request body must arrive in full within `seconds` of its headers; after that the app's
    `receive` reports a disconnect, so a client trickling a body cannot hold a request open."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.seconds
        complete = False

        async def timed_receive() -> Any:
            nonlocal complete
            if complete:
                return await receive()
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                message = await receive()
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            complete = True
            log.warning("an HTTP request body did not arrive within %.0f s; the request is dropped", self.seconds)
            return {"type": "http.disconnect"}

        await self.app(scope, timed_receive, send)


class DisconnectCancelsMiddleware:
    """A client that closes its connection while a tools/call it POSTed is running cancels that call, as if it
    had sent `notifications/cancelled`: the streamable HTTP transport would otherwise run it to the end (and
    cache its result). The cancellation goes through the session's own cancel path (the worker is killed)."""

    def __init__(self, app: ASGIApp, max_body: int = 4 * 2**20) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        answered = False

        async def watched_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request" and len(body) <= self.max_body:
                body.extend(message.get("body", b""))
            elif message["type"] == "http.disconnect" and not answered:
                await self._cancel(scope, bytes(body))
            return message

        async def watched_send(message: Any) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        await self.app(scope, watched_receive, watched_send)

    async def _cancel(self, scope: Scope, body: bytes) -> None:
        try:
            parsed = json.loads(body)
        except ValueError:
            return
        calls = [m for m in (parsed if isinstance(parsed, list) else [parsed])
                 if isinstance(m, dict) and m.get("method") == "tools/call" and "id" in m]
        keep = {b"mcp-session-id", b"mcp-protocol-version", b"host", b"authorization"}
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() in keep]
        headers += [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream")]
        for call in calls:
            notice = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                 "params": {"requestId": call["id"], "reason": "the client disconnected"}}).encode()
            with anyio.move_on_after(5):
                await self._post({**scope, "headers": headers}, notice)

    async def _post(self, scope: Scope, body: bytes) -> None:
        """Hand the app one more request on this session, whose answer nobody reads."""
        sent = False

        async def one_message() -> Any:
            nonlocal sent
            if sent:
                await anyio.sleep_forever()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def discard(message: Any) -> None:
            return None

        await self.app(scope, one_message, discard)
