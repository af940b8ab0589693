"""The zoo on a Ray cluster on 127.0.0.1: a head and a second worker node started here (dashboard off, one CPU and
a 100 MB object store each, every wait bounded). Needs the `distributed` extra (ray), installed by `make test`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.zoo import Zoo, make_zoo
from mergelens_mcp.analysis import sketch as sk
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.errors import PathNotAllowedError
from mergelens_mcp.security.limits import Limits
from mergelens_mcp.zoo import SketchJob, compare_zoo, ray_backend, sketch_key

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on the loopback address
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

PARAMS = sk.SketchParams(width=2048, samples=2048, width_share=0.0, sample_share=0.0)
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
WAIT_S = 120


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder only the head may read and one only the worker may (each node's MERGELENS_ALLOWED_ROOTS)."""
    root = tmp_path_factory.mktemp("own")
    return {"head": root / "head", "worker": root / "worker"}


def _node_args(zoo: Zoo, own: Path) -> dict[str, Any]:
    """A node that may read the shared zoo (models and base) and its own folder."""
    return {**NODE, "env_vars": {"MERGELENS_ALLOWED_ROOTS": os.pathsep.join([str(zoo.base.parent), str(own)])}}


@pytest.fixture(scope="module")
def cluster(zoo: Zoo, own: dict[str, Path]) -> Iterator[Cluster]:
    temp = tempfile.mkdtemp(prefix="mlray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # the address file every added node writes: ours, not a shared /tmp/ray
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    c: Cluster | None = None
    try:
        c = Cluster(initialize_head=True, head_node_args={**_node_args(zoo, own["head"]), "include_dashboard": False,
                                                          "temp_dir": temp})
        c.add_node(**_node_args(zoo, own["worker"]))
        c.wait_for_nodes(timeout=WAIT_S)
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp, ignore_errors=True)


def _cache_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_ray_zoo_equals_the_local_one_bit_for_bit_even_when_a_worker_node_is_lost(
    cluster: Cluster, zoo: Zoo, own: dict[str, Path], tmp_path: Path
) -> None:
    local = compare_zoo([str(zoo.folder)], str(zoo.base), cache_dir=tmp_path / "local", workers=1, params=PARAMS)
    on_ray = compare_zoo([str(zoo.folder)], str(zoo.base), cache_dir=tmp_path / "ray", params=PARAMS,
                         backend=ray_backend(timeout_s=WAIT_S))
    assert on_ray.backend == "ray" and local.backend == "local"
    assert on_ray.pairs == local.pairs and on_ray.best_sets == local.best_sets
    assert _cache_bytes(tmp_path / "ray") == _cache_bytes(tmp_path / "local")

    worker = next(n for n in cluster.worker_nodes)
    removed: list[Any] = []

    def lose_worker(done: int, total: int, message: str) -> None:
        if not removed and message.startswith("sketched"):  # the worker node is lost mid-run
            removed.append(worker)
            cluster.remove_node(worker, allow_graceful=False)

    lost = compare_zoo([str(zoo.folder)], str(zoo.base), cache_dir=tmp_path / "lost", params=PARAMS,
                       backend=ray_backend(timeout_s=WAIT_S), progress=lose_worker)
    assert removed and lost.pairs == local.pairs
    assert _cache_bytes(tmp_path / "lost") == _cache_bytes(tmp_path / "local")
    cluster.add_node(**_node_args(zoo, own["worker"]))
    cluster.wait_for_nodes(timeout=WAIT_S)


def test_sketches_in_the_cache_are_not_sent_to_the_cluster(cluster: Cluster, zoo: Zoo, tmp_path: Path) -> None:
    sources = [str(m) for m in zoo.models]
    compare_zoo(sources[:4], str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
    sent: list[str] = []
    backend = ray_backend(timeout_s=WAIT_S)

    def counting(jobs: list[SketchJob], done: Any, cancelled: Any) -> None:
        sent.extend(job.label for job in jobs)
        backend(jobs, done, cancelled)

    found = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, params=PARAMS, backend=counting)
    assert sent == ["ft_4", "ft_5"]
    assert [m.cached for m in found.models] == [True] * 4 + [False] * 2


def test_a_ray_worker_refuses_a_model_outside_the_allowed_roots(cluster: Cluster, zoo: Zoo, tmp_path: Path) -> None:
    job = SketchJob(str(zoo.models[0]), "ft_0", None, (str(tmp_path),), Limits(), PARAMS, "k")
    with pytest.raises(PathNotAllowedError, match="outside"):
        ray_backend(timeout_s=WAIT_S)([job], lambda job, payload: None, None)


def test_each_model_is_sketched_on_the_node_that_sees_its_files_and_equals_the_local_sketch_bit_for_bit(
    cluster: Cluster, zoo: Zoo, own: dict[str, Path], tmp_path: Path
) -> None:
    head = cluster.head_node.node_id
    worker = next(n for n in cluster.worker_nodes).node_id  # the node added back by the test above, if it ran
    on_head = Path(shutil.copytree(zoo.models[0], own["head"] / "only_head"))
    on_worker = Path(shutil.copytree(zoo.models[1], own["worker"] / "only_worker"))
    sources = [str(on_head), str(on_worker), str(zoo.models[2])]
    local = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "local", workers=1, params=PARAMS)
    backend = ray_backend(timeout_s=WAIT_S)
    placed = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "ray", params=PARAMS, backend=backend)
    assert backend.placed == {"only_head": head, "only_worker": worker}  # ft_2: both nodes see it, Ray chooses
    assert backend.ran_on["only_head"] == head and backend.ran_on["only_worker"] == worker
    assert set(backend.ran_on) == {"only_head", "only_worker", "ft_2"}
    assert placed.pairs == local.pairs and placed.best_sets == local.best_sets
    assert _cache_bytes(tmp_path / "ray") == _cache_bytes(tmp_path / "local")
    # headers read on the node that sees the files (for a driver that cannot): the driver's keys, found there
    with load_checkpoint(str(on_worker), "m") as model, load_checkpoint(str(zoo.base), "base") as base:
        key = sketch_key(model, base, PARAMS)
    described = backend.describe([str(on_worker), str(tmp_path / "nowhere")], str(zoo.base), ["/"], Limits(), PARAMS)
    assert described == {str(on_worker): (key, model.n_params, model.nbytes)}
