"""What every tool shares: the server's state, the worker-thread runner and the analysis cache."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from mcp import types
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.message import ServerMessageMetadata

from .. import service
from ..analysis.types import Cancelled, Progress
from ..errors import AnalysisCancelledError, MergeLensError
from ..models import CompareResult
from ..security.paths import PathGuard
from ..security.redact import redact
from ..settings import Settings
from ..workers import WorkerPool, run_isolated, worker_pool

log = logging.getLogger(__name__)

T = TypeVar("T")
CANCEL_GRACE_S = 30.0  # how long a cancelled call waits for its worker to stop at the next tensor
ROOTS_TIMEOUT_S = 10.0  # how long the server waits for the client's roots/list answer
GATE_POLL_S = 0.2  # how often a call waiting for an identical analysis checks whether it was cancelled


class AnalysisCache:
    """A bounded, thread-safe LRU of comparison results, keyed by `service.fingerprint`. Calls that ask for
    the same analysis at once (an assistant calling two tools in parallel) wait for the first one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, CompareResult] = OrderedDict()
        self._lock = threading.Lock()
        self._gates: dict[Hashable, tuple[threading.Lock, int]] = {}  # key -> (lock, callers using it)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> CompareResult | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], CompareResult], cancelled: Cancelled
    ) -> tuple[CompareResult, bool]:
        """The result for `key` and whether it was cached; `compute()` runs at most once per key at a time,
        and a caller waiting for it still stops when `cancelled()`."""
        found = self.get(key)
        if found is not None:
            return found, True
        with self._lock:
            gate, users = self._gates.get(key, (threading.Lock(), 0))
            self._gates[key] = (gate, users + 1)
        try:
            while not gate.acquire(timeout=GATE_POLL_S):
                if cancelled():
                    raise AnalysisCancelledError("cancelled while an identical analysis was running")
            try:
                with self._lock:
                    found = self._items.get(key)
                if found is not None:
                    with self._lock:
                        self.hits += 1
                    return found, True
                result = compute()
                self.put(key, result)
                return result, False
            finally:
                gate.release()
        finally:
            with self._lock:
                gate, users = self._gates[key]
                if users == 1:
                    del self._gates[key]
                else:
                    self._gates[key] = (gate, users - 1)

    def put(self, key: Hashable, result: CompareResult) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class AppState:
    """The server's lifespan state, shared by every session and request."""

    settings: Settings
    guard: PathGuard
    limiter: anyio.CapacityLimiter
    cache: AnalysisCache
    pool: WorkerPool | None = None  # the sandbox; None runs analyses in threads (settings.worker_processes)

    @classmethod
    def create(cls, settings: Settings) -> AppState:
        pool = worker_pool(settings)
        return cls(settings, settings.guard(), anyio.CapacityLimiter(settings.workers),
                   AnalysisCache(settings.cache_size), pool)

    def isolated(self, fn: Callable[..., T], *args: Any, progress: Progress | None = None,
                 cancelled: Cancelled | None = None, about: dict[str, str] | None = None, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in one of the server's worker processes (killed when `cancelled()`), or in
        this thread when the settings turn worker processes off. Call it from a worker thread."""
        return run_isolated(self.pool, fn, *args, progress=progress, cancelled=cancelled, about=about, **kwargs)


AppContext = Context[AppState, Any]
Job = Callable[[Progress, Cancelled], T]


def state_of(ctx: AppContext) -> AppState:
    return ctx.request_context.lifespan_context


async def run_in_worker(ctx: AppContext, job: Job[T]) -> T:
    """Run `job(progress, cancelled)` in a worker thread behind the server's capacity limiter.

    Progress is forwarded to the client as MCP progress notifications. When the client cancels, the
    `cancelled` flag is raised, the job stops at its next tensor, and the call waits (bounded) for the
    thread to finish so the slot is really free. `MergeLensError`s become `ToolError`s, whose text the
    model sees; anything else stays a bare error and its text stays on the server.
    """
    stop = threading.Event()
    finished = threading.Event()

    def progress(done: int, total: int, message: str) -> None:
        if not stop.is_set():  # tensor names come from untrusted headers: redacted like every other output
            anyio.from_thread.run(ctx.report_progress, done, total, redact(message))

    def work() -> T:
        try:
            return job(progress, stop.is_set)
        finally:
            finished.set()

    async with state_of(ctx).limiter:
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            stop.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait, CANCEL_GRACE_S)
            raise
        except MergeLensError as exc:
            raise ToolError(redact(str(exc))) from exc


async def guard_for(ctx: AppContext) -> PathGuard:
    """The server's path guard, narrowed to the client's MCP roots when the client declares any.

    Roots only ever narrow access (`PathGuard.restrict`): they say what the client means to share, never a
    grant. A client that declares roots but whose roots cannot be listed gets a ToolError (fail closed),
    except on a connection that cannot carry server-to-client requests at all (the server's roots apply).
    An empty list means the client has no roots configured, not that it shares nothing: the server's roots
    apply, as they do for a client that declares no roots.
    """
    state = state_of(ctx)
    session = ctx.session
    capabilities = session.client_capabilities
    if capabilities is None or capabilities.roots is None:
        return state.guard
    if not session.can_send_request:
        log.info("the client declared roots but this connection cannot ask for them; server roots apply")
        return state.guard
    try:
        with anyio.fail_after(ROOTS_TIMEOUT_S):
            listed = await session.send_request(
                types.ListRootsRequest(), types.ListRootsResult,
                metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
            )
    except Exception as exc:  # a client that cannot answer roots/list in time
        raise ToolError(
            f"the client declared MCP roots but did not list them ({type(exc).__name__}); fix the client's "
            "roots support or connect without declaring roots"
        ) from None
    if not listed.roots:  # generic clients (the MCP Inspector) declare the capability and list nothing
        log.info("the client declared MCP roots but listed none; the server's allowed roots apply")
        return state.guard
    return state.guard.restrict(str(root.uri) for root in listed.roots)


async def analyse(
    ctx: AppContext, models: Sequence[str], base: str | None, read_base: bool = False
) -> tuple[CompareResult, bool]:
    """The comparison of `models` (against `base`; `read_base`: see service.compare), from the cache when the
    files have not changed. Returns the result and whether it came from the cache."""
    state = state_of(ctx)
    sources = list(models)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> tuple[CompareResult, bool]:
        options = state.settings.analysis_options(read_base=read_base)  # the server's device, checked first
        with ExitStack() as stack:  # each header is read once, here: the worker gets the tables keyed
            opened, base_ckpt = service.open_checkpoints(sources, base, state.settings, guard, stack)
            key = service.fingerprint(opened, base_ckpt, options, state.settings)
            return state.cache.get_or_compute(key, lambda: state.isolated(
                service.compare_keyed, opened, base_ckpt, options, state.settings, key, progress=progress,
                cancelled=cancelled, about=service.labelled(sources, base),
            ), cancelled)

    return await run_in_worker(ctx, job)
