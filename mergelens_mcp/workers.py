"""The sandbox: analyses run in killable, memory-capped worker processes owned by the server (or the CLI).

A `WorkerPool` holds up to `size` slots; each slot is a one-process `concurrent.futures.ProcessPoolExecutor`
started from the `forkserver` context (the fork server preloads `mergelens_mcp.service`, so a new worker is a
cheap fork, never a second import of torch). A job is a picklable callable and its arguments, in practice
`service.compare`, `service.diagnose` or `report.write_report`; only the result (a pydantic model) crosses
back. Workers are reused from job to job, so a job pays no start-up cost.

While a job runs, the calling thread (the server's worker thread) polls three things every `POLL_S`:
- the slot's progress queue, whose messages it hands to the caller's `progress`;
- the caller's `cancelled()`, on which it kills the worker (SIGKILL) and raises `AnalysisCancelledError`;
- the worker's anonymous resident memory and CPU time (from /proc), over the caps it kills the worker and
  raises `LimitExceededError`. Anonymous memory, not `RLIMIT_AS`: the checkpoints are memory-mapped, and a
  70B model maps 140 GB of address space that costs no RAM, so an address-space cap would refuse it.

A worker that dies on its own (SIGBUS when a mapped file is truncated or replaced under it, the kernel's OOM
killer, a native crash) fails only its own job, with a `WorkerCrashedError` naming the cause; its slot is
replaced, and the other slots, the server and its cache never notice. Each worker records fatal signals with
`faulthandler` in a file of its own, which is how the cause is known; workers offer themselves first to the
OOM killer, and end as soon as the process that owns them is gone (a pidfd watch: their parent is the fork
server, which they keep alive, so PR_SET_PDEATHSIG would never fire).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing
import os
import queue
import select
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from .errors import AnalysisCancelledError, LimitExceededError, MergeLensError
from .security.redact import registered_secrets

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int, int, str], None]
Cancelled = Callable[[], bool]

POLL_S = 0.05  # how often a running job's progress, cancel flag, memory and CPU time are looked at
START_TIMEOUT_S = 120.0  # a new worker's first answer (the fork server imports torch once, on a busy machine)
EXIT_TIMEOUT_S = 5.0  # how long a killed worker may take to be reaped
PRELOAD = ["mergelens_mcp.service"]
CAUSES = {  # faulthandler's first line -> what it most likely means for an analysis
    "Bus error": "the file changed while it was read (truncated or replaced on disk: SIGBUS)",
    "Segmentation fault": "a native crash (SIGSEGV) in the tensor code",
    "Aborted": "a native abort (SIGABRT) in the tensor code",
    "Floating point exception": "a native crash (SIGFPE) in the tensor code",
    "Illegal instruction": "a native crash (SIGILL): torch was built for another CPU",
}
KILLED = (
    "the worker was killed from outside (SIGKILL), most likely by the kernel for running out of memory; raise "
    "the machine's memory, lower MERGELENS_WORKER_MEMORY_MB so the worker stops cleanly, or compare fewer models"
)


class WorkerCrashedError(MergeLensError):
    """A worker process died during a job (SIGBUS, out of memory, a native crash); only that job failed."""


_progress_queue: Any = None  # in a worker: the slot's progress queue


def _initialise(progress_queue: Any, fault_file: str, owner: int) -> None:
    """Run once in each new worker: progress channel, fault record, the signals it must not take, and a watch
    on the process that owns it."""
    global _progress_queue
    _progress_queue = progress_queue
    faulthandler.enable(open(fault_file, "w"), all_threads=False)  # noqa: SIM115 (open for the process' life)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which kills us
    threading.Thread(target=_die_with, args=(owner,), name="mergelens-owner-watch", daemon=True).start()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")  # under memory pressure the kernel kills a worker, never the server
    __import__(PRELOAD[0])


def _die_with(owner: int) -> None:
    """End this worker as soon as `owner` (the server or CLI) is gone, even if it was SIGKILLed. Its parent is
    the fork server, which the workers keep alive in turn, so PR_SET_PDEATHSIG would never fire."""
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): look once a second
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
    select.select([pidfd], [], [])  # readable once the owner has exited
    os._exit(1)


def _ready() -> int:
    return os.getpid()


def _call(
    job: int, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], report: bool,
    environ: dict[str, str], secrets: list[str],
) -> T:
    """In the worker: run `fn` in the caller's environment (HF_TOKEN, HF_HUB_CACHE, ... as the parent has them
    now) and with its registered secrets redacted, sending its progress to the parent when the parent listens."""
    from .security import redact

    if environ != os.environ:
        os.environ.clear()
        os.environ.update(environ)
    for secret in secrets:
        redact.register_secret(secret)
    if report:
        def progress(done: int, total: int, message: str) -> None:
            _progress_queue.put((job, done, total, message))

        kwargs = {**kwargs, "progress": progress}
    try:
        return fn(*args, **kwargs)
    except MemoryError:
        raise LimitExceededError(
            "out of memory in the analysis worker; raise MERGELENS_WORKER_MEMORY_MB or compare fewer or smaller "
            "models"
        ) from None


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class _Slot:
    """One worker process: a one-process executor, its progress queue and its fault record."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, cancelled: Cancelled | None) -> None:
        fd, self.fault_file = tempfile.mkstemp(prefix="mergelens-worker-", suffix=".fault")
        os.close(fd)
        self.queue = ctx.Queue()
        self.executor = ProcessPoolExecutor(1, mp_context=ctx, initializer=_initialise,
                                            initargs=(self.queue, self.fault_file, os.getpid()))
        self.pid = 0
        try:
            started = self.executor.submit(_ready)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not wait_futures([started], POLL_S).done:
                if cancelled is not None and cancelled():
                    raise AnalysisCancelledError("cancelled while an analysis worker was starting")
                if time.monotonic() > deadline:
                    raise WorkerCrashedError(
                        f"the analysis worker did not start within {START_TIMEOUT_S:.0f} s; the machine is "
                        "overloaded or short of memory"
                    )
            self.pid = started.result()
        except BrokenProcessPool:
            self.close()
            raise WorkerCrashedError("the analysis worker died while starting: " + self.cause()) from None
        except BaseException:
            self.close()
            raise

    def cause(self) -> str:
        """Why the worker died, from its fault record (empty: it was killed)."""
        try:
            text = Path(self.fault_file).read_text(errors="replace")
        except OSError:
            text = ""
        for signal_name, cause in CAUSES.items():  # threads faulting at once may interleave their records
            if f"Fatal Python error: {signal_name}" in text or (signal_name in text and "Fatal Python error" in text):
                return cause
        if "Fatal Python error" in text:
            return "a native crash in the tensor code"
        return KILLED

    def usage(self) -> tuple[int, float] | None:
        """Anonymous resident bytes and CPU seconds of the worker, or None where /proc cannot tell."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        anon = 0
        for line in status.splitlines():
            if line.startswith(("RssAnon:", "VmSwap:")):
                anon += int(line.split()[1]) * 1024
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return anon, cpu

    def kill(self) -> None:
        """SIGKILL the worker and wait (bounded) until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self.pid:
            self.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.queue.close()
        self.queue.cancel_join_thread()
        with contextlib.suppress(OSError):
            os.unlink(self.fault_file)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead and not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


class WorkerPool:
    """Up to `size` reusable worker processes, each held to `memory_bytes` of anonymous memory and
    `cpu_seconds` of CPU time per job (None: no cap). Thread-safe: each `run` takes a free slot."""

    def __init__(self, size: int, memory_bytes: int | None = None, cpu_seconds: float | None = None) -> None:
        self.size = size
        self.memory_bytes = memory_bytes
        self.cpu_seconds = cpu_seconds
        self._ctx = _context()
        self._idle: list[_Slot] = []
        self._busy: set[_Slot] = set()
        self._free = threading.Semaphore(size)
        self._lock = threading.Lock()
        self._jobs = 0

    @classmethod
    def from_settings(cls, settings: Any, size: int | None = None) -> WorkerPool:
        memory = settings.worker_memory_mb
        return cls(size or settings.workers, None if memory is None else memory * 2**20,
                   settings.worker_cpu_seconds)

    def pids(self) -> list[int]:
        """The worker processes alive now (idle or busy)."""
        with self._lock:
            return [s.pid for s in [*self._idle, *self._busy]]

    def run(
        self, fn: Callable[..., T], *args: Any, progress: Progress | None = None,
        cancelled: Cancelled | None = None, about: Mapping[str, str] | None = None, **kwargs: Any,
    ) -> T:
        """`fn(*args, **kwargs)` in a worker process; `progress` (when given) receives the job's progress, and
        `cancelled()` turning true kills the worker. `about` (label -> model) names what the job reads, so
        that a crash names the model whose files changed."""
        while not self._free.acquire(timeout=POLL_S):
            if cancelled is not None and cancelled():
                raise AnalysisCancelledError("cancelled while waiting for a free analysis worker")
        try:
            slot = self._take(cancelled)
            with self._lock:
                self._jobs += 1
                job = self._jobs
            try:
                submitted = slot.executor.submit(_call, job, fn, args, kwargs, progress is not None,
                                                 dict(os.environ), registered_secrets())
                result = self._watch(slot, job, submitted, progress, cancelled)
            except BaseException as exc:
                if isinstance(exc, WorkerCrashedError) or not self._reusable(slot, exc):
                    self._discard(slot)
                    if isinstance(exc, WorkerCrashedError) and about:
                        raise WorkerCrashedError(_named(about, str(exc), kwargs.get("guard"))) from None
                else:
                    self._give_back(slot)
                raise
            self._give_back(slot)
            return result
        finally:
            self._free.release()

    def _take(self, cancelled: Cancelled | None) -> _Slot:
        with self._lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            slot = _Slot(self._ctx, cancelled)
        with self._lock:
            self._busy.add(slot)
        return slot

    @staticmethod
    def _reusable(slot: _Slot, exc: BaseException) -> bool:
        """After an ordinary error raised by the job the worker is fine; after a kill or a crash it is not."""
        return isinstance(exc, MergeLensError) and not isinstance(exc, AnalysisCancelledError) and _alive(slot.pid)

    def _watch(
        self, slot: _Slot, job: int, future: Future[T], progress: Progress | None, cancelled: Cancelled | None
    ) -> T:
        start = slot.usage()
        while not wait_futures([future], POLL_S).done:
            self._forward(slot, job, progress)
            if cancelled is not None and cancelled():
                slot.kill()
                raise AnalysisCancelledError("analysis cancelled; its worker process was stopped")
            self._check_usage(slot, start)
        self._forward(slot, job, progress)
        try:
            return future.result()
        except BrokenProcessPool:
            slot.kill()  # already dead: make sure it is reaped before its cause is read
            raise WorkerCrashedError(f"the analysis worker died: {slot.cause()}") from None

    def _check_usage(self, slot: _Slot, start: tuple[int, float] | None) -> None:
        now = slot.usage()
        if now is None:
            return
        anon, cpu = now
        if self.memory_bytes is not None and anon > self.memory_bytes:
            slot.kill()
            raise LimitExceededError(
                f"out of memory: the analysis needed over {self.memory_bytes / 2**20:,.0f} MB (the worker "
                "memory cap) and was stopped; raise the memory cap (MERGELENS_WORKER_MEMORY_MB) or compare fewer "
                "or smaller models"
            )
        used = cpu - (start[1] if start else 0.0)
        if self.cpu_seconds is not None and used > self.cpu_seconds:
            slot.kill()
            raise LimitExceededError(
                f"the analysis used over {self.cpu_seconds:,.0f} CPU seconds (the worker CPU cap) and was stopped; "
                "raise MERGELENS_WORKER_CPU_SECONDS for large trusted checkpoints"
            )

    @staticmethod
    def _forward(slot: _Slot, job: int, progress: Progress | None) -> None:
        """Hand this job's progress messages that arrived so far to the caller, in order."""
        while True:
            try:
                message = slot.queue.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                return
            if message[0] == job and progress is not None:
                progress(*message[1:])

    def _give_back(self, slot: _Slot) -> None:
        with self._lock:
            self._busy.discard(slot)
            self._idle.append(slot)

    def _discard(self, slot: _Slot) -> None:
        with self._lock:
            self._busy.discard(slot)
        slot.close()

    def close(self) -> None:
        """Kill every worker now (running jobs fail); a later `run` starts fresh workers."""
        with self._lock:
            slots = [*self._idle, *self._busy]
            self._idle.clear()
        for slot in slots:
            slot.kill()
        for slot in slots:
            if slot not in self._busy:
                slot.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_pool(settings: Any, size: int | None = None) -> WorkerPool | None:
    """The sandbox the settings ask for: a pool of worker processes, or None where `worker_processes` is off
    (MERGELENS_WORKER_PROCESSES=0) and analyses run in the caller's thread (`run_isolated`)."""
    return WorkerPool.from_settings(settings, size) if settings.worker_processes else None


def run_isolated(
    pool: WorkerPool | None, fn: Callable[..., T], *args: Any, progress: Progress | None = None,
    cancelled: Cancelled | None = None, about: Mapping[str, str] | None = None, **kwargs: Any,
) -> T:
    """`fn(*args, **kwargs)` in one of `pool`'s worker processes (`WorkerPool.run`), or, without a pool, in
    this thread, `progress` and `cancelled` (where given) passed to `fn` as keywords."""
    if pool is None:
        if progress is not None:
            kwargs["progress"] = progress
        if cancelled is not None:
            kwargs["cancelled"] = cancelled
        return fn(*args, **kwargs)
    return pool.run(fn, *args, progress=progress, cancelled=cancelled, about=about, **kwargs)


def _named(about: Mapping[str, str], problem: str, guard: Any) -> str:
    """The crash message with the models the job read. A local model whose files no longer match their headers
    (what a truncation or a copy over it leaves) is named as the one that changed; the guard of the request
    applies, and Hub ids are not looked up again."""
    from .analysis.loading import load_checkpoint
    from .security.paths import shown

    changed = []
    for label, source in about.items():
        if not os.path.exists(source):
            continue
        try:
            load_checkpoint(source, label, guard=guard).close()
        except MergeLensError:
            changed.append(f"{label} ({shown(source)})")
    if changed:
        return (f"{' and '.join(changed)} changed on disk while it was read, and {problem}; run the call again "
                "once the files stop changing")
    models = ", ".join(f"{label} ({shown(source)})" for label, source in about.items())
    return f"analysing {models}: {problem}"
