"""HTTP limits of `mergelens serve`: slow clients cannot hold every connection, and `[::1]` binds."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2 as httpx  # what mcp 2.3 installs (the httpx API under another name)
import pytest

from fixtures.hostile import Sandbox
from mergelens_mcp.server import BodyDeadlineMiddleware, endpoint

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 120
TOKEN = "limits-bearer-" + "0123456789abcdef" * 2
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "authorization": f"Bearer {TOKEN}"}
SLOW_CLIENTS = 1_100
FILE_HANDLES = 1_024


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(sandbox: Sandbox, host: str, port: int) -> subprocess.Popen[bytes]:
    token_file = sandbox.root / "token.txt"
    token_file.write_text(TOKEN)

    def few_handles() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_HANDLES, FILE_HANDLES))

    command = [sys.executable, "-m", "mergelens_mcp", "serve", "--transport", "http", "--host", host, "--port",
               str(port), "--allow-dir", str(sandbox.root), "--auth-token-file", str(token_file)]
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=few_handles)


def wait_until_listening(process: subprocess.Popen[bytes], address: tuple[str, int]) -> None:
    """Until the server accepts connections; fail at once if it exits. Each pause is a bounded wait."""
    for _ in range(STARTUP_S * 10):
        try:
            with socket.create_connection(address, timeout=1):
                return
        except OSError:
            pass
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    pytest.fail(f"the server did not listen on {address} within {STARTUP_S}s")


@pytest.fixture
def stopped_at_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.communicate(timeout=30)


def test_an_authorised_call_answers_within_2_s_while_1100_clients_never_finish_their_headers(
    sandbox: Sandbox, stopped_at_end: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    process = serve(sandbox, "127.0.0.1", port)
    stopped_at_end.append(process)
    wait_until_listening(process, ("127.0.0.1", port))
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            slow.append(s)
        started = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            answer = client.post(f"http://127.0.0.1:{port}/mcp", json=INITIALIZE, headers=HEADERS)
        elapsed = time.monotonic() - started
    finally:
        for s in slow:
            s.close()
    assert answer.status_code == 200 and "mergelens" in answer.text
    assert elapsed < 2.0
    assert process.poll() is None


def test_a_bracketed_ipv6_loopback_host_binds_and_is_printed_as_a_url(
    sandbox: Sandbox, stopped_at_end: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port(socket.AF_INET6, "::1")
    process = serve(sandbox, "[::1]", port)
    stopped_at_end.append(process)
    wait_until_listening(process, ("::1", port))
    with httpx.Client(timeout=30) as client:
        answer = client.post(f"http://[::1]:{port}/mcp", json=INITIALIZE, headers=HEADERS)
    assert answer.status_code == 200
    assert endpoint("http", "::1", port) == endpoint("http", "[::1]", port) == f"http://[::1]:{port}/mcp"


async def test_a_request_body_that_does_not_arrive_in_time_reads_as_a_disconnect() -> None:
    seen: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(await receive())  # type: ignore[operator]
        seen.append(await receive())  # type: ignore[operator]

    async def trickle() -> dict[str, object]:
        if not seen:
            return {"type": "http.request", "body": b"{", "more_body": True}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with anyio.fail_after(10):
        await BodyDeadlineMiddleware(app, 0.2)({"type": "http"}, trickle, None)  # type: ignore[arg-type]
    assert seen == [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]


def test_an_http_client_that_disconnects_mid_call_has_its_worker_killed_within_1_s_and_nothing_cached(
    sandbox: Sandbox, stopped_at_end: list[subprocess.Popen[bytes]]
) -> None:
    from fixtures.checkpoints import Shape, make_checkpoint, make_finetune
    from mergelens_mcp.workers import _alive

    medium = Shape(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024, vocab=2048)
    models = {"models": [str(make_finetune(sandbox.root / "m_a", medium, 0, task_seed=1)),
                         str(make_finetune(sandbox.root / "m_b", medium, 0, task_seed=2))],
              "base_model": str(make_checkpoint(sandbox.root / "m_base", medium, 0))}
    port = free_port()
    process = serve(sandbox, "127.0.0.1", port)
    stopped_at_end.append(process)
    wait_until_listening(process, ("127.0.0.1", port))
    url = f"http://127.0.0.1:{port}/mcp"
    with httpx.Client(timeout=STARTUP_S) as client:
        opened = client.post(url, json=INITIALIZE, headers=HEADERS)
        session = HEADERS | {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "compare_models", "arguments": models, "_meta": {"progressToken": "p"}}}
        with client.stream("POST", url, json=call, headers=session) as streamed:
            for line in streamed.iter_lines():  # bounded: the call answers or the server closes the stream
                if "notifications/progress" in line:
                    break
            forked = [pid for helper in children(process.pid) for pid in children(helper)]
        left = time.monotonic()  # the stream is closed: the client is gone
        while any(_alive(pid) for pid in forked) and time.monotonic() - left < 30:
            time.sleep(0.01)
        gone = time.monotonic() - left
        again = client.post(url, headers=session, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "get_compatibility_score", "arguments": models}})
    assert len(forked) == 1 and gone < 1.0
    assert '"cached":false' in again.text.replace(" ", "") and '"isError":false' in again.text.replace(" ", "")


def children(pid: int) -> list[int]:
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
