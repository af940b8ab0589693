"""Each merge method of the benchmark against a case computed by hand."""

import math

import pytest
import torch

from benchmarks.mergeability.merge import (
    METHODS,
    MergeSpec,
    drop_and_rescale,
    merge_states,
    slerp_tensor,
    spec_from_strategy,
    trim_by_magnitude,
)

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
TAU_A = torch.tensor([3.0, -1.0, 2.0, 0.5])
TAU_B = torch.tensor([-4.0, 2.0, 4.0, -0.25])
A = {"w": BASE["w"] + TAU_A}
B = {"w": BASE["w"] + TAU_B}


def test_linear_merge_is_the_weighted_mean_of_the_models():
    merged = merge_states(MergeSpec("linear", weights=(3.0, 1.0)), BASE, A, B)
    assert torch.allclose(merged["w"], torch.tensor([2.25, 0.75, 3.5, 1.3125]))


def test_task_arithmetic_adds_both_weighted_task_vectors_to_the_base():
    merged = merge_states(MergeSpec("task_arithmetic", weights=(1.0, 0.5), lam=2.0), BASE, A, B)
    # 1 + 2 * (tau_a + 0.5 * tau_b)
    assert torch.allclose(merged["w"], torch.tensor([3.0, 1.0, 9.0, 1.75]))


def test_trimming_keeps_the_largest_magnitudes():
    assert torch.equal(trim_by_magnitude(TAU_B, 0.5), torch.tensor([-4.0, 0.0, 4.0, 0.0]))
    assert torch.equal(trim_by_magnitude(TAU_A, 0.25), torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_ties_trims_elects_the_sign_by_mass_and_takes_the_disjoint_mean():
    # trimmed: a = [3, 0, 2, 0], b = [-4, 0, 4, 0]; mass = [-1, 0, 6, 0] -> signs [-, +, +, +]
    # agreeing entries: coordinate 0 only b (-4), coordinate 2 both (mean 3), others none
    merged = merge_states(MergeSpec("ties", weights=(1.0, 1.0), density=0.5), BASE, A, B)
    assert torch.allclose(merged["w"], torch.tensor([1.0 - 4.0, 1.0, 1.0 + 3.0, 1.0]))


def test_ties_at_full_density_on_agreeing_vectors_is_their_mean():
    b = {"w": BASE["w"] + 3 * TAU_A}
    merged = merge_states(MergeSpec("ties", density=1.0), BASE, A, b)
    assert torch.allclose(merged["w"], BASE["w"] + 2 * TAU_A)


def test_dare_keeps_a_seeded_share_of_entries_rescaled_by_the_inverse_density():
    tau = torch.arange(1.0, 10001.0)
    dropped = drop_and_rescale(tau, 0.25, torch.Generator().manual_seed(7))
    kept = dropped != 0
    assert torch.allclose(dropped[kept], tau[kept] * 4.0)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = drop_and_rescale(tau, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(dropped, again)


def test_dare_linear_sums_the_rescaled_survivors_of_both_task_vectors():
    merged = merge_states(MergeSpec("dare_linear", density=0.5), BASE, A, B, seed=3)["w"]
    # each coordinate is 1 + 2 * (kept_a * tau_a + kept_b * tau_b) for some kept_a, kept_b in {0, 1}
    for i in range(4):
        options = {1.0 + 2 * (ka * TAU_A[i].item() + kb * TAU_B[i].item()) for ka in (0, 1) for kb in (0, 1)}
        assert any(math.isclose(merged[i].item(), o) for o in options)
    assert torch.equal(merged, merge_states(MergeSpec("dare_linear", density=0.5), BASE, A, B, seed=3)["w"])


def test_dare_at_full_density_equals_task_arithmetic_or_its_sign_elected_form():
    linear = merge_states(MergeSpec("dare_linear", density=1.0), BASE, A, B)
    assert torch.allclose(linear["w"], BASE["w"] + TAU_A + TAU_B)
    elected = merge_states(MergeSpec("dare_ties", density=1.0), BASE, A, B)
    # mass [-1, 1, 6, 0.25] -> signs [-, +, +, +]: [-4, 2, 6, 0.5]
    assert torch.allclose(elected["w"], BASE["w"] + torch.tensor([-4.0, 2.0, 6.0, 0.5]))


def test_slerp_of_orthogonal_unit_vectors_lands_on_the_diagonal():
    out = slerp_tensor(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_keeps_the_unnormalized_magnitudes_in_its_weights():
    # theta = pi/2, s0 = s1 = sin(pi/4)
    out = slerp_tensor(0.5, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(2.0), math.sqrt(0.5)]))


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    out = slerp_tensor(0.5, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert torch.allclose(out, torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("name", ["linear", "slerp"])
def test_interpolating_a_model_with_itself_returns_that_model(name):
    merged = merge_states(METHODS[name], BASE, A, A)
    assert torch.allclose(merged["w"], A["w"], atol=1e-6)


def test_ties_of_a_model_with_itself_keeps_only_its_trimmed_task_vector():
    merged = merge_states(METHODS["ties"], BASE, A, A)
    assert torch.allclose(merged["w"], BASE["w"] + torch.tensor([3.0, 0.0, 2.0, 0.0]))


def test_the_benchmark_methods_use_the_documented_parameters():
    ties = {"weight": [1.0, 1.0], "lambda": 1.0, "normalize": True, "density": 0.5}
    assert METHODS["ties"].describe() == ties
    assert METHODS["task_arithmetic"].describe() == {"weight": [1.0, 1.0], "lambda": 1.0, "normalize": False}
    assert METHODS["slerp"].describe() == {"t": 0.5}


def test_an_unknown_method_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="known"):
        merge_states(MergeSpec("frankenmerge"), BASE, A, B)


def test_a_recommendation_becomes_the_merge_it_describes():
    parameters = {"weights": {"model_a": 0.5, "model_b": 0.5}, "density": 0.6, "normalize": True}
    spec = spec_from_strategy("ties", parameters)
    assert spec == MergeSpec("ties", weights=(0.5, 0.5), density=0.6, normalize=True)
    assert spec_from_strategy("slerp", {"t": 0.3}).t == 0.3
    assert spec_from_strategy("task_arithmetic", {}) == MergeSpec("task_arithmetic", normalize=None)


def test_a_recommended_method_the_benchmark_does_not_run_gives_no_merge():
    assert spec_from_strategy("model_stock", {}) is None


def test_task_arithmetic_with_normalize_divides_by_the_weights():
    merged = merge_states(MergeSpec("task_arithmetic", weights=(1.0, 3.0), normalize=True), BASE, A, B)
    # 1 + (tau_a + 3 tau_b) / 4
    assert torch.allclose(merged["w"], BASE["w"] + (TAU_A + 3 * TAU_B) / 4)
