"""The streaming engine's shortcuts give the answers of the direct computations they replace."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures.checkpoints import Family, Shape, combine, random_model, save, task_vector
from mergelens_mcp import compare_models
from mergelens_mcp.analysis.engine import AnalysisOptions, analyze
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.analysis.metrics import (
    CHUNK,
    SAMPLE_SIZE,
    TOP_DENSITY,
    TOP_SAMPLE_SIZE,
    Operand,
    kl_divergence,
    sign_disagreement,
    sign_disagreement_top,
)


def test_read_converts_every_float_dtype_like_safetensors_and_can_keep_the_stored_one(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"w.{dtype}": torch.randn(300, 70, generator=g).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    file = str(tmp_path / "model.safetensors")
    with load_checkpoint(str(tmp_path), "a") as ckpt, safe_open(file, "pt") as ref:
        for name, original in tensors.items():
            assert torch.equal(ckpt.read(name), ref.get_tensor(name).float())
            kept = ckpt.read(name, dtype=None)
            assert kept.dtype == original.dtype and torch.equal(kept, original)


def test_reading_in_blocks_crosses_block_boundaries_without_losing_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp.analysis import loading

    monkeypatch.setattr(loading, "READ_BLOCK_BYTES", 3 * loading.PAGE + 2)
    values = torch.arange(50_001, dtype=torch.float32).to(torch.bfloat16)
    save_file({"x": values, "y": values.flip(0).contiguous()}, str(tmp_path / "model.safetensors"))
    with load_checkpoint(str(tmp_path), "a") as ckpt:
        assert torch.equal(ckpt.read("y"), values.flip(0).float())
        assert torch.equal(ckpt.read("x"), values.float())


def sparse_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g) + 0.5 * torch.randn(1, generator=g)
    a[torch.rand(n, generator=g) < 0.1] = 0
    b[torch.rand(n, generator=g) < 0.1] = 0
    return a, b


def direct_conflict(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    both = mask & (a != 0) & (b != 0)
    return float((torch.sign(a[both]) != torch.sign(b[both])).double().mean())


def exact_top(x: torch.Tensor) -> torch.Tensor:
    magnitude = x.abs()
    keep = math.ceil(TOP_DENSITY * x.numel())
    return magnitude >= torch.kthvalue(magnitude, x.numel() - keep + 1).values


def test_sign_metrics_over_many_chunks_match_a_direct_count() -> None:
    n = 3 * CHUNK + 12_345
    assert n > TOP_SAMPLE_SIZE
    a, b = sparse_pair(n, seed=1)
    x, y = Operand(a), Operand(b)
    everywhere = torch.ones(n, dtype=torch.bool)
    assert sign_disagreement(x, y) == pytest.approx(direct_conflict(a, b, everywhere), abs=1e-9)
    exact = direct_conflict(a, b, exact_top(a) & exact_top(b))
    assert sign_disagreement_top(x, y) == pytest.approx(exact, abs=0.005)
    kept = float((a.abs() >= x.top_threshold).double().mean())
    assert kept == pytest.approx(TOP_DENSITY, abs=0.003)


def test_kl_from_the_sample_is_close_to_the_full_histogram() -> None:
    n = 3 * SAMPLE_SIZE + 7
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(n, generator=g), 1.3 * torch.randn(n, generator=g)
    full = Operand(a), Operand(b)
    lo, hi = min(float(a.min()), float(b.min())), max(float(a.max()), float(b.max()))
    p = torch.histc(a, 64, lo, hi).double() + 0.5
    q = torch.histc(b, 64, lo, hi).double() + 0.5
    p, q = p / p.sum(), q / q.sum()
    expected = float(0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()))
    assert kl_divergence(*full) == pytest.approx(expected, rel=0.05)
    assert kl_divergence(full[0], Operand(a.clone())) == 0.0


def test_nan_and_inf_are_counted_and_read_as_zero(family: Family, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    with safe_open(str(family.finetune_b / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), 1.0])
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((family.finetune_b / "config.json").read_text())
    result = compare_models([str(family.finetune_a), str(broken)], base=str(family.base))
    assert [m.nonfinite_values for m in result.models] == [0, 4]
    assert any(f.code == "nonfinite_values" for f in result.findings)
    assert result.mci.score is not None
    assert all(math.isfinite(v) for lm in result.layer_metrics for v in lm.metrics.values())
    as_base = compare_models([str(family.finetune_a), str(family.finetune_b)], base=str(broken))
    assert as_base.base is not None and as_base.base.nonfinite_values == 4
    assert all(math.isfinite(v) for lm in as_base.layer_metrics for v in lm.metrics.values())


def test_analysis_restores_the_torch_thread_count(family: Family) -> None:
    before = torch.get_num_threads()
    models = [load_checkpoint(str(family.finetune_a), "a"), load_checkpoint(str(family.finetune_b), "b")]
    analyze(models, load_checkpoint(str(family.base), "base"), AnalysisOptions(device="cpu", threads=1))
    assert torch.get_num_threads() == before


def test_the_fused_pass_gives_what_separate_passes_give() -> None:
    from mergelens_mcp.analysis.metrics import pair_sums, weight_and_task_sums

    g = torch.Generator().manual_seed(3)
    n = 2 * CHUNK + 999
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    a = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    b = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    fused = [Operand(a), Operand(b), Operand(a, base=base), Operand(b, base=base), Operand(base)]
    weight_and_task_sums(*fused)
    ta, tb = a.float() - base.float(), b.float() - base.float()
    alone = [Operand(a.float()), Operand(b.float()), Operand(ta), Operand(tb)]
    weights, tasks = pair_sums(alone[0], alone[1]), pair_sums(alone[2], alone[3], signs=True)
    got_w, got_t = pair_sums(fused[0], fused[1]), pair_sums(fused[2], fused[3], signs=True)
    assert got_w == weights
    assert got_t.dot == pytest.approx(tasks.dot, rel=1e-9) and got_t.signs == tasks.signs
    assert got_t.distance_sq == pytest.approx(tasks.distance_sq, rel=1e-6)  # the weights' a - b, same values
    for op, ref in zip(fused[:4], alone, strict=True):
        assert op.norm == pytest.approx(ref.norm, rel=1e-9)
    assert fused[4].norm == pytest.approx(float(base.double().norm()), rel=1e-7)


def test_magnitude_buckets_give_the_order_statistics_and_mass_prefix_of_a_full_sort() -> None:
    from mergelens_mcp.analysis.metrics import Magnitudes

    g = torch.Generator().manual_seed(4)
    rounded = torch.randn(5000, generator=g).to(torch.bfloat16).float() - torch.randn(5000, generator=g).to(
        torch.bfloat16
    ).float()  # few distinct values, many ties, some zeros
    for values in (torch.randn(20_000, generator=g), rounded, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0])):
        found, ordered = Magnitudes(values), values.abs().sort(descending=True).values
        for rank in (1, 2, values.numel() // 5, values.numel()):
            assert found.largest(rank) == float(ordered[rank - 1])
        running = ordered.double().cumsum(0)
        target = torch.tensor([0.9 * float(running[-1])], dtype=torch.float64)
        assert found.count_holding(0.9) == int(torch.searchsorted(running, target)) + 1


def test_samples_are_evenly_spaced_runs_at_the_same_positions_in_every_operand() -> None:
    from mergelens_mcp.analysis.metrics import SAMPLE_RUN

    n = 1000 * SAMPLE_RUN
    values = torch.arange(n, dtype=torch.float32)
    sample = Operand(values).sampled(100 * SAMPLE_RUN)
    assert sample.numel() == 100 * SAMPLE_RUN
    starts = sample.view(100, SAMPLE_RUN)[:, 0]
    assert torch.equal(starts, torch.arange(0, n, 10 * SAMPLE_RUN, dtype=torch.float32))
    assert torch.equal(sample.view(100, SAMPLE_RUN)[3], values[30 * SAMPLE_RUN:31 * SAMPLE_RUN])
    task = Operand(values, base=torch.ones(n)).sampled(100 * SAMPLE_RUN)
    assert torch.equal(task, sample - 1)


def test_the_stored_dtype_does_not_change_the_answer(tmp_path: Path) -> None:
    shape = Shape(hidden=64, layers=2, intermediate=128, vocab=256)
    base = random_model(shape, 0)
    family = {"base": base}
    family.update({name: combine(base, (1.0, task_vector(base, seed))) for name, seed in (("a", 1), ("b", 2))})
    found = {}
    dtypes = (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        # the same values in every dtype: rounded through float8 first (then exact in the others)
        paths = {
            name: save({k: v.to(torch.float8_e4m3fn).to(dtype) for k, v in sd.items()}, tmp_path / f"{name}-{dtype}",
                       shape, dtype=dtype)
            for name, sd in family.items()
        }
        models = [load_checkpoint(str(paths["a"]), "a"), load_checkpoint(str(paths["b"]), "b")]
        result = analyze(models, load_checkpoint(str(paths["base"]), "base"), AnalysisOptions("cpu", 4, 0))
        assert result.coverage.randomized_svd_tensors > 0
        found[dtype] = [lm.metrics for lm in result.layer_metrics]
    reference = found[torch.float32]
    for dtype in dtypes[:-1]:
        for got, want in zip(found[dtype], reference, strict=True):
            assert got.keys() == want.keys()
            for name, value in want.items():
                assert got[name] == pytest.approx(value, abs=1e-5), (dtype, name)


def test_the_gpu_paths_give_the_cpu_answers(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    # no GPU here: run the whole-tensor, float64-sum, torch.mm paths a GPU takes on the CPU
    from mergelens_mcp.analysis import spectral

    def run() -> list[dict[str, float]]:
        models = [load_checkpoint(str(family.finetune_a), "a"), load_checkpoint(str(family.finetune_b), "b")]
        result = analyze(models, load_checkpoint(str(family.base), "base"), AnalysisOptions("cpu", 8, 0))
        assert result.coverage.randomized_svd_tensors > 0
        return [lm.metrics for lm in result.layer_metrics]

    chunked = run()
    monkeypatch.setattr(spectral, "on_accelerator", lambda t: True)
    whole = run()
    for got, want in zip(whole, chunked, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.parametrize("with_base", [True, False], ids=["with a base", "weights only"])
def test_svds_finished_in_the_elementwise_pass_match_their_own_final_products(
    family: Family, monkeypatch: pytest.MonkeyPatch, with_base: bool
) -> None:
    from mergelens_mcp.analysis import spectral

    own_products = []
    times = spectral._times
    monkeypatch.setattr(spectral, "_times", lambda *args: own_products.append(1) or times(*args))

    def run() -> tuple[list[dict[str, float]], list[float]]:
        models = [load_checkpoint(str(family.finetune_a), "a"), load_checkpoint(str(family.finetune_b), "b")]
        base = load_checkpoint(str(family.base), "base") if with_base else None
        result = analyze(models, base, AnalysisOptions("cpu", 8, 0))
        assert result.coverage.randomized_svd_tensors > 0
        return [lm.metrics for lm in result.layer_metrics], [lm.score for lm in result.layer_metrics]

    fused, fused_scores = run()
    assert own_products == []  # every randomized SVD took its final product in the pass
    monkeypatch.setattr(Operand, "fusable", property(lambda op: False))
    separate, separate_scores = run()
    assert len(own_products) > 0
    assert fused_scores == pytest.approx(separate_scores, abs=0.01)
    assert any("spectral_overlap" in got for got in fused)
    for got, want in zip(fused, separate, strict=True):
        assert got.keys() == want.keys() and ("task_cosine" in got) == with_base
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-6), name
