"""Each merge method of the benchmark (the product's methods, the benchmark's parameters) against a case
computed by hand."""

import math

import pytest
import torch

from benchmarks.mergeability.merge import METHODS, MergeSpec, merge_states, spec_from_strategy

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


def test_ties_trims_elects_the_sign_by_mass_and_takes_the_disjoint_mean():
    # trimmed: a = [3, 0, 2, 0], b = [-4, 0, 4, 0]; mass = [-1, 0, 6, 0] -> signs [-, +, +, +]
    # agreeing entries: coordinate 0 only b (-4), coordinate 2 both (mean 3), others none
    merged = merge_states(MergeSpec("ties", weights=(1.0, 1.0), density=0.5), BASE, A, B)
    assert torch.allclose(merged["w"], torch.tensor([1.0 - 4.0, 1.0, 1.0 + 3.0, 1.0]))


def test_ties_at_full_density_on_agreeing_vectors_is_their_mean():
    b = {"w": BASE["w"] + 3 * TAU_A}
    merged = merge_states(MergeSpec("ties", density=1.0), BASE, A, b)
    assert torch.allclose(merged["w"], BASE["w"] + 2 * TAU_A)


def test_dare_keeps_a_seeded_share_of_entries_rescaled_to_the_task_vectors_l1_mass():
    # b = base: the merge is base + the surviving entries of tau_a, scaled by one factor (mergekit's rescale)
    base = {"w": torch.zeros(10000)}
    tau = torch.linspace(-1.0, 1.0, 10000)
    a = {"w": tau.clone()}
    merged = merge_states(MergeSpec("dare_linear", density=0.25), base, a, base, seed=7)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    ratio = merged[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert math.isclose(merged.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)
    assert torch.equal(merged, merge_states(MergeSpec("dare_linear", density=0.25), base, a, base, seed=7)["w"])
    assert not torch.equal(merged, merge_states(MergeSpec("dare_linear", density=0.25), base, a, base, seed=8)["w"])


def test_dare_draws_follow_the_tensor_names_not_the_state_dict_order():
    # mergekit-yaml --random-seed draws tensor after tensor in name order; so does the benchmark
    g = torch.Generator().manual_seed(0)
    base = {n: torch.zeros(50) for n in ("z", "a", "m")}
    a = {n: torch.randn(50, generator=g) for n in base}
    b = {n: torch.randn(50, generator=g) for n in base}
    forward = merge_states(METHODS["dare_ties"], base, a, b, seed=3)
    backward = merge_states(METHODS["dare_ties"], dict(reversed(base.items())), a, b, seed=3)
    assert list(forward) == ["z", "a", "m"]
    assert all(torch.equal(forward[n], backward[n]) for n in base)


def test_dare_at_full_density_equals_task_arithmetic_or_its_sign_elected_form():
    linear = merge_states(MergeSpec("dare_linear", density=1.0), BASE, A, B)
    assert torch.allclose(linear["w"], BASE["w"] + TAU_A + TAU_B)
    elected = merge_states(MergeSpec("dare_ties", density=1.0), BASE, A, B)
    # mass [-1, 1, 6, 0.25] -> signs [-, +, +, +]: [-4, 2, 6, 0.5]
    assert torch.allclose(elected["w"], BASE["w"] + torch.tensor([-4.0, 2.0, 6.0, 0.5]))


def slerp_states(t, v0, v1):
    zero = {"w": torch.zeros_like(v0)}
    return merge_states(MergeSpec("slerp", t=t), zero, {"w": v0}, {"w": v1})["w"]


def test_slerp_of_orthogonal_unit_vectors_lands_on_the_diagonal():
    out = slerp_states(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_keeps_the_unnormalized_magnitudes_in_its_weights():
    # theta = pi/2, s0 = s1 = sin(pi/4)
    out = slerp_states(0.5, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(2.0), math.sqrt(0.5)]))


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    out = slerp_states(0.5, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert torch.allclose(out, torch.tensor([1.5, 0.0]))


def test_slerp_goes_from_model_a_at_t_0_to_model_b_at_t_1():
    assert torch.allclose(slerp_states(0.0, A["w"], B["w"]), A["w"])
    assert torch.allclose(slerp_states(1.0, A["w"], B["w"]), B["w"], atol=1e-6)


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
    dare = {"weight": [1.0, 1.0], "lambda": 1.0, "normalize": False, "density": 0.5, "rescale": True}
    assert METHODS["dare_linear"].describe() == dare


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
