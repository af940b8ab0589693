"""`mergelens serve` as a real subprocess, over stdio, streamable HTTP and SSE, called by mcp's `Client`."""

from __future__ import annotations

import os
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
            pytest.fail(f"the server exited with {process.returncode}: {err.decode(errors='replace')[-2000:]}")
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
    assert len(tools.tools) == 7
    result = await client.call_tool("compare_models", args)
    assert not result.is_error, result.content
    return result.structured_content


def assert_flipped_answer(out: dict[str, Any]) -> None:
    assert out["verdict"] in ("compatible", "risky") and 0 < out["score"] < 100
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
