"""The benchmark's statistics against values computed by hand."""

import math

import pytest

from benchmarks.mergeability.stats import (
    additive_residuals,
    average_ranks,
    fit_ridge,
    hit_rate,
    leave_one_group_out,
    pearson,
    spearman,
    within_group_spearman,
)


def test_pearson_of_a_hand_case():
    # x = [1, 2, 3], y = [1, 3, 2]: sxy = 1, sxx = syy = 2 -> 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_pearson_is_one_for_an_exact_line_and_minus_one_reversed():
    assert pearson([1, 2, 4, 8], [3, 5, 9, 17]) == pytest.approx(1.0)
    assert pearson([1, 2, 4, 8], [-1, -2, -4, -8]) == pytest.approx(-1.0)


def test_pearson_is_undefined_for_a_constant_side_or_too_few_points():
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1, 2], [2, 1]) is None


def test_paired_samples_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2, 3], [1, 2])


def test_tied_values_share_the_mean_of_their_ranks():
    assert average_ranks([10, 20, 20, 5, 20]) == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_spearman_is_one_for_any_monotone_relation():
    x = [0.1, 0.5, 2.0, 7.0, 30.0]
    assert spearman(x, [math.exp(v) for v in x]) == pytest.approx(1.0)


def test_spearman_with_ties_matches_a_hand_computation():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]
    # mean 2.5; dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -.5, .5, 1.5]; sxy = 4.5, sxx = 4.5, syy = 5
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_within_group_spearman_averages_over_each_group_of_rows():
    groups = [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    x = [1, 2, 3, 4, 5, 6]
    y = [1, 2, 3, 6, 5, 4]
    avg, per = within_group_spearman(groups, x, y)
    assert per["a"] == pytest.approx(1.0)  # rows 0, 1, 2
    assert per["b"] == pytest.approx(0.5)  # rows 0, 3, 4: x [1, 4, 5], y [1, 6, 5]
    assert per["c"] == pytest.approx(0.5)  # rows 1, 3, 5: x [2, 4, 6], y [2, 6, 4]
    assert per["d"] == pytest.approx(0.5)  # rows 2, 4, 5: x [3, 5, 6], y [3, 5, 4]
    assert avg == pytest.approx(0.625)


def test_leave_one_group_out_never_trains_on_a_held_out_group():
    groups = [("a", "b"), ("a", "c"), ("b", "c"), ("c", "d")]
    seen = []

    def fit(rows, y):
        seen.append(sorted(y))
        return lambda row: float(len(rows))

    preds = leave_one_group_out(groups, [[0.0]] * 4, [1.0, 2.0, 3.0, 4.0], fit)
    # fold a trains on rows 2, 3; fold b on rows 1, 3; fold c on row 0 (d has no first-group rows)
    assert seen == [[3.0, 4.0], [2.0, 4.0], [1.0]]
    assert preds == [2.0, 2.0, 2.0, 1.0]


def test_ridge_recovers_a_linear_relation():
    rows = [[float(i), float(i % 3)] for i in range(30)]
    y = [2.0 * a - 3.0 * b + 1.0 for a, b in rows]
    predict = fit_ridge(rows, y, alpha=1e-6)
    assert predict([10.0, 1.0]) == pytest.approx(18.0, abs=1e-3)


def test_hit_rate_accepts_methods_within_the_tolerance_of_the_best():
    outcomes = [{"linear": 0.9, "ties": 0.89}, {"linear": 0.5, "ties": 0.8}, {"linear": 0.7}, {"ties": 0.1}]
    rate, hits, rows = hit_rate(["ties", "linear", "della", None], outcomes, tolerance=0.02)
    assert (hits, rows) == (1, 3)
    assert rate == pytest.approx(1 / 3)


def test_additive_residuals_vanish_for_an_outcome_made_of_per_model_effects():
    effects = {"a": 0.1, "b": 0.5, "c": -0.2, "d": 0.3}
    pairs = [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    y = [1.0 + effects[p] + effects[q] for p, q in pairs]
    assert max(abs(r) for r in additive_residuals(pairs, y)) < 1e-9


def test_additive_residuals_keep_a_pair_specific_bump():
    pairs = [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    y = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # only the pair (c, d) merges well
    # with four models the complementary pair (a, b) shares the bump: the residual space has rank 2,
    # spanned by ab + cd - ac - bd and ab + cd - ad - bc; projecting e_cd gives [1/3, -1/6 x 4, 1/3]
    expected = [1 / 3, -1 / 6, -1 / 6, -1 / 6, -1 / 6, 1 / 3]
    assert additive_residuals(pairs, y) == pytest.approx(expected, abs=1e-9)
