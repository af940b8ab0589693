"""Model zoos: which of these N models should I merge? Each model is read once into a sketch
(analysis/sketch.py); every pair, the clusters and the best sets come from the sketches.

A zoo pair's MCI is the weight-space composite (analysis/score.py) estimated from the sketches, not the predicted
retention that `compare` reports as the MCI of two models: the predictor reads how far each model moved over the
whole model and per layer, which the sketches do not keep, and the composite is what the sketches' accuracy was
measured on (within 2 points of the exact composite on average). `exact_mci` is that composite, computed exactly.

Sketches are cached by content (the files' header hash, size and mtime, the base's, and the sketch
parameters), and so is every pair's estimate (by its two sketches' keys), so adding a model to a zoo of N
costs one read plus N pair computations. Missing sketches
are drawn in a local process pool, or, with `ray`, as Ray tasks (each retried elsewhere when its node is lost;
sketches already cached are never recomputed). Every worker applies the same path guard and limits; a Ray node
narrows the roots to its own MERGELENS_ALLOWED_ROOTS, and each model's task is sent (a soft node affinity) to a
node that sees its files, as one small task per node reports (`place`); a model the driver cannot find is
described by the nodes that can (`describe_models`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ._version import VERSION
from .analysis import score as mci
from .analysis import sketch as sk
from .analysis.layers import classify
from .analysis.loading import Checkpoint, load_checkpoint
from .analysis.types import Cancelled, Progress
from .errors import AnalysisCancelledError, CheckpointNotFoundError, InputError, LimitExceededError
from .models import Verdict, ZooModel, ZooPair, ZooResult, ZooSet
from .naming import model_names
from .security.limits import Limits
from .security.paths import PathGuard
from .settings import Settings

NEAR_DUPLICATE_TASK_COSINE = 0.98  # with a base: the two fine-tunes moved the base the same way
NEAR_DUPLICATE_DISTANCE = 1e-3  # without: the weights are this close (l2_distance)
GOOD = (Verdict.HIGHLY_COMPATIBLE, Verdict.COMPATIBLE)
MAX_SET_CANDIDATES = 20_000  # sets scored exhaustively up to this many, greedily above


def default_cache_dir() -> Path:
    return Path(os.environ.get("MERGELENS_SKETCH_CACHE", "~/.cache/mergelens/sketches")).expanduser()


# ------------------------------------------------------------------------------------------- sources


def expand_sources(models: Sequence[str]) -> list[str]:
    """The zoo's model sources: a lone folder that holds model folders (and no weights) stands for them."""
    if isinstance(models, str):
        models = [models]
    out: list[str] = []
    for src in models:
        path = Path(src).expanduser()
        if path.is_dir() and not any(path.glob("*.safetensors")):
            inner = sorted(p for p in path.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
            if inner:
                out.extend(str(p) for p in inner)
                continue
        out.append(str(src))
    if len(out) < 2:
        raise InputError("a zoo needs at least two models: pass two or more paths, or a folder of model folders")
    return out


def file_identity(ckpt: Checkpoint) -> list[list[Any]]:
    """Per file: the sha256 of its safetensors header, its size and mtime (ns): a change to any of them is a
    changed file."""
    out = []
    for path in ckpt.files:
        st = path.stat()
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = f.read(min(length, 1 << 30))
        out.append([path.name, hashlib.sha256(header).hexdigest(), st.st_size, st.st_mtime_ns])
    return out


def sketch_key(model: Checkpoint, base: Checkpoint | None, params: sk.SketchParams) -> str:
    blob = json.dumps([sk.SKETCH_VERSION, vars(params),
                       file_identity(model), file_identity(base) if base else None], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- the cache

PAIR_VERSION = 1  # raise when estimate_pair's arithmetic changes: cached pair estimates are then made again


def pair_key(key_a: str, key_b: str) -> str:
    """The content key of an ordered pair of sketches (the sketch keys carry the files, parameters and format)."""
    return hashlib.sha256(f"{PAIR_VERSION}:{VERSION}:{key_a}:{key_b}".encode()).hexdigest()


@dataclass(frozen=True)
class SketchCache:
    """Sketches on disk, one safetensors file per content key (no pickle: loading one runs no code)."""

    folder: Path

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, label: str) -> sk.ModelSketch | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sketch"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (OSError, KeyError, ValueError, json.JSONDecodeError):
            return None  # a broken cache entry is drawn again
        found = sk.from_tensors(tensors, meta)
        found.label = label
        return found

    def get_pair(self, key: str) -> PairEstimate | None:
        """A pair's estimate from an earlier zoo holding both sketches (None when absent or unreadable)."""
        try:
            found = json.loads(self.pair_path(key).read_text())
            return PairEstimate(found["mci"], found["low"], found["high"], found["metrics"], found["bounds"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            return None

    def put_pair(self, key: str, est: PairEstimate) -> None:
        """Store a pair's estimate (JSON floats round-trip exactly: the same pair reads back bit for bit)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.pair_path(key).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(vars(est), sort_keys=True))
        os.replace(tmp, self.pair_path(key))

    def pair_path(self, key: str) -> Path:
        return self.folder / f"pair-{key}.json"

    def put(self, key: str, payload: tuple[dict[str, Any], dict[str, Any]]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = payload
        tmp = self.path(key).with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"sketch": json.dumps(meta)})
        os.replace(tmp, self.path(key))


# ------------------------------------------------------------------------------------------- drawing sketches


@dataclass(frozen=True)
class SketchJob:
    """Everything a worker needs to draw one sketch: it opens the files itself, under the same guard."""

    source: str
    label: str
    base: str | None
    roots: tuple[str, ...]
    limits: Limits
    params: sk.SketchParams
    key: str


def draw_sketch(job: SketchJob) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run on a worker (a local process or a Ray task): open the model and the base under the job's path
    guard and limits (a path outside the roots is refused here), sketch it, and return it as tensors + meta."""
    import torch

    guard = PathGuard(job.roots)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker, and the same float sums in every process: equal sketches
    with ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        model = stack.enter_context(load_checkpoint(job.source, job.label, guard=guard, limits=job.limits))
        base = stack.enter_context(load_checkpoint(job.base, "base", guard=guard, limits=job.limits)) \
            if job.base else None
        job.limits.check_request(model.nbytes + (base.nbytes if base else 0))
        return sk.to_tensors(sk.sketch_model(model, base, job.params, job.key))


Backend = Callable[[list[SketchJob], Callable[[SketchJob, tuple[dict[str, Any], dict[str, Any]]], None],
                    Cancelled | None], None]


def local_backend(workers: int) -> Backend:
    """Draw the sketches in a pool of `workers` processes (spawned: no thread state is inherited), or in this
    process for one worker."""

    def run(jobs: list[SketchJob], done: Callable[..., None], cancelled: Cancelled | None) -> None:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                if cancelled is not None and cancelled():
                    raise AnalysisCancelledError(f"zoo cancelled before sketching {job.label}")
                done(job, draw_sketch(job))
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            pending: dict[Future[Any], SketchJob] = {pool.submit(draw_sketch, job): job for job in jobs}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    if cancelled is not None and cancelled():
                        raise AnalysisCancelledError(f"zoo cancelled with {len(pending)} sketches left")
                    for future in finished:
                        done(pending.pop(future), future.result())
            finally:
                for future in pending:
                    future.cancel()

    run.name = "local"  # type: ignore[attr-defined]
    return run


LOCATE_TIMEOUT_S = 30.0


def node_guard(roots: Sequence[str]) -> PathGuard:
    """On a Ray node: the job's roots, narrowed to the roots this machine declares in its own settings
    (MERGELENS_ALLOWED_ROOTS where its `ray start` runs) when it declares any."""
    guard = PathGuard(roots)
    declared = Settings().allowed_roots
    return guard.restrict(declared) if declared else guard


def visible_paths(paths: Sequence[str], roots: Sequence[str]) -> list[str]:
    """Run once on each Ray node: which of `paths` exist there inside the node's guard (`node_guard`)."""
    guard = node_guard(roots)
    seen = []
    for path in paths:
        try:
            guard.check(path)
        except (InputError, OSError, ValueError):
            continue
        seen.append(path)
    return seen


def described(model: Checkpoint, base: Checkpoint | None, params: sk.SketchParams) -> tuple[str, int, int]:
    """What the driver needs of a model before sketching it: its sketch key, parameter count and bytes."""
    return sketch_key(model, base, params), model.n_params, model.nbytes


def describe_models(
    sources: Sequence[str], base: str | None, roots: Sequence[str], limits: Limits, params: sk.SketchParams
) -> dict[str, tuple[str, int, int]]:
    """Run once on each Ray node: for each model this node can open (with the base) under its guard and the
    limits, headers only: its sketch key, parameter count and bytes, as the driver computes them."""
    guard = node_guard(roots)
    found: dict[str, tuple[str, int, int]] = {}
    with ExitStack() as stack:
        try:
            base_ckpt = stack.enter_context(load_checkpoint(base, "base", guard=guard, limits=limits)) if base else None
        except (InputError, OSError, ValueError):
            return found
        for source in sources:
            try:
                with load_checkpoint(source, "model", guard=guard, limits=limits) as model:
                    found[source] = described(model, base_ckpt, params)
            except (InputError, OSError, ValueError):
                continue
    return found


def draw_sketch_on_node(job: SketchJob) -> tuple[tuple[dict[str, Any], dict[str, Any]], str]:
    """A Ray task: `draw_sketch` under the node's guard, and the id of the node that drew it."""
    import ray

    narrowed = tuple(str(r) for r in node_guard(job.roots).roots)
    return draw_sketch(replace(job, roots=narrowed)), ray.get_runtime_context().get_node_id()


def on_every_node(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> dict[str, Any]:
    """`fn(*args)` once on every alive Ray node (a zero-CPU task pinned there): node id -> its answer, or None
    for a node that failed or did not answer within `timeout_s`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
            for node in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    answers: dict[str, Any] = {}
    for node, ref in refs.items():
        try:
            answers[node] = ray.get(ref, timeout=1) if ref in ready else None
        except ray.exceptions.RayError:
            answers[node] = None
    return answers


def place(jobs: Sequence[SketchJob], timeout_s: float = LOCATE_TIMEOUT_S) -> dict[str, str]:
    """Where each model's files are: one small task per alive node (pinned there, no CPU) reports which of the
    jobs' paths it sees under its guard; a job goes to the node, among those that see its model and its base,
    with the fewest jobs placed so far. Jobs every node (or no node) sees are left out: Ray places them. A
    node that does not answer within `timeout_s` counts as seeing nothing. Returns label -> node id."""
    if not jobs:
        return {}
    paths = sorted({p for job in jobs for p in (job.source, job.base) if p})
    answers = on_every_node(visible_paths, (paths, jobs[0].roots), timeout_s)
    nodes = list(answers)
    sees = {node: set(answer or ()) for node, answer in answers.items()}
    placed: dict[str, str] = {}
    load = dict.fromkeys(nodes, 0)
    for job in jobs:
        need = {p for p in (job.source, job.base) if p}
        candidates = [node for node in nodes if need <= sees[node]]
        if 0 < len(candidates) < len(nodes):
            node = min(candidates, key=lambda n: load[n])
            placed[job.label] = node
            load[node] += 1
    return placed


def ray_backend(address: str | None = None, retries: int = 3, timeout_s: float | None = None) -> Backend:
    """Draw the sketches as Ray tasks (one CPU each, retried on another node when theirs is lost); sketches
    come back as object references and are gathered on the driver. Each task is sent where its model's files
    are (`place`: a soft node affinity, so Ray still runs it elsewhere when that node is lost); on the node it
    runs under the job's roots narrowed to the node's own (`node_guard`). `address`: 'auto', a cluster
    address, or None to use the Ray already initialised in this process (or start a local one). `timeout_s`
    bounds the whole run (a LimitExceededError past it). After a run, the backend's `placed` and `ran_on` map
    each sketched model to the node it was sent to and the node that drew it."""
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError as exc:
        raise InputError("--ray needs Ray: pip install 'mergelens-mcp[distributed]'") from exc

    def connect() -> None:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)

    def describe(sources: Sequence[str], base: str | None, roots: Sequence[str], limits: Limits,
                 params: sk.SketchParams) -> dict[str, tuple[str, int, int]]:
        """The headers of models the driver cannot see, read on the nodes that can (`describe_models`)."""
        connect()
        wait_s = LOCATE_TIMEOUT_S if timeout_s is None else min(timeout_s, LOCATE_TIMEOUT_S)
        answers = on_every_node(describe_models, (list(sources), base, list(roots), limits, params), wait_s)
        found: dict[str, tuple[str, int, int]] = {}
        for answer in answers.values():
            for source, described in (answer or {}).items():
                if found.setdefault(source, tuple(described)) != tuple(described):  # type: ignore[arg-type]
                    raise InputError(f"{source} names different files on different Ray nodes (their headers, "
                                     "sizes or times differ): give each model a path that is the same files "
                                     "wherever it is seen")
        return found

    def run(jobs: list[SketchJob], done: Callable[..., None], cancelled: Cancelled | None) -> None:
        connect()
        task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(draw_sketch_on_node)
        placed = place(jobs, LOCATE_TIMEOUT_S if timeout_s is None else min(timeout_s, LOCATE_TIMEOUT_S))
        run.placed, run.ran_on = placed, {}  # type: ignore[attr-defined]

        def submit(job: SketchJob) -> Any:
            if job.label not in placed:
                return task.remote(job)
            strategy = NodeAffinitySchedulingStrategy(placed[job.label], soft=True)
            return task.options(scheduling_strategy=strategy).remote(job)

        pending = {submit(job): job for job in jobs}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise LimitExceededError(f"the Ray cluster did not sketch {len(pending)} model(s) within "
                                             f"{timeout_s:.0f} s; check its nodes (ray status) or raise the timeout")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if cancelled is not None and cancelled():
                    raise AnalysisCancelledError(f"zoo cancelled with {len(pending)} sketches left")
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        payload, node = ray.get(ref, timeout=60)
                    except ray.exceptions.RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
                    run.ran_on[job.label] = node  # type: ignore[attr-defined]
                    done(job, payload)
        finally:
            for ref in pending:
                ray.cancel(ref)

    run.name = "ray"  # type: ignore[attr-defined]
    run.placed, run.ran_on = {}, {}  # type: ignore[attr-defined]
    run.describe = describe  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------------------------------- pairs


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for the pairs: their operations are small (a histogram of a few thousand values, a
    16 x 16 product), and a second OpenMP thread on a busy machine made each one about 70x slower (14 ms
    against 0.2 ms for a histogram at load 7 on 2 cores); one thread also gives the same sums every run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class PairEstimate:
    mci: float
    low: float
    high: float
    metrics: dict[str, float]  # over all shared tensors, by size
    bounds: dict[str, float]


def estimate_pair(a: sk.ModelSketch, b: sk.ModelSketch) -> PairEstimate:
    """The pair's MCI, as the engine computes it from per-layer metrics, and its bound (the MCI at every
    metric's pessimistic and optimistic end), plus the size-weighted means of its metrics with bounds."""
    layers: dict[str, dict[str, list[tuple[float, float, int]]]] = {}
    sizes: dict[str, int] = {}
    overall: dict[str, list[tuple[float, float, int]]] = {}
    for name in sk.shared_tensors(a, b):
        est = sk.pair_metrics(a.tensors[name], b.tensors[name])
        layer = classify(name).layer_name
        n = a.tensors[name].numel
        sizes[layer] = sizes.get(layer, 0) + n
        for metric, value in est.values.items():
            entry = (value, est.bounds.get(metric, 0.0), n)
            layers.setdefault(layer, {}).setdefault(metric, []).append(entry)
            overall.setdefault(metric, []).append(entry)
    if not layers:
        raise InputError(f"{a.label} and {b.label} share no tensor of the same shape: they cannot be paired")
    scores: dict[str, list[float]] = {"mid": [], "low": [], "high": []}
    params = []
    for layer, found in layers.items():
        means = {m: _mean(v) for m, v in found.items()}
        bounds = {m: _bound(v) for m, v in found.items()}
        for which, metrics in (("mid", means), ("low", sk.pessimistic(means, bounds, True)),
                               ("high", sk.pessimistic(means, bounds, False))):
            scores[which].append(mci.layer_score(mci.components(metrics)))
        params.append(sizes[layer])
    mid, low, high = (mci.overall_score(scores[w], params) for w in ("mid", "low", "high"))
    return PairEstimate(mid, min(low, mid), max(high, mid),
                        {m: _mean(v) for m, v in overall.items()}, {m: _bound(v) for m, v in overall.items()})


def _mean(values: list[tuple[float, float, int]]) -> float:
    return sum(v * n for v, _, n in values) / sum(n for _, _, n in values)


def _bound(values: list[tuple[float, float, int]]) -> float:
    """The bound of a size-weighted mean of independent estimates: Z standard errors combine in quadrature."""
    return math.sqrt(sum((b * n) ** 2 for _, b, n in values)) / sum(n for _, _, n in values)


# ------------------------------------------------------------------------------------------- the zoo


def compare_zoo(
    models: Sequence[str],
    base: str | None = None,
    *,
    target: str | None = None,
    top: int = 5,
    set_size: int = 3,
    exact_top: int = 0,
    cache_dir: str | Path | None = None,
    ray: str | None = None,
    workers: int | None = None,
    backend: Backend | None = None,
    params: sk.SketchParams | None = None,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> ZooResult:
    """Which of these models to merge: every pair's estimated MCI (with its bound), the clusters, the
    near-duplicates, the conflicting pairs and the best sets of up to `set_size` models (for `target`, its
    best partners). `exact_top` recomputes the best N pairs exactly with compare; the top set's mergekit
    YAML then comes from an exact comparison of it."""
    started = time.perf_counter()
    settings = settings or Settings()
    params = params or sk.SketchParams(rank=settings.svd_rank, exact_max_elements=settings.exact_svd_max_elements)
    if top < 1 or set_size < 2 or exact_top < 0:
        raise InputError("top must be at least 1, set_size at least 2 and exact_top at least 0")
    guard = guard or PathGuard([Path(os.sep)])
    limits = settings.limits()
    sources = expand_sources(models)
    labels = model_names(sources)
    if target is not None and target not in labels and target not in sources:
        raise InputError(f"target {target!r} is not one of the zoo's models: {', '.join(labels)}")
    target_label = labels[sources.index(target)] if target in sources else target
    cache = SketchCache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())

    if backend is None:
        backend = ray_backend(None if ray in (None, "", "local") else ray) if ray else \
            local_backend(workers if workers is not None else min(2, os.cpu_count() or 1))
    described = _headers(sources, labels, base, guard, limits, params, getattr(backend, "describe", None))
    keys = [key for key, _, _ in described]
    infos = [(n, nb) for _, n, nb in described]

    sketches: dict[str, sk.ModelSketch] = {}
    cached: set[str] = set()
    with one_thread():  # many small tensors: a second thread only waits on a busy machine (3x the CPU at load 5)
        for label, key in zip(labels, keys, strict=True):
            found = cache.get(key, label)
            if found is not None:
                sketches[label] = found
                cached.add(label)
    roots = tuple(str(r) for r in guard.roots)
    jobs = [SketchJob(s, label, base, roots, limits, params, key)
            for s, label, key in zip(sources, labels, keys, strict=True) if label not in sketches]
    total = len(labels)
    if progress is not None and cached:
        progress(len(cached), total, f"{len(cached)} sketches from the cache")

    def done(job: SketchJob, payload: tuple[dict[str, Any], dict[str, Any]]) -> None:
        cache.put(job.key, payload)
        with one_thread():
            found = sk.from_tensors(*payload)
        found.label = job.label
        sketches[job.label] = found
        if progress is not None:
            progress(len(sketches), total, f"sketched {job.label}")

    try:
        backend(jobs, done, cancelled)
    finally:
        sk.release_bases()  # what this process kept of the base while sketching: nothing is held between zoos

    pairs = []
    with one_thread():
        for i, j in itertools.combinations(range(len(labels)), 2):
            if cancelled is not None and cancelled():
                raise AnalysisCancelledError("zoo cancelled while scoring pairs")
            key = pair_key(keys[i], keys[j])
            est = cache.get_pair(key)
            if est is None:
                est = estimate_pair(sketches[labels[i]], sketches[labels[j]])
                cache.put_pair(key, est)
            pairs.append(_pair(labels[i], labels[j], est))
    pairs.sort(key=lambda p: (-p.mci, p.model_a, p.model_b))
    notes = [
        "every number is estimated from sketches: the true value lies within +- its bound (4 standard errors)",
        f"sketch: {params.width}+ CountSketch buckets and {params.samples}+ sampled coordinates per tensor, "
        f"top-{params.rank} singular vectors",
    ]
    strategy = None
    if exact_top:
        pairs, strategy = _exact(pairs, exact_top, dict(zip(labels, sources, strict=True)), base, settings, guard,
                                 _best_sets(labels, pairs, set_size, top))
    best = _best_sets(labels, pairs, set_size, top, target_label)
    dupes = _groups(labels, [p for p in pairs if p.near_duplicate])
    return ZooResult(
        version=VERSION,
        models=[ZooModel(label=label, source=s, n_params=n, nbytes=nb, sketch_bytes=sketches[label].sketch_bytes,
                         cached=label in cached)
                for label, s, (n, nb) in zip(labels, sources, infos, strict=True)],
        base=base, target=target_label, pairs=pairs, best_sets=best,
        clusters=[g for g in _groups(labels, [p for p in pairs if p.verdict in GOOD]) if len(g) > 1],
        near_duplicates=[g for g in dupes if len(g) > 1],
        conflicts=[[p.model_a, p.model_b] for p in pairs if p.verdict not in GOOD],
        strategy=strategy, notes=notes, backend=getattr(backend, "name", "local"),
        elapsed_s=round(time.perf_counter() - started, 3),
    )


def _headers(
    sources: list[str], labels: list[str], base: str | None, guard: PathGuard, limits: Limits,
    params: sk.SketchParams, describe: Callable[..., dict[str, tuple[str, int, int]]] | None,
) -> list[tuple[str, int, int]]:
    """Per model, from its headers only (the guard and the limits apply before any tensor is read): its sketch
    key, parameter count and bytes. A model (or base) whose files this machine cannot find is described by
    the nodes that can, when the backend can ask them (`describe`: Ray's node-local files)."""
    found: dict[int, tuple[str, int, int]] = {}
    missing: list[int] = []
    with ExitStack() as stack:
        try:
            base_ckpt = stack.enter_context(load_checkpoint(base, "base", guard=guard, limits=limits)) \
                if base else None
            base_here = True
        except CheckpointNotFoundError:
            if describe is None:
                raise
            base_ckpt, base_here = None, False
        for i, (source, label) in enumerate(zip(sources, labels, strict=True)):
            try:
                with load_checkpoint(source, label, guard=guard, limits=limits) as model:
                    if base_here:
                        found[i] = described(model, base_ckpt, params)
                        continue
            except CheckpointNotFoundError:
                if describe is None:
                    raise
            missing.append(i)
    if missing:
        assert describe is not None
        remote = describe([sources[i] for i in missing], base, [str(r) for r in guard.roots], limits, params)
        for i in missing:
            if sources[i] not in remote:
                with_base = f" (with the base {base})" if base else ""
                raise CheckpointNotFoundError(
                    f"{labels[i]}: {sources[i]}{with_base} was found neither here nor on any Ray node inside its "
                    "allowed roots; check the path and each node's MERGELENS_ALLOWED_ROOTS")
            found[i] = remote[sources[i]]
    return [found[i] for i in range(len(sources))]


def _pair(a: str, b: str, est: PairEstimate) -> ZooPair:
    m, bd = est.metrics, est.bounds
    if "task_cosine" in m:
        duplicate = m["task_cosine"] - bd["task_cosine"] >= NEAR_DUPLICATE_TASK_COSINE
    else:
        duplicate = m["l2_distance"] + bd["l2_distance"] <= NEAR_DUPLICATE_DISTANCE
    r = round
    return ZooPair(
        model_a=a, model_b=b, mci=est.mci, mci_low=est.low, mci_high=est.high, verdict=mci.verdict_for(est.mci),
        cosine=r(m["cosine_similarity"], 6), cosine_bound=r(bd["cosine_similarity"], 6),
        task_cosine=r(m["task_cosine"], 6) if "task_cosine" in m else None,
        task_cosine_bound=r(bd["task_cosine"], 6) if "task_cosine" in m else None,
        sign_disagreement=r(m["sign_disagreement"], 6) if "sign_disagreement" in m else None,
        sign_disagreement_bound=r(bd["sign_disagreement"], 6) if "sign_disagreement" in m else None,
        near_duplicate=duplicate,
    )


def _best_sets(
    labels: list[str], pairs: list[ZooPair], set_size: int, top: int, target: str | None = None
) -> list[ZooSet]:
    """The best sets of 2..set_size models (containing `target` when given), ranked by their weakest pair's
    MCI, then by their mean; sets holding near-duplicates are left out (merging a model with itself adds
    nothing)."""
    by_pair = {frozenset((p.model_a, p.model_b)): p for p in pairs}
    candidates: list[ZooSet] = []
    for k in range(2, min(set_size, len(labels)) + 1):
        if math.comb(len(labels), k) > MAX_SET_CANDIDATES:
            break  # too many sets: only the smaller sizes are scored exhaustively
        for combo in itertools.combinations(labels, k):
            if target is not None and target not in combo:
                continue
            members = [by_pair[frozenset(c)] for c in itertools.combinations(combo, 2)]
            if any(p.near_duplicate for p in members):
                continue
            score = lambda p: p.exact_mci if p.exact_mci is not None else p.mci  # noqa: E731
            weakest = min(members, key=score)
            candidates.append(ZooSet(
                models=list(combo), mci=score(weakest), mci_low=min(p.mci_low for p in members),
                mean_mci=round(sum(score(p) for p in members) / len(members), 2), verdict=weakest.verdict,
            ))
    candidates.sort(key=lambda s: (-s.mci, -s.mean_mci, -len(s.models), s.models))
    return candidates[:top]


def _groups(labels: list[str], edges: list[ZooPair]) -> list[list[str]]:
    """Connected components of the models under `edges`, each in zoo order, largest first."""
    parent = {label: label for label in labels}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in edges:
        parent[root(p.model_a)] = root(p.model_b)
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(root(label), []).append(label)
    return sorted(groups.values(), key=lambda g: (-len(g), labels.index(g[0])))


def _exact(
    pairs: list[ZooPair], n: int, sources: dict[str, str], base: str | None, settings: Settings,
    guard: PathGuard, best: list[ZooSet],
) -> tuple[list[ZooPair], Any]:
    """The top `n` pairs with their MCI recomputed exactly; the strategy of the best set, compared exactly."""
    from . import service

    out = list(pairs)
    for i, p in enumerate(pairs[:n]):
        result = service.compare([sources[p.model_a], sources[p.model_b]], base, settings=settings, guard=guard)
        out[i] = p.model_copy(update={"exact_mci": result.mci.composite})  # the zoo's score: the composite
    strategy = None
    if best:
        members = [sources[m] for m in best[0].models]
        strategy = service.compare(members, base, settings=settings, guard=guard).strategy
    return out, strategy
