"""The analysis pass: progress, cancellation, coverage, notes and N-model pairs, on tiny checkpoints."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.checkpoints import TINY, make_checkpoint, make_finetune, make_with_int_tensor
from mergelens_mcp.analysis.engine import AnalysisOptions, analyze, resolve_device
from mergelens_mcp.analysis.layers import classify
from mergelens_mcp.analysis.loading import Checkpoint, load_checkpoint
from mergelens_mcp.analysis.metrics import task_metrics, weight_metrics
from mergelens_mcp.errors import AnalysisCancelledError, InputError
from mergelens_mcp.models import Verdict

N_TENSORS = len(TINY.tensor_shapes())
CPU = AnalysisOptions(device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "base": make_checkpoint(root / "base"),
        "a": make_finetune(root / "a", task_seed=1),
        "b": make_finetune(root / "b", task_seed=2),
        "c": make_finetune(root / "c", task_seed=3),
        "int": make_with_int_tensor(root / "int"),
    }


def open_all(stack: ExitStack, *paths: Path) -> list[Checkpoint]:
    labels = ["model_a", "model_b", "model_c"]
    return [stack.enter_context(load_checkpoint(str(p), labels[i])) for i, p in enumerate(paths)]


def test_progress_reports_every_tensor_in_order_and_ends_at_the_total(tiny: dict[str, Path]) -> None:
    seen: list[tuple[int, int, str]] = []
    with ExitStack() as stack:
        models = open_all(stack, tiny["a"], tiny["b"])
        analyze(models, None, CPU, progress=lambda done, total, name: seen.append((done, total, name)))
    assert [s[0] for s in seen] == list(range(1, N_TENSORS + 1))
    assert {s[1] for s in seen} == {N_TENSORS}
    assert sorted(s[2] for s in seen) == sorted(TINY.tensor_shapes())


def test_a_cancelled_analysis_stops_between_tensors(tiny: dict[str, Path]) -> None:
    done: list[int] = []
    with ExitStack() as stack:
        models = open_all(stack, tiny["a"], tiny["b"])
        with pytest.raises(AnalysisCancelledError, match=f"cancelled after 3 of {N_TENSORS} tensors"):
            analyze(models, None, CPU, lambda d, t, n: done.append(d), cancelled=lambda: len(done) >= 3)
    assert done == [1, 2, 3]


def test_without_a_base_only_weight_metrics_run_and_a_note_says_why(tiny: dict[str, Path]) -> None:
    with ExitStack() as stack:
        result = analyze(open_all(stack, tiny["a"], tiny["b"]), None, CPU)
    assert not result.mci.used_base
    assert result.base is None
    for lm in result.layer_metrics:
        assert set(lm.metrics) <= {m.name for m in weight_metrics()}
        assert "cosine_similarity" in lm.metrics
    assert any(n.startswith("no base model given") and "--base" in n for n in result.notes)
    assert result.mci.confidence in ("medium", "low")


def test_with_a_base_every_task_metric_is_computed_for_matrices(tiny: dict[str, Path]) -> None:
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(tiny["base"]), "base"))
        result = analyze(open_all(stack, tiny["a"], tiny["b"]), base, CPU)
    assert result.mci.used_base and result.mci.confidence == "high"
    block = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.0")
    assert set(block.metrics) == {m.name for m in [*weight_metrics(), *task_metrics()]}
    assert result.notes == []
    assert result.base is not None and result.base.label == "base"


def test_coverage_counts_tensors_parameters_and_svds(tiny: dict[str, Path]) -> None:
    shapes = TINY.tensor_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    matrix = sum(s[0] * s[1] for s in shapes.values() if len(s) == 2)
    with ExitStack() as stack:
        result = analyze(open_all(stack, tiny["int"], tiny["a"]), None, CPU)
    cov = result.coverage
    assert (cov.tensors_compared, cov.tensors_total) == (N_TENSORS, N_TENSORS + 1)  # position_ids is skipped
    assert cov.params_compared == params
    assert cov.matrix_params == cov.spectral_params == matrix
    assert cov.exact_svd_tensors == 2 * sum(len(s) == 2 for s in shapes.values())  # both models' matrices
    assert cov.randomized_svd_tensors == 0


def test_three_models_give_every_pair_and_the_mci_of_the_weakest(tiny: dict[str, Path]) -> None:
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(tiny["base"]), "base"))
        result = analyze(open_all(stack, tiny["a"], tiny["b"], tiny["c"]), base, CPU)
    pairs = [(p.model_a, p.model_b) for p in result.pairwise]
    assert pairs == [("model_a", "model_b"), ("model_a", "model_c"), ("model_b", "model_c")]
    weakest = min(result.pairwise, key=lambda p: p.score or 0.0)
    assert result.mci.score == weakest.score
    assert result.mci.reasons[0].startswith(f"weakest pair: {weakest.model_a} + {weakest.model_b}")
    per_pair = len(result.layer_metrics) // 3
    assert per_pair == 2 + 3  # two blocks, embed, norm, lm_head
    assert all(p.verdict is not Verdict.INCOMPATIBLE for p in result.pairwise)


def test_identical_models_score_100_with_no_zones(tiny: dict[str, Path]) -> None:
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(tiny["base"]), "base"))
        result = analyze(open_all(stack, tiny["a"], tiny["a"]), base, CPU)
    assert result.mci.score == 100.0 and result.mci.verdict is Verdict.HIGHLY_COMPATIBLE
    assert result.conflict_zones == []
    assert all(lm.score == 100.0 for lm in result.layer_metrics)


@pytest.mark.parametrize(
    ("name", "message"), [("tpu", "not one of auto, cpu, cuda"), ("cuda", "no CUDA GPU")]
)
def test_an_unusable_device_is_an_input_error(name: str, message: str) -> None:
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match=message):
        resolve_device(name)


def rss_anon_mib() -> float:
    """Anonymous resident memory (heap, tensors), not the page cache of mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_follows_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    # two 128 MiB models of sixteen 8 MiB tensors; what the pass holds must not add up over tensors
    numel, count = 2 * 2**20, 16
    for label, seed in (("a", 0), ("b", 1)):
        g = torch.Generator().manual_seed(seed)
        save_file({f"model.layers.{i}.mlp.w.weight": torch.randn(numel, generator=g) for i in range(count)},
                  str(tmp_path / f"{label}.safetensors"))
    samples: list[float] = []
    with ExitStack() as stack:
        models = open_all(stack, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
        start = rss_anon_mib()
        analyze(models, None, CPU, progress=lambda done, total, name: samples.append(rss_anon_mib()))
    largest_mib = numel * 4 / 2**20
    assert len(samples) == count
    assert max(samples) - start < 12 * largest_mib  # 96 MiB, against 256 MiB of weights


def test_each_model_reports_how_far_it_moved_and_each_pair_the_cosine_of_the_moves(
    tiny: dict[str, Path],
) -> None:
    with ExitStack() as stack:
        base = stack.enter_context(load_checkpoint(str(tiny["base"]), "base"))
        result = analyze(open_all(stack, tiny["a"], tiny["b"]), base, CPU)
        unbased = analyze(open_all(stack, tiny["a"], tiny["b"]), None, CPU)
    w = {k: v.double() for k, v in load_file(str(tiny["base"] / "model.safetensors")).items()}
    for info, path in zip(result.models, (tiny["a"], tiny["b"]), strict=True):
        m = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
        moved = sum(float(((m[k] - w[k]) ** 2).sum()) for k in w)
        assert info.moved == pytest.approx(math.sqrt(moved / sum(float((v * v).sum()) for v in w.values())),
                                           rel=1e-4)
        keys = [k for k in w if classify(k).layer_name == "layers.0"]
        layer = math.sqrt(sum(float(((m[k] - w[k]) ** 2).sum()) for k in keys)
                          / sum(float((w[k] ** 2).sum()) for k in keys))
        assert info.moved_by_layer["layers.0"] == pytest.approx(layer, rel=1e-4)
        assert info.moved > 0
    assert result.models[0].moved != result.models[1].moved
    t = [{k: v.double() - w[k] for k, v in load_file(str(path / "model.safetensors")).items()}
         for path in (tiny["a"], tiny["b"])]
    dot = sum(float((t[0][k] * t[1][k]).sum()) for k in w)
    norms = [math.sqrt(sum(float((x * x).sum()) for x in ti.values())) for ti in t]
    assert result.pairwise[0].task_cosine == pytest.approx(dot / (norms[0] * norms[1]), abs=1e-4)
    assert unbased.pairwise[0].task_cosine is None
    assert result.base is not None and result.base.moved is None
    assert all(info.moved is None and info.moved_by_layer == {} for info in unbased.models)
