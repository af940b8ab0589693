"""The server's sandbox through a real MCP client: a crash, a disconnect or a planted token in a tensor name
stays inside one call."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from mcp import Client

from fixtures.checkpoints import TINY, Shape, make_checkpoint, make_finetune
from fixtures.hostile import Sandbox
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools import TOOL_NAMES, runtime
from mergelens_mcp.tools.runtime import AppState
from mergelens_mcp.workers import _alive

TIMEOUT_S = 120
MEDIUM = Shape(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024, vocab=2048)
HF_TOKEN = "hf_" + "Pl4nt3dT0k3n" * 3


@pytest.fixture
def medium(sandbox: Sandbox) -> dict[str, Path]:
    """Models big enough that an analysis is still reading well after its first progress message."""
    root = sandbox.root
    return {
        "base": make_checkpoint(root / "m_base", MEDIUM, 0),
        "a": make_finetune(root / "m_a", MEDIUM, 0, task_seed=1),
        "b": make_finetune(root / "m_b", MEDIUM, 0, task_seed=2),
        "victim": make_finetune(root / "m_victim", MEDIUM, 0, task_seed=3),
    }


@pytest.fixture
def states(monkeypatch: pytest.MonkeyPatch) -> list[AppState]:
    """The state of every server built in the test (its worker pool and cache)."""
    built: list[AppState] = []
    real = AppState.create.__func__  # type: ignore[attr-defined]

    def create(cls: type[AppState], settings: Settings) -> AppState:
        built.append(real(cls, settings))
        return built[-1]

    monkeypatch.setattr(runtime.AppState, "create", classmethod(create))
    return built


def settings_for(sandbox: Sandbox, **changes: Any) -> Settings:
    return Settings(allowed_roots=[sandbox.root], include_hf_cache=False, device="cpu", **changes)


def args(*models: Path, base: Path | None = None) -> dict[str, Any]:
    return {"models": [str(m) for m in models]} | ({"base_model": str(base)} if base else {})


async def test_a_model_truncated_mid_call_is_a_clear_tool_error_while_another_session_and_tools_list_carry_on(
    sandbox: Sandbox, medium: dict[str, Path]
) -> None:
    server = build_server(settings_for(sandbox, workers=2, cache_size=0))
    victim = medium["victim"] / "model.safetensors"
    results: dict[str, Any] = {}
    other_started = anyio.Event()

    async def truncate(progress: float, total: float | None, message: str | None) -> None:
        if victim.stat().st_size > 4096:
            victim.write_bytes(victim.read_bytes()[:4096])  # cut short in place, as a failed copy leaves it

    async def other_started_now(progress: float, total: float | None, message: str | None) -> None:
        other_started.set()

    async def crashing_session() -> None:
        async with Client(server) as client:
            await other_started.wait()
            results["crash"] = await client.call_tool(
                "compare_models", args(medium["a"], medium["victim"], base=medium["base"]), progress_callback=truncate
            )
            results["listed"] = await client.list_tools()
            results["again"] = await client.call_tool("get_compatibility_score", args(medium["a"], medium["b"]))

    async def other_session() -> None:
        async with Client(server) as client:
            results["other"] = await client.call_tool(
                "compare_models", args(medium["a"], medium["b"], base=medium["base"]),
                progress_callback=other_started_now,
            )

    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_session)
            tg.start_soon(crashing_session)
    text = " ".join(c.text for c in results["crash"].content)
    assert results["crash"].is_error
    assert f"{medium['victim'].name} ({str(medium['victim'])!r}) changed on disk while it was read" in text
    assert "SIGBUS" in text
    assert len(results["listed"].tools) == len(TOOL_NAMES)
    assert not results["other"].is_error and results["other"].structured_content["score"] is not None
    assert not results["again"].is_error and results["again"].structured_content["score"] is not None


async def test_a_client_that_disconnects_mid_call_has_its_worker_killed_within_a_second_and_nothing_cached(
    sandbox: Sandbox, medium: dict[str, Path], states: list[AppState]
) -> None:
    server = build_server(settings_for(sandbox, workers=1, cache_size=16))
    pool = states[0].pool
    assert pool is not None
    reading = threading.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reading.set()

    async def session() -> None:
        async with Client(server) as client:
            await client.call_tool("compare_models", args(medium["a"], medium["b"], base=medium["base"]),
                                   progress_callback=on_progress)

    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(session)
            assert await anyio.to_thread.run_sync(reading.wait, TIMEOUT_S)
            (pid,) = pool.pids()
            tg.cancel_scope.cancel()  # the client goes away, its transport with it
        left = time.monotonic()
        while _alive(pid) and time.monotonic() - left < 10:
            await anyio.sleep(0.01)
        gone = time.monotonic() - left
    assert not _alive(pid) and gone < 1.0
    assert len(states[0].cache) == 0


async def test_a_token_in_a_tensor_name_never_reaches_progress_notifications_or_results(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    planted = {f"model.layers.0.{HF_TOKEN}.weight": torch.ones(4)}
    a = make_checkpoint(sandbox.root / "planted_a", TINY, 1, extra=planted)
    b = make_checkpoint(sandbox.root / "planted_b", TINY, 2, extra=planted)
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(settings_for(sandbox))) as client:
        with anyio.fail_after(TIMEOUT_S):
            result = await client.call_tool("compare_models", args(a, b) | {"detail": True},
                                            progress_callback=on_progress)
    everything = "\n".join(messages) + result.model_dump_json()
    assert not result.is_error
    assert HF_TOKEN not in everything and "hf_Pl4nt3d" not in everything
    assert "model.layers.0.[REDACTED].weight" in messages


def test_stdio_eof_mid_analysis_ends_the_server_and_its_worker_within_2_s(
    sandbox: Sandbox, medium: dict[str, Path]
) -> None:
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "mergelens_mcp", "serve", "--allow-dir", str(sandbox.root)], cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None and process.stdout is not None

    def send(message: dict[str, Any]) -> None:
        process.stdin.write((json.dumps(message) + "\n").encode())  # type: ignore[union-attr]
        process.stdin.flush()  # type: ignore[union-attr]

    def until(predicate: Any) -> dict[str, Any]:
        for line in process.stdout:  # type: ignore[union-attr]  # bounded: the server answers or exits
            message = json.loads(line)
            if predicate(message):
                return message  # type: ignore[no-any-return]
        pytest.fail("the server closed stdout before the expected message")

    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
        until(lambda m: m.get("id") == 1)
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "compare_models", "arguments": args(medium["a"], medium["b"], base=medium["base"]),
            "_meta": {"progressToken": "p"}}})
        until(lambda m: m.get("method") == "notifications/progress")  # a worker is reading tensors
        helpers = descendants(process.pid, deep=False)  # the fork server and multiprocessing's resource tracker
        servers = [pid for pid in helpers if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        workers = [pid for server in servers for pid in descendants(server)]  # forked by the fork server
        closed = time.monotonic()
        process.stdin.close()
        process.wait(timeout=30)
        exited = time.monotonic() - closed
        left = [pid for pid in workers if _alive(pid)]
        while any(_alive(pid) for pid in helpers) and time.monotonic() - closed < 10:
            time.sleep(0.01)  # the idle helpers see their parent's pipes close and exit on their own
    finally:
        process.kill()
        process.wait(timeout=30)
    assert exited < 2.0
    assert len(servers) == 1 and len(workers) == 1
    assert left == []  # the worker that was reading tensors died with the server
    assert not any(_alive(pid) for pid in helpers)


def descendants(pid: int, deep: bool = True) -> list[int]:
    children = [int(p) for task in Path(f"/proc/{pid}/task").iterdir()
                for p in (task / "children").read_text().split()]
    return [*children, *(d for child in children if deep for d in descendants(child))]
