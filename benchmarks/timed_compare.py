"""`python -m benchmarks.timed_compare ARGS`: `mergelens ARGS` with cheap counters on the stream's jobs.

Runs the CLI's own `main` in this process after wrapping four functions of whichever `mergelens_mcp` is first
on the path (the code under test: the benchmark can put an older revision there): each tensor set's
elementwise pass and SVD job (`stream._elementwise`, `stream._svd`) and, inside the SVDs, the rounding of
task vectors to bfloat16 and the final float32 product (`spectral._low_precision`, `spectral._times`). Each
wrapper reads the thread's CPU clock and the wall clock twice, a few microseconds for a job of tens of
milliseconds; no profiler runs. At exit the counters are written as JSON to the file named by
MERGELENS_BENCH_COUNTERS.

Reading has no counter of its own: the tensors are mapped files, so their bytes are read by page faults inside
the jobs. A job's wall time beyond its CPU time is time its thread waited: for a page the disk had not yet
delivered, or for a core another process held.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mergelens_mcp import cli
from mergelens_mcp.analysis import spectral, stream

_LOCK = threading.Lock()
COUNTERS: dict[str, list[float]] = {}  # name -> [calls, thread CPU seconds, wall seconds]


def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            with _LOCK:
                entry = COUNTERS.setdefault(name, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += cpu
                entry[2] += wall

    return wrapper


def install() -> None:
    stream._elementwise = counted("elementwise", stream._elementwise)
    stream._svd = counted("svd", stream._svd)
    spectral._low_precision = counted("svd: rounding task vectors to bf16", spectral._low_precision)
    spectral._times = counted("svd: final float32 product", spectral._times)
    if hasattr(stream, "_subspace"):  # issue 19's second round: the final products of most SVDs are in the pass
        # the iterations run as jobs of their own, or inside a pass that found them not started (then counted
        # in both), and the pass's products (`spectral.project`) are part of the elementwise pass's CPU
        stream._subspace = counted("svd: bf16 iterations (own job or inside the pass)", stream._subspace)
        spectral.project = counted("elementwise: svd final products", spectral.project)


def main(argv: list[str]) -> int:
    install()
    started = time.perf_counter()
    code = cli.main(argv)
    out = os.environ.get("MERGELENS_BENCH_COUNTERS")
    if out:
        usage = os.times()
        figures = {"counters": COUNTERS, "wall_s": time.perf_counter() - started,
                   "process_cpu_s": usage.user + usage.system}
        with open(out, "w") as fh:
            json.dump(figures, fh, indent=2)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
