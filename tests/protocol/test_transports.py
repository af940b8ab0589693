"""`mergelens serve` as a real subprocess, over stdio, streamable HTTP and SSE, called by mcp's `Client`."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

from fixtures.checkpoints import Family
from mergelens_mcp.tools import TOOL_NAMES

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 90  # importing torch on a loaded machine is slow
CALL_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(family: Family, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergelens_mcp", "serve", "--allow-dir", str(family.base.parent), *extra]


def wait_for_port(process: subprocess.Popen[bytes], port: int, deadline_s: float) -> None:
    """Poll until the server accepts connections; fail at once if it exits, or at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, err = process.communicate(timeout=5)
            detail = err.decode(errors="replace")[-2000:]
            pytest.fail(f"the server exited with {process.returncode}: {detail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # a poll interval, not a wait for an outcome
    pytest.fail(f"the server did not listen on port {port} within {deadline_s}s")


@pytest.fixture
def http_server(family: Family, request: pytest.FixtureRequest) -> Iterator[int]:
    """`mergelens serve --transport <param>` on a free port; yields the port."""
    port = free_port()
    process = subprocess.Popen(
        serve_command(family, "--transport", request.param, "--port", str(port)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(process, port, STARTUP_S)
        yield port
    finally:
        process.terminate()
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate(timeout=15)
        assert out == b"", "an HTTP server must not write to stdout"


async def compare_through(client: Client, family: Family) -> dict[str, Any]:
    args = {"models": [str(family.finetune_a), str(family.flipped)], "base_model": str(family.base)}
    tools = await client.list_tools()
    assert len(tools.tools) == len(TOOL_NAMES)
    result = await client.call_tool("compare_models", args)
    assert not result.is_error, result.content
    return result.structured_content


def assert_flipped_answer(out: dict[str, Any]) -> None:
    # the headline is the recommended method's predicted retention; the weight-space composite and the decision
    # see the reversed layer
    assert out["score_method"] == out["strategy"]["method"]
    # (capped at the composite: the fixtures lie outside the fitted range)
    assert out["score"] == min(100 * out["predictions"][out["score_method"]][0], out["composite"])
    assert 0 < out["composite"] < 75 and out["merge_advised"] == "with_care"
    assert [(z["start_layer"], z["end_layer"]) for z in out["conflict_zones"]] == [(2, 2)]


async def test_mergelens_serve_answers_compare_models_over_stdio(family: Family) -> None:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "HF_HOME", "HF_HUB_OFFLINE") if k in os.environ}
    params = StdioServerParameters(command=sys.executable, args=serve_command(family)[1:], cwd=REPO, env=env)
    with anyio.fail_after(STARTUP_S + CALL_S):
        async with Client(params) as client:
            out = await compare_through(client, family)
            error = await client.call_tool("compare_models", {"models": ["/etc/passwd", str(family.base)]})
            again = await client.call_tool("get_conflict_zones", {
                "models": [str(family.finetune_a), str(family.flipped)], "base_model": str(family.base)})
    assert_flipped_answer(out)
    assert error.is_error and "outside the allowed roots" in error.content[0].text
    assert again.structured_content["cached"] is True


@pytest.mark.parametrize("http_server", ["http"], indirect=True)
async def test_mergelens_serve_answers_compare_models_over_streamable_http(
    family: Family, http_server: int
) -> None:
    with anyio.fail_after(CALL_S):
        async with Client(f"http://127.0.0.1:{http_server}/mcp") as client:
            out = await compare_through(client, family)
    assert_flipped_answer(out)


@pytest.mark.parametrize("http_server", ["sse"], indirect=True)
async def test_mergelens_serve_answers_compare_models_over_sse(family: Family, http_server: int) -> None:
    with anyio.fail_after(CALL_S):
        async with Client(sse_client(f"http://127.0.0.1:{http_server}/sse")) as client:
            out = await compare_through(client, family)
    assert_flipped_answer(out)


def read_replies(process: subprocess.Popen[bytes], wanted: int, deadline_s: float) -> list[bytes]:
    """Lines from the server's stdout until `wanted` replies (lines with an id) came, or the deadline."""
    assert process.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while sum(b'"id"' in line for line in lines) < wanted:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(timeout=left):
                pytest.fail(f"no reply within {deadline_s}s; stdout so far: {lines!r}")
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"the server closed stdout; stdout so far: {lines!r}")
            lines.append(line)
    return lines


def test_under_stdio_stdout_carries_only_json_rpc_messages(family: Family, tmp_path: Path) -> None:
    """Debug logging on, a tool error on the way: stdout still holds nothing but the two replies."""
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "get_compatibility_score", "arguments": {"models": ["/etc/passwd", str(family.base)]}}},
    ]
    command = [sys.executable, "-m", "mergelens_mcp", "--verbose", *serve_command(family)[3:]]
    log = (tmp_path / "stderr.txt").open("wb")  # a file, not a pipe: debug logs must not fill a buffer
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        assert process.stdin is not None
        # As a client does: wait for the initialize reply before sending anything else (pipelining them
        # raced inside the SDK: 2 runs in 10 lost the tools/call reply).
        process.stdin.write((json.dumps(messages[0]) + "\n").encode())
        process.stdin.flush()
        lines = read_replies(process, 1, STARTUP_S)
        process.stdin.write("".join(json.dumps(m) + "\n" for m in messages[1:]).encode())
        process.stdin.flush()
        lines += read_replies(process, 1, CALL_S)
        rest, _ = process.communicate(timeout=30)  # closes stdin: the server must exit cleanly
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
        log.close()
    replies = [json.loads(line) for line in [*lines, *rest.splitlines()]]
    assert [r.get("id") for r in replies] == [1, 2]
    assert replies[0]["result"]["serverInfo"]["name"] == "mergelens"
    assert replies[1]["result"]["isError"] is True
    assert "outside the allowed roots" in replies[1]["result"]["content"][0]["text"]
    logged = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert process.returncode == 0, logged[-2000:]
    assert "DEBUG" in logged, "--verbose logs go to stderr"
