"""The sandbox, redaction and load guarantees held through a real MCP client (mcp's in-process `Client`)."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import huggingface_hub
import pytest
from mcp import Client, types
from mcp.server.mcpserver import MCPServer

from fixtures.hostile import Sandbox, tiny_model
from mergelens_mcp import service
from mergelens_mcp.errors import AnalysisCancelledError
from mergelens_mcp.security import redact as redaction
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools.runtime import AppState

TIMEOUT_S = 120
HF_TOKEN = "hf_" + "Pl4nt3dT0k3n" * 3
API_KEY = "planted-api-key-" + "9f8e7d6c" * 3


def make_server(sandbox: Sandbox, **changes: Any) -> MCPServer[AppState]:
    settings = Settings(
        allowed_roots=[sandbox.root], include_hf_cache=False, output_dir=sandbox.root / "reports", **changes
    )
    return build_server(settings)


async def call(client: Client, tool: str, arguments: dict[str, Any], **kwargs: Any) -> Any:
    with anyio.fail_after(TIMEOUT_S):
        return await client.call_tool(tool, arguments, **kwargs)


def error_text(result: Any) -> str:
    assert result.is_error, result.structured_content
    return " ".join(c.text for c in result.content)


def pair(sandbox: Sandbox, first: Path | str, second: Path | str | None = None) -> dict[str, Any]:
    return {"models": [str(first), str(second or sandbox.model_b)]}


async def test_traversal_symlink_tilde_nul_fifo_and_hub_tricks_through_the_client_are_refused(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads: list[object] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(a))
    monkeypatch.setenv("HOME", str(sandbox.outside))
    monkeypatch.chdir(sandbox.root)
    (sandbox.root / "innocent").symlink_to(sandbox.secret_model, target_is_directory=True)
    (sandbox.root / "linked").mkdir()
    (sandbox.root / "linked" / "model.safetensors").symlink_to(sandbox.secret_model / "model.safetensors")
    os.mkfifo(sandbox.root / "pipe.safetensors")
    attempts = {
        f"{sandbox.root}/../outside/secret_model": "outside the allowed roots",
        "../outside/secret_model": "outside the allowed roots",
        str(sandbox.secret_model): "outside the allowed roots",
        str(sandbox.root / "innocent"): "outside the allowed roots",
        str(sandbox.root / "linked"): "outside the allowed roots",
        "~/secret_model": "outside the allowed roots",
        "/etc/passwd": "outside the allowed roots",
        f"{sandbox.model_a}\x00/../../outside": "NUL byte",
        str(sandbox.root / "pipe.safetensors"): "FIFO",
        "org/model@../../x": "revision",
        "org/../model": "neither an existing path nor a Hugging Face Hub id",
        "org/model": "Hugging Face cache",
    }
    async with Client(make_server(sandbox)) as client:
        for attempt, expected in attempts.items():
            result = await call(client, "compare_models", pair(sandbox, sandbox.model_a, attempt))
            text = error_text(result)
            assert any(e in text for e in expected.split("|")), (attempt, text)
            if "outside" not in attempt:
                assert str(sandbox.outside) not in text, "a refusal must not show where a symlink leads"
        good = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a))
    assert not good.is_error and good.structured_content["score"] is not None
    assert downloads == []


async def test_client_roots_narrow_the_allowed_roots_and_never_widen_them(sandbox: Sandbox) -> None:
    async def roots(_: object) -> types.ListRootsResult:
        return types.ListRootsResult(
            roots=[
                types.Root(uri=sandbox.model_a.as_uri()),
                types.Root(uri=sandbox.outside.as_uri()),
            ]
        )

    async with Client(make_server(sandbox), list_roots_callback=roots, mode="legacy") as client:
        inside = await call(
            client, "get_compatibility_score", pair(sandbox, sandbox.model_a, sandbox.model_a)
        )
        narrowed = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a))
        widened = await call(
            client, "get_compatibility_score", pair(sandbox, sandbox.model_a, sandbox.secret_model)
        )
    assert not inside.is_error and inside.structured_content["score"] == 100.0
    assert "model_b" in error_text(narrowed) and "outside the allowed roots" in error_text(narrowed)
    assert "outside the allowed roots" in error_text(widened)


async def test_a_client_that_lists_no_roots_gets_the_servers_allowed_roots_and_no_more(sandbox: Sandbox) -> None:
    async def none(_: object) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[])

    async with Client(make_server(sandbox), list_roots_callback=none, mode="legacy") as client:
        inside = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a, sandbox.model_a))
        outside = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a, sandbox.secret_model))
    assert not inside.is_error and inside.structured_content["score"] == 100.0
    assert "outside the allowed roots" in error_text(outside)


async def test_a_client_that_declares_roots_but_cannot_list_them_is_refused_not_widened(
    sandbox: Sandbox,
) -> None:
    async def broken(_: object) -> types.ErrorData:
        return types.ErrorData(code=types.INTERNAL_ERROR, message="no roots today")

    async with Client(make_server(sandbox), list_roots_callback=broken, mode="legacy") as client:
        result = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a))
    assert "declared MCP roots but did not list them" in error_text(result)


async def test_reports_stay_in_the_output_folder_and_never_replace_a_file_that_is_not_ours(
    sandbox: Sandbox,
) -> None:
    reports = sandbox.root / "reports"
    reports.mkdir()
    (reports / "notes.html").write_text("my own notes")
    (reports / "escape.html").symlink_to(sandbox.outside / "escaped.html")
    os.mkfifo(reports / "pipe.html")
    args = pair(sandbox, sandbox.model_a)
    async with Client(make_server(sandbox)) as client:
        traversal = await call(client, "generate_report", args | {"filename": "../../outside/x.html"})
        absolute = await call(client, "generate_report", args | {"filename": str(sandbox.outside / "x.html")})
        linked = await call(client, "generate_report", args | {"filename": "escape.html"})
        fifo = await call(client, "generate_report", args | {"filename": "pipe.html"})
        theirs = await call(client, "generate_report", args | {"filename": "notes.html"})
        unchanged = (reports / "notes.html").read_text()
        forced = await call(client, "generate_report", args | {"filename": "notes.html", "overwrite": True})
        ours = await call(client, "generate_report", args | {"filename": "notes.html"})
    assert "not a plain file name" in error_text(traversal) and "not a plain file name" in error_text(
        absolute
    )
    assert (
        "outside the output folder" in error_text(linked) and not (sandbox.outside / "escaped.html").exists()
    )
    assert "not a regular file" in error_text(fifo)
    assert "not a mergelens report" in error_text(theirs) and unchanged == "my own notes"
    assert not forced.is_error and not ours.is_error
    assert forced.structured_content["path"] == str((reports / "notes.html").resolve())
    assert "<html" in (reports / "notes.html").read_text()[:2000].lower()
    assert sorted(p.name for p in sandbox.outside.iterdir()) == ["secret_model"]


@pytest.fixture
def planted(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A token in the environment, in a model path, in a file the server reads, and in a YAML it is given."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("MERGELENS_TEST_API_KEY", API_KEY)
    monkeypatch.setattr(redaction, "_registered", set())
    in_path = tiny_model(sandbox.root / f"ft-{HF_TOKEN}", 4)
    for folder in (in_path, sandbox.model_a, sandbox.model_b):  # one shared, secret-looking architecture name
        config = folder / "config.json"
        config.write_text(config.read_text().replace('"LlamaForCausalLM"', f'"{API_KEY}"'))
    yaml_text = (
        f"# pulled with {HF_TOKEN}\nmerge_method: ties\nbase_model: {sandbox.model_a}\nmodels:\n"
        f"  - model: {in_path}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {sandbox.model_b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {sandbox.root}/missing-{API_KEY}\n"
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    redaction.install([root])
    try:
        yield {"path": in_path, "yaml": yaml_text, "log": stream}
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_a_planted_token_never_appears_in_tool_errors_results_reports_or_logs(
    sandbox: Sandbox, planted: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    outputs: list[str] = []
    args = {"models": [str(planted["path"]), str(sandbox.model_b)], "base_model": str(sandbox.model_a)}
    async with Client(make_server(sandbox)) as client:
        for tool, arguments in [
            ("compare_models", args | {"detail": True}),
            ("get_conflict_zones", args | {"detail": True}),
            ("suggest_strategy", args),
            ("explain_layer", args | {"layer": "layers.1"}),
            ("explain_layer", args | {"layer": f"no-such-layer-{HF_TOKEN}"}),
            ("compare_models", {"models": [f"{sandbox.root}/missing-{API_KEY}", str(sandbox.model_b)]}),
            ("compare_models", {"models": [f"{sandbox.outside}/{HF_TOKEN}", str(sandbox.model_b)]}),
            ("diagnose_merge", {"config": planted["yaml"]}),
            ("generate_report", args | {"filename": "planted.html"}),
        ]:
            result = await call(client, tool, arguments)
            outputs.append(result.model_dump_json())
    html = (sandbox.root / "reports" / "planted.html").read_text()
    captured = capfd.readouterr()
    everything = {
        "results": "\n".join(outputs),
        "report": html,
        "log": planted["log"].getvalue(),
        "stdout": captured.out,
        "stderr": captured.err,
    }
    for name, text in everything.items():
        assert HF_TOKEN not in text and API_KEY not in text, name
    assert everything["results"].count("[REDACTED]") >= 9 and "[REDACTED]" in html
    assert everything["results"].count('"is_error":true') == 3  # the two bad paths and the unknown layer


def gate_first_analysis(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event, list[Any]]:
    """Hold the first analysis after its first tensor until the server raises its cancel flag; record how it
    ended. Returns (started, finished, outcomes)."""
    started, finished = threading.Event(), threading.Event()
    outcomes: list[Any] = []
    real = service.compare_checkpoints

    def gated(*args: Any, progress: Callable[..., None], cancelled: Callable[[], bool], **kwargs: Any) -> Any:
        first = not started.is_set()
        flag = getattr(cancelled, "__self__", None)  # runtime passes the bound is_set of a threading.Event
        assert isinstance(flag, threading.Event)

        def held(done: int, total: int, message: str) -> None:
            if first and done == 1:
                started.set()
            progress(done, total, message)
            if first and done == 1:
                flag.wait(TIMEOUT_S)

        try:
            result = real(*args, progress=held, cancelled=cancelled, **kwargs)
        except BaseException as exc:
            outcomes.append(exc)
            raise
        else:
            outcomes.append(result)
            return result
        finally:
            if first:
                finished.set()

    monkeypatch.setattr(service, "compare_checkpoints", gated)
    return started, finished, outcomes


async def test_cancelling_a_call_mid_analysis_frees_the_only_worker(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, finished, outcomes = gate_first_analysis(monkeypatch)
    args = pair(sandbox, sandbox.model_a)
    async with Client(make_server(sandbox, workers=1, cache_size=0, worker_processes=False)) as client:
        with anyio.CancelScope() as scope:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                if started.is_set():
                    scope.cancel()

            await call(client, "compare_models", args, progress_callback=on_progress)
        assert scope.cancelled_caught
        assert await anyio.to_thread.run_sync(finished.wait, TIMEOUT_S)
        after = await call(client, "get_compatibility_score", args)  # needs the one worker back
    assert isinstance(outcomes[0], AnalysisCancelledError)
    assert not after.is_error and after.structured_content["score"] is not None


async def test_a_client_that_disconnects_mid_analysis_leaves_no_work_running(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, finished, outcomes = gate_first_analysis(monkeypatch)
    server = make_server(sandbox, workers=1, cache_size=0, worker_processes=False)
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:

            async def session() -> None:
                async with Client(server) as client:
                    await client.call_tool("compare_models", pair(sandbox, sandbox.model_a))

            tg.start_soon(session)
            assert await anyio.to_thread.run_sync(started.wait, TIMEOUT_S)
            tg.cancel_scope.cancel()  # the client goes away, its transport with it
    assert await anyio.to_thread.run_sync(finished.wait, TIMEOUT_S)
    assert isinstance(outcomes[0], AnalysisCancelledError)
    async with Client(server) as client:  # the same server, its single worker free again
        after = await call(client, "get_compatibility_score", pair(sandbox, sandbox.model_a))
    assert not after.is_error


def _stable(content: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in content.items() if k not in ("cached", "elapsed_s")}


@pytest.mark.slow
async def test_twenty_concurrent_calls_queue_behind_the_limiter_and_equal_sequential_answers(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_c = tiny_model(sandbox.root / "model_c", 5)
    a, b, c = str(sandbox.model_a), str(sandbox.model_b), str(model_c)
    combos = [
        {"models": [a, b]},
        {"models": [a, c]},
        {"models": [b, c]},
        {"models": [b, c], "base_model": a},
        {"models": [a, b, c]},
    ]
    tools = ["compare_models", "get_compatibility_score", "get_conflict_zones", "suggest_strategy"]
    calls = [(tools[i % len(tools)], combos[i % len(combos)]) for i in range(20)]

    async with Client(make_server(sandbox, cache_size=16)) as client:  # ground truth: one at a time
        expected = [_stable((await call(client, tool, args)).structured_content) for tool, args in calls]

    active = peak = 0
    lock = threading.Lock()
    real = service.compare_checkpoints

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(service, "compare_checkpoints", counted)
    answers: list[Any] = [None] * len(calls)
    async with Client(make_server(sandbox, workers=2, cache_size=0, worker_processes=False)) as client:

        async def one(i: int, tool: str, args: dict[str, Any]) -> None:
            answers[i] = await call(client, tool, args)

        async with anyio.create_task_group() as tg:
            for i, (tool, args) in enumerate(calls):
                tg.start_soon(one, i, tool, args)
    assert all(not r.is_error for r in answers)
    assert [_stable(r.structured_content) for r in answers] == expected
    assert all(r.structured_content["cached"] is False for r in answers)
    assert 1 <= peak <= 2
