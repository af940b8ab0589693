"""SVDs for the spectral metrics: exact below the cap, randomized above it, the randomized error bounded against
the exact one; the spectrum's tail model; spectral coverage of every 2-D parameter."""

from __future__ import annotations

import pytest
import torch

from mergelens_mcp.analysis import spectral
from mergelens_mcp.analysis.engine import AnalysisOptions, analyze
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.analysis.metrics import REGISTRY, Operand, _effective_rank
from mergelens_mcp.analysis.spectral import EXACT_MAX_ELEMENTS, OVERSAMPLE, POWER_ITERS, decompose
from mergelens_mcp.demo import Family

RANK = 16


def with_spectrum(m: int, n: int, singular: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) V^T with seeded random orthonormal U (m x r) and V (n x r)."""
    g = torch.Generator().manual_seed(seed)
    r = singular.numel()
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (u * singular.double()) @ v.T


def decaying(m: int = 160, n: int = 120, seed: int = 0, rate: float = 0.7) -> torch.Tensor:
    return with_spectrum(m, n, rate ** torch.arange(min(m, n), dtype=torch.float64), seed).float()


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / k for two m x k orthonormal bases: 1 when they span the same subspace."""
    return float((a.T.double() @ b.double()).pow(2).sum()) / a.shape[1]


def test_small_matrices_get_the_exact_svd() -> None:
    m = decaying(40, 30)
    svd = decompose(m, rank=4, exact_max_elements=40 * 30)
    assert svd.exact and svd.k == 4
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(m))
    assert svd.total_energy == pytest.approx(float(m.double().pow(2).sum()), rel=1e-6)


def test_a_rank_close_to_the_dimension_stays_exact_even_above_the_cap() -> None:
    assert decompose(decaying(40, 20), rank=16, exact_max_elements=0).exact  # 16 + 16 oversampling >= 20


def test_the_randomized_svd_matches_the_exact_one_on_a_decaying_spectrum() -> None:
    m = decaying()
    exact = decompose(m, rank=8, exact_max_elements=m.numel())
    approx = decompose(m, rank=8, exact_max_elements=0)
    assert exact.exact and not approx.exact
    assert approx.k == 8 and approx.u.shape == (160, 8) and approx.v.shape == (120, 8)
    rel = (approx.s[:8] - exact.s[:8]).abs() / exact.s[:8]
    assert float(rel.max()) < 1e-4
    assert overlap(approx.u, exact.u) > 0.999 and overlap(approx.v, exact.v) > 0.999
    assert approx.total_energy == pytest.approx(exact.total_energy, rel=1e-5)


def test_randomized_singular_values_never_exceed_the_exact_ones_even_on_a_flat_spectrum() -> None:
    m = torch.randn(150, 130, generator=torch.Generator().manual_seed(3))  # no decay: the hard case
    exact = torch.linalg.svdvals(m)
    approx = decompose(m, rank=8, exact_max_elements=0)
    q = approx.s.numel()
    assert bool((approx.s <= exact[:q] * (1 + 1e-5)).all())  # a projection can only shrink them
    assert float(((exact[:8] - approx.s[:8]) / exact[:8]).max()) < 0.15  # the power iteration bounds the loss


def test_the_randomized_svd_is_deterministic_for_a_seed() -> None:
    m = decaying(seed=5)
    first, second = decompose(m, rank=8, exact_max_elements=0), decompose(m, rank=8, exact_max_elements=0)
    assert torch.equal(first.s, second.s) and torch.equal(first.u, second.u)


def exact_and_randomized(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    m = REGISTRY[name]
    big = a.numel()
    exact = m(Operand(a, rank=8, exact_max_elements=big), Operand(b, rank=8, exact_max_elements=big))
    approx = m(Operand(a, rank=8, exact_max_elements=0), Operand(b, rank=8, exact_max_elements=0))
    return exact, approx


@pytest.mark.parametrize("name", ["spectral_overlap", "tsv_interference"])
def test_top_k_metrics_barely_move_between_the_exact_and_the_randomized_path(name: str) -> None:
    a = decaying(seed=1)
    b = a + 0.05 * decaying(seed=2)
    exact, approx = exact_and_randomized(name, a, b)
    assert approx == pytest.approx(exact, abs=0.01)


def test_effective_rank_ratio_barely_moves_between_the_exact_and_the_randomized_path() -> None:
    # above the exact-SVD cap the spectrum past the k + 16 computed values is a power-law tail fitted to them:
    # 0.83 against 0.84 exact here (0.76 with 8 oversampled values, 0.67 with the residual spread evenly)
    a = decaying(seed=1)
    b = a + 0.05 * decaying(seed=2)
    exact, approx = exact_and_randomized("effective_rank_ratio", a, b)
    assert approx == pytest.approx(exact, abs=0.05)


def top_errors(matrix: torch.Tensor, k: int) -> tuple[float, float, float]:
    """(max relative error of the top-k singular values, left and right subspace overlap) vs exact."""
    approx = decompose(matrix, RANK, exact_max_elements=0)
    assert not approx.exact
    u, s, vh = (x.double() for x in torch.linalg.svd(matrix, full_matrices=False))
    rel = float(((approx.s[:k].double() - s[:k]).abs() / s[:k]).max())
    left = float(((approx.u[:, :k].double().T @ u[:, :k]) ** 2).sum()) / k
    right = float(((approx.v[:, :k].double().T @ vh[:k].T) ** 2).sum()) / k
    return rel, left, right


def test_randomized_svd_error_stays_bounded_on_a_slow_power_law_spectrum() -> None:
    # s_i = 1 / (i + 1): the hard case for a sketch, with much energy past the top 16
    matrix = with_spectrum(640, 480, 1.0 / torch.arange(1, 401, dtype=torch.float64), seed=2).float()
    rel, left, right = top_errors(matrix, 8)
    assert rel < 1e-3
    assert left > 0.999 and right > 0.999
    rel16, left16, right16 = top_errors(matrix, RANK)
    assert rel16 < 0.02
    assert left16 > 0.98 and right16 > 0.98


def test_randomized_svd_of_a_low_rank_update_plus_noise_finds_the_update() -> None:
    g = torch.Generator().manual_seed(3)
    update = torch.randn(640, 8, generator=g) @ torch.randn(8, 480, generator=g)
    matrix = update + 0.01 * torch.randn(640, 480, generator=g)
    approx = decompose(matrix, RANK, exact_max_elements=0)
    exact = torch.linalg.svdvals(matrix)
    assert torch.allclose(approx.s[:8], exact[:8], rtol=1e-3)
    assert approx.total_energy == pytest.approx(float(matrix.double().pow(2).sum()), rel=1e-5)


def test_matrices_up_to_the_cap_get_the_exact_svd() -> None:
    matrix = with_spectrum(512, 512, 0.9 ** torch.arange(100, dtype=torch.float64), seed=5).float()
    assert matrix.numel() == EXACT_MAX_ELEMENTS
    result = decompose(matrix, RANK)
    assert result.exact
    assert result.s.numel() == 512 and result.k == RANK
    assert torch.allclose(result.s, torch.linalg.svdvals(matrix), atol=1e-5)


def test_spectrum_past_the_computed_values_is_a_decreasing_tail_holding_the_residual_energy() -> None:
    matrix = with_spectrum(640, 480, 1.0 / torch.arange(1, 301, dtype=torch.float64), seed=6).float()
    approx = decompose(matrix, RANK, exact_max_elements=0)
    spectrum = approx.spectrum()
    assert spectrum.numel() == 480
    assert float(spectrum.double().pow(2).sum()) == pytest.approx(approx.total_energy, rel=1e-4)
    tail = spectrum[approx.s.numel():]
    assert float(tail[0]) <= float(approx.s[-1]) * (1 + 1e-6)
    assert bool((tail[1:] <= tail[:-1]).all()) and float(tail[-1]) < float(tail[0]) / 5
    assert bool((spectrum[: approx.s.numel()] == approx.s).all())


def test_effective_rank_from_the_tail_model_is_within_15_percent_on_a_power_law_spectrum() -> None:
    # s_i = 1/i: the residual spread evenly would put the effective rank 60% too high (180 vs 112)
    matrix = with_spectrum(640, 480, 1.0 / torch.arange(1, 481, dtype=torch.float64), seed=2).float()
    exact = _effective_rank(decompose(matrix, RANK))
    approx = _effective_rank(decompose(matrix, RANK, exact_max_elements=0))
    assert approx == pytest.approx(exact, rel=0.15)


def test_a_flat_spectrum_keeps_an_even_tail() -> None:
    matrix = with_spectrum(640, 480, torch.ones(480, dtype=torch.float64), seed=7).float()
    spectrum = decompose(matrix, RANK, exact_max_elements=0).spectrum()
    assert float(spectrum.min()) == pytest.approx(float(spectrum.max()), rel=0.05)


def test_every_matrix_parameter_is_covered_and_the_sketch_is_documented(family: Family) -> None:
    models = [load_checkpoint(str(family.finetune_a), "a"), load_checkpoint(str(family.finetune_b), "b")]
    base = load_checkpoint(str(family.base), "base")
    result = analyze(models, base, AnalysisOptions(device="cpu", exact_svd_max_elements=0))
    coverage = result.coverage
    matrices = sum(t.numel for t in models[0].tensors.values() if len(t.shape) == 2 and min(t.shape) > 1)
    assert coverage.matrix_params == matrices > 0
    assert coverage.spectral_params == coverage.matrix_params
    # 2 weight and 2 task-vector SVDs per matrix, randomized with the cap at 0 unless the sketch would be as
    # wide as the matrix (rank + oversampling >= its smaller side)
    sides = [min(t.shape) for t in models[0].tensors.values() if len(t.shape) == 2]
    sketched = sum(1 for d in sides if min(RANK, d) + OVERSAMPLE < d)
    assert 0 < sketched < len(sides)
    assert coverage.randomized_svd_tensors == 4 * sketched
    assert coverage.exact_svd_tensors == 4 * (len(sides) - sketched)
    assert (coverage.svd_rank, coverage.svd_oversample, coverage.svd_power_iterations) == (
        RANK, OVERSAMPLE, POWER_ITERS
    )
    assert any(f"{POWER_ITERS} power iterations" in note for note in result.notes)


def test_exact_and_randomized_paths_give_close_metrics_on_the_fixture_family(family: Family) -> None:
    def run(cap: int) -> dict[str, float]:
        models = [load_checkpoint(str(family.finetune_a), "a"), load_checkpoint(str(family.finetune_b), "b")]
        result = analyze(models, load_checkpoint(str(family.base), "base"), AnalysisOptions("cpu", RANK, cap))
        layer = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.1")
        return layer.metrics

    exact, randomized = run(10**9), run(0)
    for name in ("spectral_overlap", "tsv_interference", "task_vector_energy", "effective_rank_ratio"):
        assert randomized[name] == pytest.approx(exact[name], abs=0.05), name


def test_a_difference_decomposes_like_the_float32_difference_without_being_formed() -> None:
    g = torch.Generator().manual_seed(8)
    base = torch.randn(700, 520, generator=g).to(torch.bfloat16)
    update = torch.randn(700, 6, generator=g) @ torch.randn(6, 520, generator=g) * 0.02
    model = (base.float() + update).to(torch.bfloat16)
    difference = model.float() - base.float()
    direct = decompose(difference, RANK, exact_max_elements=0)
    streamed = decompose(model, RANK, exact_max_elements=0, minus=base)
    assert not streamed.exact
    torch.testing.assert_close(streamed.s[:6], direct.s[:6], rtol=1e-3, atol=0)
    assert streamed.total_energy == pytest.approx(float(difference.double().pow(2).sum()), rel=1e-5)
    overlap = float(((streamed.u[:, :6].double().T @ direct.u[:, :6].double()) ** 2).sum()) / 6
    assert overlap > 0.999


def test_a_matrix_stored_in_bfloat16_decomposes_like_its_float32_values() -> None:
    stored = with_spectrum(640, 480, 0.8 ** torch.arange(200, dtype=torch.float64), seed=9).float().to(torch.bfloat16)
    as_stored = decompose(stored, RANK, exact_max_elements=0)
    upcast = decompose(stored.float(), RANK, exact_max_elements=0)
    torch.testing.assert_close(as_stored.s, upcast.s, rtol=1e-6, atol=0)
    exact = torch.linalg.svdvals(stored.double())
    assert float(((as_stored.s[:RANK].double() - exact[:RANK]).abs() / exact[:RANK]).max()) < 1e-4


def test_the_float32_product_gives_what_torch_mm_gives() -> None:
    from mergelens_mcp.analysis import spectral

    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(300, 257, generator=g), torch.randn(33, 257, generator=g)
    reference = x.double() @ w.double().T
    ours = spectral._matmul_t(x, w)
    assert ours.dtype == torch.float32 and ours.shape == (300, 33)
    assert float((ours.double() - reference).abs().max() / reference.abs().max()) < 1e-6


def stored_task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, base, model - base in float32): bf16 weights whose difference has the slow s_i = 1/i spectrum."""
    g = torch.Generator().manual_seed(seed)
    base = (0.005 * torch.randn(640, 480, generator=g)).bfloat16()  # rounding the model adds little noise
    update = with_spectrum(640, 480, 1.0 / torch.arange(1, 401, dtype=torch.float64), seed=seed).float()
    model = (base.float() + update).bfloat16()
    return model, base, model.float() - base.float()


def test_a_stored_bf16_task_vector_keeps_the_bounds_of_its_float32_difference() -> None:
    model, base, task = stored_task(seed=7)
    approx = decompose(model, RANK, exact_max_elements=0, minus=base)
    u, s, vh = (x.double() for x in torch.linalg.svd(task, full_matrices=False))
    rel8 = float(((approx.s[:8].double() - s[:8]).abs() / s[:8]).max())
    rel16 = float(((approx.s[:RANK].double() - s[:RANK]).abs() / s[:RANK]).max())
    assert rel8 < 1e-3 and rel16 < 0.02
    assert overlap(approx.u[:, :8], u[:, :8]) > 0.999 and overlap(approx.v[:, :8], vh[:8].T) > 0.999
    assert approx.total_energy == pytest.approx(float(task.double().pow(2).sum()), rel=1e-5)


def test_the_reused_bf16_buffer_gives_the_same_svd_as_a_fresh_copy_and_is_freed_on_release() -> None:
    model, base, _ = stored_task(seed=8)
    spectral.release_scratch()
    shared = decompose(model, RANK, exact_max_elements=0, minus=base)  # rounds into the shared buffer
    assert spectral._SCRATCH.buffer.numel() == model.numel()
    with spectral._SCRATCH.lock:  # held, as by another thread's SVD: this one makes its own copy
        fresh = decompose(model, RANK, exact_max_elements=0, minus=base)
    assert torch.equal(shared.s, fresh.s) and torch.equal(shared.u, fresh.u) and torch.equal(shared.v, fresh.v)
    spectral.release_scratch()
    assert spectral._SCRATCH.buffer.numel() == 0


def test_a_float32_matrix_and_its_subtrahend_are_left_as_they_were() -> None:
    a, b = decaying(seed=3), 0.5 * decaying(seed=4)
    a_before, b_before = a.clone(), b.clone()
    svd = decompose(a, RANK, exact_max_elements=0, minus=b)
    assert torch.equal(a, a_before) and torch.equal(b, b_before)
    assert svd.total_energy == pytest.approx(float((a - b).double().pow(2).sum()), rel=1e-5)


def test_an_energy_the_caller_measured_is_kept_and_the_singular_values_do_not_change() -> None:
    m = decaying(seed=9)
    measured = decompose(m, RANK, exact_max_elements=0)
    given = decompose(m, RANK, exact_max_elements=0, energy=123.0)
    assert given.total_energy == 123.0 and torch.equal(given.s, measured.s)


def test_the_transposed_product_equals_the_plain_one() -> None:
    g = torch.Generator().manual_seed(10)
    low, basis = torch.randn(300, 200, generator=g).bfloat16(), torch.randn(300, 32, generator=g)
    expected = low.float().T @ basis.bfloat16().float()
    torch.testing.assert_close(spectral._transposed_times(low, basis).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_the_gram_path_gives_the_exact_svds_values_and_top_subspaces_tall_or_wide(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(*shape, generator=g) * 0.02
    base = torch.randn(*shape, generator=g) * 0.02
    for minus in (None, base):
        exact, gram = decompose(a, minus=minus), spectral.gram_decompose(a, minus=minus)
        assert gram.exact and gram.full_dim == exact.full_dim == 64 and gram.k == exact.k == 16
        assert tuple(gram.u.shape) == (shape[0], 16) and tuple(gram.v.shape) == (shape[1], 16)
        assert float((gram.s - exact.s).abs().max()) <= 3e-4 * float(exact.s[0])
        assert gram.total_energy == pytest.approx(exact.total_energy, rel=1e-5)
        for x, y in ((gram.u, exact.u), (gram.v, exact.v)):  # the same top-16 subspace, orthonormal columns
            assert float((x.T @ y).pow(2).sum()) / 16 == pytest.approx(1.0, abs=1e-4)
            assert torch.allclose(x.T @ x, torch.eye(16), atol=1e-4)


def test_the_gram_path_leaves_vectors_of_zero_singular_values_at_zero() -> None:
    g = torch.Generator().manual_seed(12)
    rank_two = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    svd = spectral.gram_decompose(rank_two)
    assert float(svd.s[2:].max()) <= 1e-3 * float(svd.s[0])
    assert torch.allclose(svd.s[:2], torch.linalg.svdvals(rank_two)[:2], rtol=1e-4)
    assert torch.isfinite(svd.u).all() and torch.isfinite(svd.v).all()
    zero = spectral.gram_decompose(torch.zeros(8, 6))
    assert float(zero.s.abs().max()) == 0.0 and float(zero.u.abs().max()) == 0.0 and zero.total_energy == 0.0
