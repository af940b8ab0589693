"""HTTP exposure: loopback by default with Host and Origin checks; anything else needs a bearer token,
and requests without it get 401. The real thing runs `mergelens serve` as a subprocess; variants run
in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx  # what mcp 2.3 installs (the httpx API under another name)
import pytest
import uvicorn

from fixtures.hostile import Sandbox
from mergelens_mcp import server as server_module
from mergelens_mcp.errors import InputError
from mergelens_mcp.security import redact as redaction
from mergelens_mcp.server import (
    BearerTokenMiddleware,
    check_exposure,
    is_loopback,
    transport_security,
)
from mergelens_mcp.settings import Settings

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 120  # importing torch on a loaded machine is slow
REQUEST_S = 30
TOKEN = "test-bearer-" + "0123456789abcdef" * 2
PLANTED = "hf_" + "H0stH3ad3rT0k3n" * 2
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_listening(process: subprocess.Popen[bytes], port: int) -> None:
    """Until the server accepts connections; fail at once if it exits. Each pause is a bounded wait."""
    for _ in range(int(STARTUP_S * 10)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    pytest.fail(f"the server did not listen on {port} within {STARTUP_S}s")


def serve(sandbox: Sandbox, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "mergelens_mcp",
        "serve",
        "--transport",
        "http",
        "--allow-dir",
        str(sandbox.root),
        *extra,
    ]
    return subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def stop(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    process.terminate()
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate(timeout=30)


@pytest.fixture
def running(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """`mergelens serve --transport http` on 127.0.0.1 and a free port; `request.param` adds arguments."""
    port = free_port()
    extra: list[str] = list(getattr(request, "param", []))
    if "--auth-token-file" in extra:
        token_file = sandbox.root / "token.txt"
        token_file.write_text(TOKEN + "\n")
        extra[extra.index("--auth-token-file") + 1] = str(token_file)
    process = serve(sandbox, "--port", str(port), *extra)
    try:
        wait_until_listening(process, port)
        yield {"url": f"http://127.0.0.1:{port}/mcp", "port": port, "process": process}
    finally:
        if process.returncode is None:
            stop(process)


def post(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(timeout=REQUEST_S) as client:
        return client.post(url, json=INITIALIZE, headers=MCP_HEADERS | (headers or {}))


def test_a_loopback_server_refuses_foreign_origins_and_hosts_and_logs_them_redacted(
    running: dict[str, Any],
) -> None:
    port = running["port"]
    evil_origin = post(running["url"], {"origin": "http://evil.example"})
    evil_host = post(running["url"], {"host": f"evil.example:{port}"})
    planted_host = post(running["url"], {"host": f"{PLANTED}.example:{port}"})
    null_origin = post(running["url"], {"origin": "null"})
    good = post(running["url"], {"origin": f"http://localhost:{port}"})
    assert (evil_origin.status_code, evil_host.status_code, planted_host.status_code) == (403, 421, 421)
    assert null_origin.status_code == 403
    assert good.status_code == 200 and "mergelens" in good.text
    out, err = stop(running["process"])
    assert out == b"", "an HTTP server must not write to stdout"
    assert PLANTED not in err.decode() and f"[REDACTED].example:{port}" in err.decode()


@pytest.mark.parametrize("running", [["--auth-token-file", "FILE"]], indirect=True)
def test_a_token_protected_server_answers_401_to_requests_without_the_right_bearer_token(
    running: dict[str, Any],
) -> None:
    url = running["url"]
    refused = {
        "none": post(url),
        "wrong": post(url, {"authorization": "Bearer " + TOKEN[:-1] + "X"}),
        "prefix": post(url, {"authorization": "Bearer " + TOKEN[:-1]}),
        "scheme": post(url, {"authorization": "Basic " + TOKEN}),
        "bare": post(url, {"authorization": TOKEN}),
    }
    with httpx.Client(timeout=REQUEST_S) as client:
        refused["get"] = client.get(url, headers={"accept": "text/event-stream"})
        refused["delete"] = client.delete(url)
    accepted = post(url, {"authorization": f"Bearer {TOKEN}"})
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 401)
    assert refused["none"].headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in refused["wrong"].text
    assert accepted.status_code == 200 and "mergelens" in accepted.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--host", "0.0.0.0"], "refusing to serve on '0.0.0.0' without a bearer token"),
        (["--host", "127.0.0.1", "--auth-token-file", "SHORT"], "use at least 16"),
    ],
    ids=["wildcard-without-token", "weak-token"],
)
def test_the_server_refuses_to_start_exposed_without_a_strong_token(
    sandbox: Sandbox, extra: list[str], message: str
) -> None:
    if "SHORT" in extra:
        (sandbox.root / "short.txt").write_text("abc123\n")
        extra = [str(sandbox.root / "short.txt") if e == "SHORT" else e for e in extra]
    process = serve(sandbox, "--port", str(free_port()), *extra, env={"MERGELENS_AUTH_TOKEN": ""})
    out, err = process.communicate(timeout=STARTUP_S)
    assert process.returncode == 2
    assert message in err.decode()
    assert "abc123" not in err.decode()


def test_loopback_detection_and_host_checks_per_address() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com", "localhost.evil"))
    assert transport_security("0.0.0.0").enable_dns_rebinding_protection is False
    loop = transport_security("127.0.0.1")
    assert loop.enable_dns_rebinding_protection and "localhost:*" in loop.allowed_hosts
    assert "http://evil.example:*" not in loop.allowed_origins
    lan = transport_security("10.0.0.5")
    assert "10.0.0.5:*" in lan.allowed_hosts and "http://10.0.0.5:*" in lan.allowed_origins
    check_exposure("stdio", "0.0.0.0", None)
    check_exposure("http", "127.0.0.1", None)
    check_exposure("http", "0.0.0.0", TOKEN)
    for host, token in (("0.0.0.0", None), ("10.0.0.5", ""), ("::", "short")):
        with pytest.raises(InputError):
            check_exposure("sse", host, token)


async def test_the_bearer_middleware_compares_the_whole_token_and_passes_other_scopes() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    guarded = BearerTokenMiddleware(app, TOKEN)
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        statuses = [
            (await client.get("/", headers=headers)).status_code
            for headers in (
                {},
                {"authorization": f"bearer {TOKEN}"},
                {"authorization": f"Bearer {TOKEN}x"},
                {"authorization": f"Bearer  {TOKEN} "},
                {"authorization": "Bearer "},
            )
        ]
    assert statuses == [401, 204, 401, 204, 401]
    assert seen == ["http", "http"]


def test_serve_reads_the_token_from_the_environment_and_wraps_the_app(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: apps.append(self.config.app))
    monkeypatch.setattr(redaction, "_registered", set())
    monkeypatch.setenv("MERGELENS_AUTH_TOKEN", TOKEN)
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False)
    server_module.run("http", "0.0.0.0", free_port(), settings)
    assert isinstance(apps[0], BearerTokenMiddleware)
    assert TOKEN in redaction._registered
    monkeypatch.delenv("MERGELENS_AUTH_TOKEN")
    with pytest.raises(InputError, match="without a bearer token"):
        server_module.run("http", "0.0.0.0", free_port(), Settings(allowed_roots=[sandbox.root]))
    server_module.run("http", "127.0.0.1", free_port(), Settings(allowed_roots=[sandbox.root]))
    assert len(apps) == 2 and not isinstance(apps[1], BearerTokenMiddleware)
