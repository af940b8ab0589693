"""The sandbox (workers.py): analyses in reusable worker processes that a cancel, a cap or a crash ends
without touching the caller."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.checkpoints import Shape, make_checkpoint, make_finetune
from mergelens_mcp import cli, service
from mergelens_mcp.errors import AnalysisCancelledError, LimitExceededError
from mergelens_mcp.settings import Settings
from mergelens_mcp.workers import WorkerCrashedError, WorkerPool, _alive

# big enough that an analysis is still reading tensors well after its first progress message
MEDIUM = Shape(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=1024, vocab=2048)
KILL_BOUND_S = 1.0


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("medium")
    return {
        "base": make_checkpoint(root / "base", MEDIUM, 0),
        "a": make_finetune(root / "a", MEDIUM, 0, task_seed=1),
        "b": make_finetune(root / "b", MEDIUM, 0, task_seed=2),
    }


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(1) as shared:
        yield shared


def settings_for(*folders: Path) -> Settings:
    return Settings(allowed_roots=list(folders), include_hf_cache=False, device="cpu")


def test_a_job_runs_in_a_reused_worker_and_forwards_every_progress_message_in_order(
    pool: WorkerPool, medium: dict[str, Path]
) -> None:
    settings = settings_for(medium["a"].parent)
    models, base = [str(medium["a"]), str(medium["b"])], str(medium["base"])
    seen: list[int] = []
    first = pool.run(service.compare, models, base, settings=settings, guard=settings.guard(),
                     progress=lambda done, total, message: seen.append(done))
    pid = pool.pids()
    again = pool.run(service.compare, models, base, settings=settings, guard=settings.guard())
    here = service.compare(models, base, settings=settings)
    assert pid == pool.pids() and pid[0] != os.getpid()
    assert seen == list(range(1, len(MEDIUM.tensor_shapes()) + 1))
    assert first.mci.score == again.mci.score == here.mci.score
    assert first.layer_metrics == here.layer_metrics


def test_cancelling_a_job_kills_its_worker_within_a_second_and_the_next_job_gets_a_fresh_one(
    pool: WorkerPool, medium: dict[str, Path]
) -> None:
    settings = settings_for(medium["a"].parent)
    pool.run(service.labelled, ["x", "y"], None)  # a worker is up before the clock starts
    (pid,) = pool.pids()
    flag = threading.Event()
    raised: list[float] = []

    def progress(done: int, total: int, message: str) -> None:
        if not flag.is_set():
            raised.append(time.monotonic())
            flag.set()

    with pytest.raises(AnalysisCancelledError, match="worker process was stopped"):
        pool.run(service.compare, [str(medium["a"]), str(medium["b"])], str(medium["base"]), settings=settings,
                 guard=settings.guard(), progress=progress, cancelled=flag.is_set)
    gone = time.monotonic()
    assert not _alive(pid)
    assert gone - raised[0] < KILL_BOUND_S
    assert pool.pids() == []
    assert pool.run(service.labelled, ["x", "y"], "z") == {"x": "x", "y": "y", "base": "z"}  # models named by folder
    assert pool.pids() != [pid]


def test_a_model_truncated_mid_analysis_is_a_clear_error_naming_it_and_the_pool_keeps_working(
    pool: WorkerPool, tmp_path: Path, medium: dict[str, Path]
) -> None:
    victim = make_finetune(tmp_path / "victim", MEDIUM, 0, task_seed=3)
    settings = settings_for(tmp_path, medium["a"].parent)
    models, base = [str(medium["a"]), str(victim)], str(medium["base"])

    def truncate(done: int, total: int, message: str) -> None:
        if done == 1:  # every tensor after the first still has to be read from the mapped file
            os.truncate(victim / "model.safetensors", 4096)

    with pytest.raises(WorkerCrashedError) as caught:
        pool.run(service.compare, models, base, settings=settings, guard=settings.guard(), progress=truncate,
                 about=service.labelled(models, base))
    message = str(caught.value)
    assert message.startswith(f"victim ({str(victim)!r}) changed on disk while it was read")
    assert "the file changed while it was read (truncated or replaced on disk: SIGBUS)" in message
    intact = pool.run(service.compare, [str(medium["a"]), str(medium["b"])], base, settings=settings,
                      guard=settings.guard())
    assert intact.mci.score is not None


@pytest.mark.parametrize(("sent", "cause"), [
    (signal.SIGSEGV, "a native crash (SIGSEGV)"),
    (signal.SIGBUS, "the file changed while it was read"),
    (signal.SIGKILL, "most likely by the kernel for running out of memory"),
])
def test_a_worker_that_dies_fails_only_its_job_with_the_likely_cause(
    pool: WorkerPool, sent: signal.Signals, cause: str
) -> None:
    pool.run(service.labelled, ["x", "y"], None)
    (pid,) = pool.pids()
    with pytest.raises(WorkerCrashedError, match="the analysis worker died") as caught:
        pool.run(os.kill, pid, sent, about={"model_a": "org/not-a-local-path"})
    assert cause in str(caught.value) and "model_a ('org/not-a-local-path')" in str(caught.value)
    assert not _alive(pid)
    assert pool.run(service.labelled, ["x", "y"], None) == {"x": "x", "y": "y"}


def test_a_worker_over_its_memory_cap_is_stopped_with_an_out_of_memory_error(medium: dict[str, Path]) -> None:
    settings = settings_for(medium["a"].parent)
    with WorkerPool(1, memory_bytes=16 * 2**20) as small:  # a worker with torch loaded holds far more
        with pytest.raises(LimitExceededError, match=r"out of memory: .* 16 MB .*MERGELENS_WORKER_MEMORY_MB"):
            small.run(service.compare, [str(medium["a"]), str(medium["b"])], str(medium["base"]),
                      settings=settings, guard=settings.guard())
        assert small.pids() == []


def test_a_worker_over_its_cpu_time_cap_is_stopped(medium: dict[str, Path]) -> None:
    settings = settings_for(medium["a"].parent)
    with WorkerPool(1, cpu_seconds=0.01) as small:
        small.run(service.labelled, ["x", "y"], None)  # start-up time is not the job's
        with pytest.raises(LimitExceededError, match="over 0 CPU seconds.*MERGELENS_WORKER_CPU_SECONDS"):
            small.run(service.compare, [str(medium["a"]), str(medium["b"])], str(medium["base"]),
                      settings=settings, guard=settings.guard())


def test_an_error_raised_by_the_job_keeps_its_class_and_message_and_the_worker(pool: WorkerPool) -> None:
    pool.run(service.labelled, ["x", "y"], None)
    before = pool.pids()
    with pytest.raises(Exception, match="compare needs at least two models") as caught:
        pool.run(service.compare, ["only-one"])
    assert type(caught.value).__name__ == "InputError"
    assert pool.pids() == before


def test_the_cli_turns_a_model_truncated_mid_read_into_exit_2_with_a_clear_message(
    tmp_path: Path, medium: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = make_finetune(tmp_path / "victim", MEDIUM, 0, task_seed=4)
    real = cli._with_progress

    def truncating(console, label, job):  # type: ignore[no-untyped-def]
        def progress(done: int, total: int, message: str) -> None:
            if done == 1:
                os.truncate(victim / "model.safetensors", 4096)

        return real(console, label, lambda _: job(progress))

    monkeypatch.setattr(cli, "_with_progress", truncating)
    monkeypatch.setenv("COLUMNS", "1000")
    code = cli.main(["compare", str(medium["a"]), str(victim), "--base", str(medium["base"]), "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == cli.EXIT_BAD_INPUT
    assert f"victim ({str(victim)!r}) changed on disk while it was read" in err
    assert "SIGBUS" in err


def test_workers_end_when_the_process_that_owns_them_is_killed() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "from mergelens_mcp import service\n"
        "from mergelens_mcp.workers import WorkerPool\n"
        "if __name__ == '__main__':\n"
        "    pool = WorkerPool(1)\n"
        "    pool.run(service.labelled, ['x', 'y'], None)\n"
        "    print(pool.pids()[0], flush=True)\n"
        "    sys.stdin.read()\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(owner.stdout.readline())  # type: ignore[union-attr]
        assert _alive(worker)
        owner.kill()  # no cleanup runs: SIGKILL
        owner.wait(timeout=30)
        killed = time.monotonic()
        while _alive(worker) and time.monotonic() - killed < 30:
            time.sleep(0.01)
        assert not _alive(worker) and time.monotonic() - killed < 2.0
    finally:
        owner.kill()
        owner.wait(timeout=30)
