"""Each merge method of mergelens_mcp.mergekit.methods against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mergelens_mcp.errors import ConfigError, IncompatibleModelsError
from mergelens_mcp.mergekit import methods, schema
from mergelens_mcp.mergekit.methods import (
    IMPLEMENTATIONS,
    METHODS,
    UNIMPLEMENTED,
    keep_by_rank,
    keep_largest,
    keep_middle,
    keep_random,
    merge_tensors,
    rescale_l1,
    seeded_stream,
    slerp,
)

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TAU_A = torch.tensor([3.0, -1.0, 2.0, 0.5])
TAU_B = torch.tensor([-4.0, 2.0, 4.0, -0.25])
A, B = BASE + TAU_A, BASE + TAU_B


def merge(method, tensors, **kwargs):
    return merge_tensors(method, tensors, base=kwargs.pop("base", BASE), **kwargs)


def test_linear_is_the_weighted_mean_or_with_normalize_off_the_weighted_sum():
    assert torch.allclose(merge("linear", [A, B], parameters={"weight": [3.0, 1.0]}),
                          torch.tensor([2.25, 0.75, 3.5, 1.3125]))
    raw = merge("linear", [A, B], parameters={"weight": [3.0, 1.0], "normalize": False})
    assert torch.allclose(raw, torch.tensor([9.0, 3.0, 14.0, 5.25]))


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors_to_the_base():
    merged = merge("task_arithmetic", [A, B], parameters={"weight": [1.0, 0.5], "lambda": 2.0})
    assert torch.allclose(merged, torch.tensor([3.0, 1.0, 9.0, 1.75]))  # 1 + 2 * (tau_a + 0.5 tau_b)
    normalized = merge("task_arithmetic", [A, B], parameters={"weight": [1.0, 3.0], "normalize": True})
    assert torch.allclose(normalized, BASE + (TAU_A + 3 * TAU_B) / 4)


def test_ties_trims_elects_the_sign_by_mass_and_takes_the_disjoint_mean():
    # trimmed (2 of 4): a = [3, 0, 2, 0], b = [-4, 0, 4, 0]; mass [-1, 0, 6, 0] -> signs [-, +, +, +]
    # coordinate 0: only b agrees (-4 / 1); coordinate 2: both (6 / 2); the others: nothing kept
    merged = merge("ties", [A, B], parameters={"weight": 1.0, "density": 0.5})
    assert torch.allclose(merged, torch.tensor([1.0 - 4.0, 1.0, 1.0 + 3.0, 1.0]))
    scaled = merge("ties", [A, B], parameters={"weight": 1.0, "density": 0.5, "lambda": 0.5, "int8_mask": True})
    assert torch.allclose(scaled, torch.tensor([1.0 - 2.0, 1.0, 1.0 + 1.5, 1.0]))


def test_ties_divides_by_the_weights_of_the_agreeing_models_only():
    # full density, weights (1, 3): deltas a = [3, -1, 2, .5], b = [-12, 6, 12, -.75]; signs [-, +, +, -]
    merged = merge("ties", [A, B], parameters={"weight": [1.0, 3.0]})
    assert torch.allclose(merged, BASE + torch.tensor([-12.0 / 3, 6.0 / 3, 14.0 / 4, -0.75 / 3]))


def test_trimming_keeps_at_least_one_entry_and_breaks_ties_like_mergekit():
    assert torch.equal(keep_largest(TAU_B, 0.5), torch.tensor([-4.0, 0.0, 4.0, 0.0]))
    assert torch.equal(keep_largest(TAU_A, 0.1), torch.tensor([3.0, 0.0, 0.0, 0.0]))  # int(0.4) -> 1
    assert torch.equal(keep_largest(TAU_A, 0.0), torch.zeros(4))
    assert torch.equal(keep_largest(TAU_A, 1.0), TAU_A)
    assert int((keep_largest(torch.ones(20), 0.25) != 0).sum()) == 5  # equal magnitudes: exactly k kept


def test_breadcrumbs_drops_the_largest_gamma_share_then_keeps_the_next_density_share():
    tau = torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, 6.0, -2.5, 1.5])
    kept = keep_middle(tau, density=0.5, gamma=0.1)  # 6 dropped, then 5, -4, 3, -2.5, 2 kept
    assert torch.equal(kept, torch.tensor([5.0, 0.0, 3.0, 0.0, -4.0, 2.0, 0.0, 0.0, -2.5, 0.0]))
    capped = keep_middle(tau, density=0.5, gamma=0.6)  # at most 1 - density dropped from the top
    assert torch.equal(capped, torch.tensor([0.0, -1.0, 0.0, 0.5, 0.0, 2.0, 0.1, 0.0, 0.0, 1.5]))
    merged = merge_tensors("breadcrumbs", [torch.zeros(10) + tau], base=torch.zeros(10),
                           parameters={"weight": 2.0, "density": 0.5, "gamma": 0.1})
    assert torch.equal(merged, 2 * kept)


def test_rescale_keeps_the_l1_mass_of_the_task_vector():
    kept = torch.tensor([3.0, 0.0, 2.0, 0.0])
    assert torch.allclose(rescale_l1(TAU_A, kept), kept * 6.5 / 5.0)
    assert torch.equal(rescale_l1(TAU_A, torch.zeros(4)), torch.zeros(4))


def test_dare_keeps_a_seeded_share_of_entries_and_replays_with_the_same_seed():
    tau = torch.arange(1.0, 10001.0)
    dropped = keep_random(tau, 0.25, seeded_stream(7))
    kept = dropped != 0
    assert torch.equal(dropped[kept], tau[kept])
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(dropped, keep_random(tau, 0.25, seeded_stream(7)))
    assert not torch.equal(dropped, keep_random(tau, 0.25, seeded_stream(8)))


def test_dare_linear_sums_survivors_rescaled_to_their_task_vectors_l1_mass():
    base = torch.zeros(1000)
    tau = torch.linspace(-1.0, 1.0, 1000)
    merged = merge_tensors("dare_linear", [base + tau], base=base, parameters={"weight": 0.5, "density": 0.3},
                           generator=seeded_stream(3))
    kept = merged != 0
    assert 0.25 < kept.float().mean().item() < 0.35
    assert math.isclose(merged.abs().sum().item(), 0.5 * tau.abs().sum().item(), rel_tol=1e-5)
    ratio = merged[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one factor for the whole tensor


def test_dare_at_full_density_is_task_arithmetic_or_its_sign_elected_form():
    linear = merge("dare_linear", [A, B], parameters={"weight": 1.0})
    assert torch.allclose(linear, BASE + TAU_A + TAU_B)
    elected = merge("dare_ties", [A, B], parameters={"weight": 1.0})
    # mass [-1, 1, 6, 0.25] -> signs [-, +, +, +]: [-4, 2, 6, 0.5], no normalization by default
    assert torch.allclose(elected, BASE + torch.tensor([-4.0, 2.0, 6.0, 0.5]))


def test_della_keeps_each_entry_with_a_probability_linear_in_its_rank_within_its_row():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(20000, 4, generator=g)
    kept = keep_by_rank(tau, density=0.5, epsilon=0.3, generator=seeded_stream(1)) != 0
    rank = tau.abs().argsort(dim=-1).argsort(dim=-1)
    shares = [kept[rank == r].float().mean().item() for r in range(4)]
    assert all(abs(s - p) < 0.02 for s, p in zip(shares, [0.2, 0.4, 0.6, 0.8], strict=True)), shares


def test_della_refuses_an_epsilon_that_leaves_the_unit_interval():
    with pytest.raises(ConfigError, match="epsilon"):
        merge("della", [A, B], parameters={"weight": 1.0, "density": 0.5, "epsilon": 0.5})


def test_della_at_full_density_is_ties_at_full_density():
    della = merge("della", [A, B], parameters={"weight": [1.0, 3.0]})
    assert torch.allclose(della, merge("ties", [A, B], parameters={"weight": [1.0, 3.0]}))


def test_slerp_of_orthogonal_unit_vectors_lands_on_the_diagonal():
    out = slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_keeps_the_unnormalized_magnitudes_in_its_weights():
    out = slerp(0.5, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))  # theta = pi/2, s0 = s1 = sin(pi/4)
    assert torch.allclose(out, torch.tensor([math.sqrt(2.0), math.sqrt(0.5)]))


def test_slerp_falls_back_to_linear_for_nearly_parallel_or_opposite_tensors():
    assert torch.allclose(slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])), torch.tensor([1.5, 0.0]))
    assert torch.allclose(slerp(0.25, torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])),
                          torch.tensor([0.25, 0.0]))


def test_slerp_decides_on_the_whole_tensor_not_row_by_row():
    # row 0 is parallel in both, but the flattened tensors are 60 degrees apart: s0 = s1 = sin(30)/sin(60)
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = 0.5 / math.sin(math.pi / 3)
    out = merge_tensors("slerp", [v1], base=v0, parameters={"t": 0.5})
    assert torch.allclose(out, s * (v0 + v1))


def test_slerp_goes_from_the_base_at_t_0_to_the_other_model_at_t_1():
    assert torch.allclose(merge("slerp", [A], parameters={"t": 0.0}), BASE)
    assert torch.allclose(merge("slerp", [A], parameters={"t": 1.0}), A, atol=1e-6)


def test_model_stock_interpolates_by_the_cosine_of_the_task_vectors():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # cos = 1/sqrt 2, t = 2c / (1 + c)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(merge_tensors("model_stock", [a, b], base=base), t * torch.tensor([1.0, 0.5]))
    orthogonal = merge_tensors("model_stock", [a, torch.tensor([0.0, 1.0])], base=base)
    assert torch.allclose(orthogonal, base)  # cos 0: the base
    same = merge_tensors("model_stock", [a, 2 * a], base=base)
    assert torch.allclose(same, 1.5 * a)  # cos 1: the models' mean


def test_model_stock_filter_wise_uses_one_cosine_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # row 0: cos 1 -> mean; row 1: cos 0 -> base
    out = merge_tensors("model_stock", [a, b], base=base, parameters={"filter_wise": True})
    assert torch.allclose(out, torch.tensor([[1.5, 0.0], [0.0, 0.0]]))


def test_passthrough_returns_its_one_input_scaled_when_asked():
    assert torch.equal(merge_tensors("passthrough", [A]), A)
    assert torch.equal(merge_tensors("passthrough", [A], parameters={"scale": 0.5}), A / 2)


def test_inputs_are_merged_in_float32_and_returned_in_the_inputs_or_the_asked_dtype():
    a, b = A.bfloat16(), B.bfloat16()
    out = merge_tensors("linear", [a, b], parameters={"weight": [1.0, 2.0]})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ((A + 2 * B) / 3).bfloat16())
    wide = merge_tensors("linear", [a, b], parameters={"weight": [1.0, 2.0]}, out_dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.allclose(wide, (A + 2 * B) / 3)
    assert merge_tensors("linear", [A.double(), b], parameters={"weight": 1.0}).dtype == torch.float64


def test_an_unknown_method_or_a_bad_parameter_is_refused_with_the_fix_named():
    with pytest.raises(ConfigError, match="known: .*linear"):
        merge_tensors("frankenmerge", [A])
    with pytest.raises(ConfigError, match="`weight`"):
        merge("ties", [A, B])
    with pytest.raises(ConfigError, match="no parameter t; its parameters: weight"):
        merge("linear", [A, B], parameters={"weight": 1.0, "t": 0.5})
    with pytest.raises(ConfigError, match="3 values for 2 models"):
        merge("linear", [A, B], parameters={"weight": [1.0, 1.0, 1.0]})
    with pytest.raises(ConfigError, match="base_model"):
        merge_tensors("task_arithmetic", [A, B], parameters={"weight": 1.0})
    with pytest.raises(ConfigError, match="at most 1"):
        merge("slerp", [A, B], parameters={"t": 0.5})
    with pytest.raises(IncompatibleModelsError, match="shapes"):
        merge("linear", [A, torch.ones(3)], parameters={"weight": 1.0})


def test_every_method_merging_a_model_with_itself_at_full_strength_returns_that_model():
    params = {"linear": {"weight": 1.0}, "slerp": {"t": 1.0}, "passthrough": {}, "model_stock": {}}
    for name, method in METHODS.items():
        tensors = [A] if method.max_models == 1 else [A, A]
        given = params.get(name, {"weight": 0.5, "normalize": True})
        out = merge_tensors(name, tensors, base=BASE, parameters=given, generator=seeded_stream(0))
        assert torch.allclose(out, A, atol=1e-6), name


def test_the_registry_holds_mergekits_methods_with_its_defaults():
    def default(method, name):
        return METHODS[method].parameter(name).default

    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "slerp", "model_stock", "passthrough"} == set(METHODS)
    normalizing = sorted(m for m in METHODS if METHODS[m].parameter("normalize") and default(m, "normalize"))
    assert normalizing == ["della", "linear", "ties"]
    assert sorted(m for m in METHODS if METHODS[m].parameter("rescale") and default(m, "rescale")) == [
        "dare_linear", "dare_ties", "della", "della_linear"]
    assert default("breadcrumbs", "gamma") == 0.01 and default("della", "epsilon") == 0.15
    assert default("ties", "density") == 1.0 and default("ties", "lambda") == 1.0
    assert sorted(m for m in METHODS if METHODS[m].random) == ["dare_linear", "dare_ties", "della", "della_linear"]
    assert sorted(m for m in METHODS if not METHODS[m].needs_base) == ["linear", "passthrough"]


def test_slerp_without_t_is_refused_naming_the_parameter():
    with pytest.raises(ConfigError, match="slerp needs `t`; add it"):
        merge("slerp", [A])


def test_every_method_is_one_entry_of_the_rulebook_either_implemented_or_refused_on_purpose():
    assert set(IMPLEMENTATIONS) <= set(schema.METHODS)
    assert not set(IMPLEMENTATIONS) & set(UNIMPLEMENTED)
    assert set(IMPLEMENTATIONS) | set(UNIMPLEMENTED) == set(schema.METHODS)
    assert all(METHODS[name] is schema.METHODS[name] for name in IMPLEMENTATIONS)  # the same entry, no copy
    assert methods.SLERP_LINEAR_FALLBACK is schema.SLERP_LINEAR_FALLBACK
    family = [name for name, spec in schema.METHODS.items() if spec.sparsification is not None]
    assert set(family) <= set(IMPLEMENTATIONS) and all(spec.sparsification in methods.SPARSIFIERS
                                                       for spec in METHODS.values() if spec.sparsification)


@pytest.mark.parametrize("name", UNIMPLEMENTED)
def test_a_method_of_the_rulebook_without_an_implementation_is_refused_naming_mergekit(name):
    with pytest.raises(ConfigError, match=f"{name}.*not implemented in mergelens' in-memory merge; mergekit can"):
        merge_tensors(name, [A, B], base=BASE, parameters={"weight": 1.0})


def test_the_counts_and_defaults_come_from_the_rulebooks_method_spec(monkeypatch):
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (1, 1)
    assert (METHODS["model_stock"].min_models, METHODS["model_stock"].max_models) == (2, None)
    ties = schema.METHODS["ties"]
    lower = tuple(schema.ParameterSpec("density", float, "non_base", default=0.5) if p.name == "density" else p
                  for p in ties.parameters)
    monkeypatch.setitem(schema.METHODS, "ties", schema.MethodSpec(**{**ties.__dict__, "parameters": lower}))
    out = merge_tensors("ties", [A], base=BASE, parameters={"weight": 1.0})
    assert torch.equal(out, BASE + torch.tensor([3.0, 0.0, 2.0, 0.0]))  # the spec's density 0.5 applied
