"""The zoo: sketches against the exact comparison, the cache, the groups and the best sets, the process pool."""

from __future__ import annotations

import itertools
import os
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from fixtures.adapters import make_adapter_family
from fixtures.zoo import Zoo, make_model, make_zoo
from mergelens_mcp import service
from mergelens_mcp.analysis import sketch as sk
from mergelens_mcp.errors import AnalysisCancelledError, CheckpointNotFoundError, InputError, PathNotAllowedError
from mergelens_mcp.models import ZooResult
from mergelens_mcp.security.limits import Limits
from mergelens_mcp.zoo import (
    SketchJob,
    compare_zoo,
    describe_models,
    draw_sketch,
    expand_sources,
    node_guard,
    visible_paths,
)

# Buckets and samples below most tensors' sizes (2k-16k values), so the estimates, not copies, are tested.
PARAMS = sk.SketchParams(width=2048, samples=2048, width_share=0.0, sample_share=0.0)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def result(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> ZooResult:
    cache = tmp_path_factory.mktemp("cache")
    return compare_zoo([str(zoo.folder)], str(zoo.base), cache_dir=cache, workers=1, params=PARAMS)


def _weighted(layers: list, name: str) -> float:  # type: ignore[type-arg]
    return sum(lm.metrics[name] * lm.n_params for lm in layers) / sum(lm.n_params for lm in layers)


def test_sketch_estimates_match_the_exact_comparison_on_every_pair_within_their_bounds(
    zoo: Zoo, result: ZooResult
) -> None:
    exact = service.compare([str(m) for m in zoo.models], str(zoo.base), device="cpu")
    labels = {m.name: m.name for m in zoo.models}  # compare and the zoo both name a model by its folder
    by_pair = {frozenset((p.model_a, p.model_b)): p for p in result.pairs}
    assert len(by_pair) == len(exact.pairwise) == 15
    mci_diffs, same_verdict = [], 0
    for pair in exact.pairwise:
        est = by_pair[frozenset((labels[pair.model_a], labels[pair.model_b]))]
        layers = [lm for lm in exact.layer_metrics if (lm.model_a, lm.model_b) == (pair.model_a, pair.model_b)]
        cosine, task_cosine = _weighted(layers, "cosine_similarity"), _weighted(layers, "task_cosine")
        sign = _weighted(layers, "sign_disagreement")
        assert abs(est.cosine - cosine) <= 0.01
        assert abs(est.cosine - cosine) <= est.cosine_bound + 1e-6
        assert est.task_cosine is not None and est.task_cosine_bound is not None
        assert abs(est.task_cosine - task_cosine) <= est.task_cosine_bound + 1e-6
        assert est.sign_disagreement is not None and est.sign_disagreement_bound is not None
        assert abs(est.sign_disagreement - sign) <= est.sign_disagreement_bound + 1e-6
        assert pair.score is not None
        assert est.mci_low - 0.01 <= pair.score <= est.mci_high + 0.01
        mci_diffs.append(abs(est.mci - pair.score))
        same_verdict += est.verdict is pair.verdict
    assert sum(mci_diffs) / len(mci_diffs) <= 2.0
    assert same_verdict / len(mci_diffs) >= 0.95


def test_the_zoo_finds_the_near_duplicate_the_conflicts_and_ranks_sets_by_their_weakest_pair(
    result: ZooResult,
) -> None:
    assert result.near_duplicates == [["ft_0", "ft_4"]]
    conflicts = {frozenset(c) for c in result.conflicts}
    assert frozenset(("ft_0", "ft_5")) in conflicts  # ft_5 = 2 base - ft_0
    assert all("ft_5" in c or "ft_4" in c for c in conflicts)
    assert result.best_sets
    for s in result.best_sets:
        assert not {"ft_0", "ft_4"} <= set(s.models)  # a set never holds both near-duplicates
        assert s.mci <= s.mean_mci
    scores = [s.mci for s in result.best_sets]
    assert scores == sorted(scores, reverse=True)
    assert [p.mci for p in result.pairs] == sorted((p.mci for p in result.pairs), reverse=True)
    assert all(p.mci_low <= p.mci <= p.mci_high for p in result.pairs)


def test_a_target_gets_only_sets_that_contain_it(zoo: Zoo, tmp_path: Path) -> None:
    found = compare_zoo([str(zoo.folder)], str(zoo.base), target="ft_2", cache_dir=tmp_path, workers=1,
                        params=PARAMS, top=3)
    assert found.target == "ft_2" and len(found.best_sets) == 3
    assert all("ft_2" in s.models for s in found.best_sets)
    with pytest.raises(InputError, match="target 'nope' is not one of"):
        compare_zoo([str(zoo.folder)], str(zoo.base), target="nope", cache_dir=tmp_path, workers=1)


def test_sketches_are_cached_and_a_changed_file_is_sketched_again(zoo: Zoo, tmp_path: Path) -> None:
    root = tmp_path / "models"
    models = [make_model(root, f"m{i}", task_seed=60 + i) for i in range(3)]
    first = compare_zoo([str(m) for m in models], str(zoo.base), cache_dir=tmp_path / "c", workers=1,
                        params=PARAMS)
    assert [m.cached for m in first.models] == [False, False, False]
    again = compare_zoo([str(m) for m in models], str(zoo.base), cache_dir=tmp_path / "c", workers=1,
                        params=PARAMS)
    assert [m.cached for m in again.models] == [True, True, True]
    assert again.pairs == first.pairs
    make_model(root, "m1", task_seed=99)  # rewritten in place: other bytes, a new header hash and mtime
    changed = compare_zoo([str(m) for m in models], str(zoo.base), cache_dir=tmp_path / "c", workers=1,
                          params=PARAMS)
    assert [m.cached for m in changed.models] == [True, False, True]
    assert changed.pairs != first.pairs
    other_params = compare_zoo([str(m) for m in models], str(zoo.base), cache_dir=tmp_path / "c", workers=1,
                               params=sk.SketchParams(width=1024, samples=1024, width_share=0.0, sample_share=0.0))
    assert not any(m.cached for m in other_params.models)  # the parameters are part of the key


def test_adding_a_model_to_a_cached_zoo_sketches_only_the_new_one(zoo: Zoo, tmp_path: Path) -> None:
    sources = [str(m) for m in zoo.models[:3]]
    compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
    seen: list[str] = []
    grown = compare_zoo([*sources, str(zoo.models[3])], str(zoo.base), cache_dir=tmp_path, workers=1,
                        params=PARAMS, progress=lambda done, total, message: seen.append(message))
    assert [m.cached for m in grown.models] == [True, True, True, False]
    assert seen == ["3 sketches from the cache", "sketched ft_3"]
    assert len(grown.pairs) == 6
    assert len(list(tmp_path.glob("pair-*.json"))) == 6  # the three old pairs were read back, three new ones added


def test_pair_estimates_are_cached_by_their_sketches_and_read_back_bit_for_bit(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp import zoo as zoo_module

    sources = [str(m) for m in zoo.models[:3]]
    first = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
    assert len(list(tmp_path.glob("pair-*.json"))) == 3
    computed: list[str] = []
    real = zoo_module.estimate_pair
    monkeypatch.setattr(zoo_module, "estimate_pair", lambda a, b: computed.append(b.label) or real(a, b))
    again = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
    assert computed == [] and again.pairs == first.pairs
    grown = compare_zoo([*sources, str(zoo.models[3])], str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
    assert computed == ["ft_3"] * 3  # only the new model's pairs
    fresh = compare_zoo([*sources, str(zoo.models[3])], str(zoo.base), cache_dir=tmp_path / "fresh", workers=1,
                        params=PARAMS)
    assert grown.pairs == fresh.pairs
    computed.clear()
    for path in tmp_path.glob("pair-*.json"):
        path.write_text("{broken")  # an unreadable entry is computed again
    assert compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS).pairs == first.pairs
    assert computed == ["ft_1", "ft_2", "ft_2"]


def test_the_process_pool_gives_the_same_zoo_as_one_process_bit_for_bit(zoo: Zoo, tmp_path: Path) -> None:
    sources = [str(m) for m in zoo.models[:3]]
    one = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "one", workers=1, params=PARAMS)
    pool = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "pool", workers=2, params=PARAMS)
    assert pool.pairs == one.pairs and pool.best_sets == one.best_sets
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "pool").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


def test_a_cancelled_zoo_stops_before_the_next_model(zoo: Zoo, tmp_path: Path) -> None:
    calls: list[str] = []

    def cancelled() -> bool:
        calls.append("asked")
        return len(calls) > 1

    with pytest.raises(AnalysisCancelledError, match="cancelled"):
        compare_zoo([str(m) for m in zoo.models[:3]], str(zoo.base), cache_dir=tmp_path, workers=1,
                    params=PARAMS, cancelled=cancelled)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # one model sketched, then it stopped


def test_a_worker_refuses_a_model_outside_its_allowed_roots(zoo: Zoo, tmp_path: Path) -> None:
    job = SketchJob(str(zoo.models[0]), "ft_0", None, (str(tmp_path),), Limits(), PARAMS, "k")
    with pytest.raises(PathNotAllowedError):
        draw_sketch(job)
    capped = SketchJob(str(zoo.models[0]), "ft_0", None, (os.sep,), Limits(max_request_bytes=1000), PARAMS, "k")
    with pytest.raises(Exception, match="cap"):
        draw_sketch(capped)


def test_a_lone_folder_of_model_folders_is_the_zoo_and_one_model_is_refused(zoo: Zoo) -> None:
    assert expand_sources([str(zoo.folder)]) == [str(m) for m in zoo.models]
    with pytest.raises(InputError, match="at least two models"):
        expand_sources([str(zoo.models[0])])


def test_models_with_the_same_folder_name_are_named_as_compare_names_them(zoo: Zoo, tmp_path: Path) -> None:
    first, second = make_model(tmp_path / "run1", "ft", task_seed=50), make_model(tmp_path / "run2", "ft", task_seed=51)
    found = compare_zoo([str(first), str(second)], str(zoo.base), cache_dir=tmp_path / "c", workers=1,
                        params=PARAMS)
    exact = service.compare([str(first), str(second)], str(zoo.base), device="cpu")
    assert [m.label for m in found.models] == ["run1/ft", "run2/ft"]
    assert {found.pairs[0].model_a, found.pairs[0].model_b} == {exact.pairwise[0].model_a, exact.pairwise[0].model_b}


def test_tensors_no_larger_than_the_sketch_are_kept_whole_and_pair_exactly(zoo: Zoo, tmp_path: Path) -> None:
    wide = sk.SketchParams(width=1 << 16, samples=1 << 16)
    found = compare_zoo([str(m) for m in zoo.models[:2]], str(zoo.base), cache_dir=tmp_path, workers=1,
                        params=wide)
    exact = service.compare([str(m) for m in zoo.models[:2]], str(zoo.base), device="cpu")
    [pair] = found.pairs
    assert pair.cosine_bound == 0.0 and pair.task_cosine_bound == 0.0 and pair.sign_disagreement_bound == 0.0
    assert pair.mci == pytest.approx(exact.mci.composite, abs=0.05)  # the zoo's MCI: the weight-space composite
    assert pair.cosine == pytest.approx(_weighted(exact.layer_metrics, "cosine_similarity"), abs=1e-5)


def test_mergelens_zoo_prints_the_best_sets_and_writes_the_json(
    zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergelens_mcp.cli import main

    out = tmp_path / "zoo.json"
    code = main(["zoo", str(zoo.folder), "--base", str(zoo.base), "--cache-dir", str(tmp_path / "c"),
                 "--workers", "1", "--top", "2", "--target", "ft_1", "--json", str(out),
                 "--report", str(tmp_path / "zoo.html")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Best sets with ft_1" in printed and "near-duplicates: ft_0, ft_4" in printed
    loaded = ZooResult.model_validate_json(out.read_text())
    assert loaded.target == "ft_1" and len(loaded.best_sets) == 2 and len(loaded.pairs) == 15
    page = (tmp_path / "zoo.html").read_text()
    assert '<meta name="generator" content="mergelens-mcp">' in page and "zoo-matrix" in page
    assert ", ".join(loaded.best_sets[0].models) in page and page.count('"ft_5"') >= 2  # matrix axes
    assert main(["zoo", str(zoo.models[0]), "--cache-dir", str(tmp_path / "c")]) == 2  # one model: refused


def test_exact_top_recomputes_the_best_pair_exactly_and_gives_the_top_sets_yaml(zoo: Zoo, tmp_path: Path) -> None:
    sources = [str(m) for m in zoo.models[:3]]
    found = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS, exact_top=1,
                        set_size=2)
    best = found.pairs[0]
    exact = service.compare([str(zoo.folder / best.model_a), str(zoo.folder / best.model_b)], str(zoo.base))
    assert best.exact_mci == exact.mci.composite and best.mci_low <= best.exact_mci <= best.mci_high
    assert exact.mci.method is not None  # compare's own MCI of the pair is a prediction: the zoo does not use it
    assert all(p.exact_mci is None for p in found.pairs[1:])
    assert found.strategy is not None and "merge_method:" in found.strategy.mergekit_yaml


def test_the_count_sketch_is_linear_and_its_squared_norm_error_stays_within_the_stated_bound() -> None:
    import math

    import torch

    width = 256
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(64, width, generator=g), torch.randn(64, width, generator=g)
    column = torch.zeros(64, width)
    column[:, 3] = 1.0  # one column changed: every value of it falls in one bucket of a hash by position mod width
    seed = 11
    both = sk.count_sketch(a + b, width, seed)
    assert torch.allclose(both, sk.count_sketch(a, width, seed) + sk.count_sketch(b, width, seed), atol=1e-4)
    bound = sk.Z * math.sqrt(2.0 / width)
    for d in (a, column):
        errors = [abs(float((sk.count_sketch(d, width, s) ** 2).sum()) / float((d**2).sum()) - 1) for s in range(40)]
        assert max(errors) <= bound
        assert sum(errors) / len(errors) <= math.sqrt(2.0 / width)  # about one standard error on average


def test_int8_singular_vectors_move_the_spectral_metrics_by_less_than_their_stated_bound(zoo: Zoo) -> None:
    import torch

    from mergelens_mcp.analysis.loading import load_checkpoint

    worst = 0.0
    with load_checkpoint(str(zoo.models[0]), "a") as a, load_checkpoint(str(zoo.models[5]), "b") as b, \
            load_checkpoint(str(zoo.base), "base") as base:
        one = sk.sketch_model(a, base, PARAMS)
        two = sk.sketch_model(b, base, PARAMS)
        stored = sk.from_tensors(*sk.to_tensors(one)), sk.from_tensors(*sk.to_tensors(two))
        for name in sk.shared_tensors(one, two):
            exact = sk.pair_metrics(one.tensors[name], two.tensors[name]).values
            rounded = sk.pair_metrics(stored[0].tensors[name], stored[1].tensors[name]).values
            for metric in ("spectral_overlap", "effective_rank_ratio", "tsv_interference", "task_vector_energy"):
                if metric in exact:
                    worst = max(worst, abs(exact[metric] - rounded[metric]))
            assert one.tensors[name].nbytes <= sk.sketch_nbytes(one.tensors[name].shape, PARAMS, True)
    assert 0.0 < worst <= sk.SPECTRAL_BOUND, worst
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(4096, 16, generator=g)).Q  # a 7B-sized dimension
    q, scale = sk.quantize(u)
    assert q.dtype is torch.int8
    overlap = float((u.T @ sk.dequantize(q, scale)).pow(2).sum()) / 16
    assert abs(overlap - 1.0) <= sk.SPECTRAL_BOUND


def test_the_sketchs_spectral_metrics_stay_within_their_bound_of_compares_exact_svds_on_every_tensor_pair(
    zoo: Zoo,
) -> None:
    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.analysis.metrics import REGISTRY, Operand

    worst: dict[str, float] = {}
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(zoo.base), "base"))
        models = [stack.enter_context(load_checkpoint(str(m), m.name)) for m in zoo.models[:4]]
        stored = [sk.from_tensors(*sk.to_tensors(sk.sketch_model(m, base, PARAMS))) for m in models]
        for (i, a), (j, b) in itertools.combinations(enumerate(models), 2):
            for name in sk.shared_tensors(stored[i], stored[j]):
                x, y, z = a.read(name), b.read(name), base.read(name)
                if x.dim() != 2:
                    continue
                assert stored[i].tensors[name].svd is not None and stored[i].tensors[name].svd.exact
                got = sk.pair_metrics(stored[i].tensors[name], stored[j].tensors[name]).values
                ops = {False: (Operand(x), Operand(y)), True: (Operand(x, base=z), Operand(y, base=z))}
                for metric in ("spectral_overlap", "effective_rank_ratio", "tsv_interference", "task_vector_energy"):
                    exact = float(REGISTRY[metric].fn(*ops[REGISTRY[metric].needs_base]))
                    worst[metric] = max(worst.get(metric, 0.0), abs(got[metric] - exact))
    assert set(worst) == {"spectral_overlap", "effective_rank_ratio", "tsv_interference", "task_vector_energy"}
    assert max(worst.values()) <= sk.SPECTRAL_BOUND, worst
    assert max(worst.values()) > 0.0  # the sketch's own path, not compare's values copied


def test_a_sketch_is_at_most_one_percent_of_a_7b_models_bytes_by_its_widths() -> None:
    import math

    params = sk.SketchParams()
    layer = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)] + [(4096,)] * 2
    shapes = [(32000, 4096), (32000, 4096), (4096,)] + 32 * layer  # Llama-2-7B, norms included
    model = sum(2 * math.prod(s) for s in shapes)  # bf16
    sketch = sum(sk.sketch_nbytes(s, params, True) for s in shapes)
    assert sketch / model <= 0.01


def test_pairs_are_scored_on_one_torch_thread_and_the_callers_threads_come_back(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    seen: list[int] = []
    scored = sk.pair_metrics

    def counting(a: sk.TensorSketch, b: sk.TensorSketch) -> sk.Estimate:
        seen.append(torch.get_num_threads())
        return scored(a, b)

    monkeypatch.setattr(sk, "pair_metrics", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a second thread made each small pair operation ~70x slower on a busy machine
    try:
        compare_zoo([str(m) for m in zoo.models[:3]], str(zoo.base), cache_dir=tmp_path, workers=1, params=PARAMS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_a_node_sees_only_the_paths_inside_both_the_jobs_roots_and_its_own(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [str(m) for m in zoo.models[:2]] + [str(zoo.base), str(tmp_path / "missing"), "org/hub-model"]
    monkeypatch.delenv("MERGELENS_ALLOWED_ROOTS", raising=False)
    assert visible_paths(paths, (str(zoo.folder.parent),)) == paths[:3]  # no roots of its own: the job's
    assert visible_paths(paths, (str(zoo.folder),)) == paths[:2]
    monkeypatch.setenv("MERGELENS_ALLOWED_ROOTS", os.pathsep.join([str(zoo.models[1]), str(zoo.base)]))
    assert visible_paths(paths, (str(zoo.folder.parent),)) == paths[1:3]
    assert visible_paths(paths, (str(zoo.folder),)) == paths[1:2]
    assert node_guard((str(tmp_path),)).roots == ()  # the node allows nothing of that job: every path refused
    job = SketchJob(str(zoo.models[0]), "ft_0", None, (str(zoo.folder),), Limits(), PARAMS, "k")
    with pytest.raises(PathNotAllowedError, match="outside"):
        draw_sketch(SketchJob(job.source, job.label, None, tuple(map(str, node_guard(job.roots).roots)),
                              job.limits, job.params, job.key))


def test_a_sketched_tensors_effective_rank_is_computed_once_when_sketched_and_read_back_by_every_pair(
    zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.zoo import estimate_pair

    calls: list[float] = []
    real = sk._effective_rank
    monkeypatch.setattr(sk, "_effective_rank", lambda svd: calls.append(1) or real(svd))
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(zoo.base), "base"))
        drawn = [sk.sketch_model(stack.enter_context(load_checkpoint(str(m), m.name)), base, PARAMS)
                 for m in zoo.models[:3]]
    matrices = sum(t.svd is not None for t in drawn[0].tensors.values())
    assert matrices > 0 and len(calls) == 3 * matrices  # once per model's weight matrix, when it is sketched
    stored = [sk.from_tensors(*sk.to_tensors(s)) for s in drawn]
    calls.clear()
    pairs = [estimate_pair(a, b) for a, b in itertools.combinations(stored, 2)]
    assert calls == []  # read back from the stored sketch, not computed per pair or per load
    monkeypatch.setattr(sk, "_effective_rank", real)
    for s in stored:
        for t in s.tensors.values():
            t.spectral_cache.clear()
            assert t.svd is None or t.effective_rank == real(sk.spectral_of(t, "svd").svd)  # type: ignore[union-attr]
            t.effective_rank = None
            t.spectral_cache.clear()
    assert [estimate_pair(a, b) for a, b in itertools.combinations(stored, 2)] == pairs


def test_a_model_the_driver_cannot_find_is_described_and_sketched_by_a_backend_that_sees_it(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray node's local files, without Ray: the driver finds no `elsewhere/ft_0`; the backend's `describe`
    reads its headers where it is (here: zoo.models[0]) and its run draws it there."""
    from dataclasses import replace

    monkeypatch.delenv("MERGELENS_ALLOWED_ROOTS", raising=False)
    hidden, real = str(tmp_path / "elsewhere" / "ft_0"), str(zoo.models[0])
    sources = [hidden, str(zoo.models[1]), str(zoo.models[2])]
    asked: list[list[str]] = []

    def describe(models: list[str], base: str | None, roots: list[str], limits: Limits,
                 params: sk.SketchParams) -> dict[str, tuple[str, int, int]]:
        asked.append(models)
        seen = describe_models([real if m == hidden else m for m in models], base, roots, limits, params)
        return {hidden: seen[real]} if real in seen else {}

    def run(jobs: list[SketchJob], done: object, cancelled: object) -> None:
        for job in jobs:
            done(job, draw_sketch(replace(job, source=real) if job.source == hidden else job))  # type: ignore[operator]

    run.describe = describe  # type: ignore[attr-defined]
    remote = compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "remote", params=PARAMS, backend=run)
    local = compare_zoo([real, *sources[1:]], str(zoo.base), cache_dir=tmp_path / "local", workers=1, params=PARAMS)
    assert asked == [[hidden]]  # only what the driver could not find
    assert remote.pairs == local.pairs and remote.models[0].n_params == local.models[0].n_params > 0
    names = [sorted(p.name for p in (tmp_path / which).iterdir()) for which in ("remote", "local")]
    assert names[0] == names[1]  # the same keys: the sketch of ft_0 is the one of its files
    with pytest.raises(CheckpointNotFoundError, match="neither an existing path"):  # no backend that can look elsewhere
        compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "c", workers=1, params=PARAMS)
    run.describe = lambda *args: {}  # type: ignore[attr-defined]
    with pytest.raises(CheckpointNotFoundError, match="ft_0: .* was found neither here nor on any Ray node"):
        compare_zoo(sources, str(zoo.base), cache_dir=tmp_path / "c", params=PARAMS, backend=run)


def test_a_zoo_of_lora_adapters_equals_the_zoo_of_the_full_models_they_make(tmp_path: Path) -> None:
    base, adapters, dense = make_adapter_family(tmp_path / "models")
    of_adapters = compare_zoo([str(p) for p in adapters], str(base), cache_dir=tmp_path / "a", workers=1,
                              params=PARAMS)
    of_dense = compare_zoo([str(p) for p in dense], str(base), cache_dir=tmp_path / "d", workers=1, params=PARAMS)
    expected = {(p.model_a, p.model_b): p for p in of_dense.pairs}
    assert len(of_adapters.pairs) == len(expected) == 3
    for pair in of_adapters.pairs:
        twin = expected[(pair.model_a, pair.model_b)]
        assert twin.task_cosine is not None and abs(twin.task_cosine) < 0.5  # unrelated adapters: far from 1
        assert pair.task_cosine is not None and twin.task_cosine_bound is not None
        assert abs(pair.task_cosine - twin.task_cosine) <= twin.task_cosine_bound + 1e-5
        assert abs(pair.cosine - twin.cosine) <= twin.cosine_bound + 1e-6
        assert pair.sign_disagreement is not None and twin.sign_disagreement is not None
        assert abs(pair.sign_disagreement - twin.sign_disagreement) <= 1e-3
        assert pair.mci == pytest.approx(twin.mci, abs=0.05) and pair.verdict is twin.verdict
        assert not pair.near_duplicate


def test_the_sketchs_one_pass_gives_compares_norms_ranges_and_randomized_svds(zoo: Zoo) -> None:
    import torch

    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.analysis.metrics import Operand
    from mergelens_mcp.analysis.spectral import randomized

    params = sk.SketchParams(width=2048, samples=2048, width_share=0.0, sample_share=0.0, exact_max_elements=1024,
                             rank=8)
    with load_checkpoint(str(zoo.models[0]), "ft_0") as model, load_checkpoint(str(zoo.base), "base") as base:
        drawn = sk.sketch_model(model, base, params)
        checked = 0
        for name, t in drawn.tensors.items():
            view, base_view = model.view(name), base.view(name)
            weights = Operand(view, rank=params.rank, exact_max_elements=params.exact_max_elements)
            task = Operand(view, rank=params.rank, exact_max_elements=params.exact_max_elements, base=base_view)
            assert t.norm == pytest.approx(weights.norm, rel=1e-6)
            assert t.task_norm == pytest.approx(task.norm, rel=1e-6)
            assert t.base_norm == pytest.approx(Operand(base_view).norm, rel=1e-6)
            assert t.value_range == weights.value_range
            assert t.top_threshold == task.top_threshold
            if t.numel > 2048:  # the CountSketch fed block by block is count_sketch's, bit for bit
                assert torch.equal(t.projection, sk.count_sketch(view, 2048, sk._seed(params, name, t.numel, "cs")))
            if not t.is_matrix:
                continue
            assert randomized(t.shape, params.rank, params.exact_max_elements)
            for ours, op in ((t.svd, weights), (t.task_svd, task)):
                assert ours is not None
                theirs = op.svd
                assert torch.allclose(ours.s, theirs.s, rtol=1e-4, atol=1e-6)
                assert ours.total_energy == pytest.approx(theirs.total_energy, rel=1e-5)
                overlap = float(((ours.u.T @ theirs.u) ** 2).sum()) / ours.k  # the same top subspace
                assert overlap == pytest.approx(1.0, abs=1e-3)
            checked += 1
    assert checked >= 8  # every attention and MLP matrix took the randomized path in the pass


def test_the_sign_counts_from_joint_codes_equal_the_four_masked_sums() -> None:
    import torch

    g = torch.Generator().manual_seed(3)

    def sketched(threshold: float) -> sk.TensorSketch:
        x = torch.randn(4096, generator=g) * (torch.rand(4096, generator=g) > 0.3)  # a third exactly zero
        return sk.TensorSketch(4096, (4096,), 1.0, (-1.0, 1.0), x.clone(), True, x.to(torch.bfloat16),
                               task_norm=1.0, base_norm=1.0, task_sample=x.to(torch.bfloat16), top_threshold=threshold)

    a, b = sketched(0.8), sketched(1.1)
    x, y = a.task_sample.float(), b.task_sample.float()  # type: ignore[union-attr]
    both = (x != 0) & (y != 0)
    conflict = both & ((x > 0) != (y > 0))
    top = both & (x.abs() >= 0.8) & (y.abs() >= 1.1)
    expected = [int(both.sum()), int(conflict.sum()), int(top.sum()), int((conflict & top).sum())]
    assert expected[3] > 0 and expected[2] < expected[0]
    assert sk._sign_counts(a, b) == expected
    assert sk._sign_counts(b, a) == expected


def test_the_bases_quantities_kept_between_sketches_belong_to_the_base_each_sketch_is_drawn_against(
    zoo: Zoo,
) -> None:
    import torch

    from mergelens_mcp.analysis.loading import load_checkpoint

    def fields(s: sk.ModelSketch) -> list[object]:
        return [(t.base_norm, t.task_norm, t.task_sample.tolist() if t.task_sample is not None else None)
                for t in s.tensors.values()]

    with ExitStack() as stack:
        model, base, other = (stack.enter_context(load_checkpoint(str(p), p.name))
                              for p in (zoo.models[0], zoo.base, zoo.models[1]))
        sk._BASES.bases.clear()
        fresh_other = fields(sk.sketch_model(model, other, PARAMS))
        sk._BASES.bases.clear()
        fresh_base = fields(sk.sketch_model(model, base, PARAMS))
        assert fields(sk.sketch_model(model, other, PARAMS)) == fresh_other  # not the base's kept values
        assert fields(sk.sketch_model(model, base, PARAMS)) == fresh_base
        assert len(sk._BASES.bases) == 2 and fresh_base != fresh_other
        with_base = sk.sketch_model(model, base, PARAMS).tensors["model.layers.0.mlp.up_proj.weight"]
        alone = sk.sketch_model(model, None, PARAMS).tensors["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(with_base.sample, alone.sample)  # the kept coordinates are the ones drawn without a base


def test_a_tensor_of_more_than_two_dimensions_keeps_its_base_in_the_sketch() -> None:
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(8, 4, 3, 3, generator=g), torch.randn(8, 4, 3, 3, generator=g)
    conv = sk.sketch_tensor("conv.weight", w, b, sk.SketchParams())
    flat = sk.sketch_tensor("conv.weight", w.reshape(8, 36), b.reshape(8, 36), sk.SketchParams())
    assert conv.task_norm is not None and conv.task_norm == pytest.approx(float((w - b).norm()), rel=1e-5)
    assert conv.task_norm == flat.task_norm
