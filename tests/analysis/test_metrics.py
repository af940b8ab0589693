"""The metric registry: properties every registered metric must hold, and each metric against hand arithmetic.

The property tests are parametrized over REGISTRY, so a newly registered metric is covered with no new code.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergelens_mcp.analysis.metrics import REGISTRY, Metric, Operand, pair_sums, task_metrics, weight_metrics

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
NAMES = sorted(REGISTRY)
# Tried first, on top of the random draws: untouched tensors (zero task vectors) and rank-deficient ones.
EDGE_CASES = [
    (torch.zeros(3, 3), torch.zeros(3, 3), 2, 1.0),
    (torch.zeros(4), torch.ones(4), 1, 1.0),
    (torch.ones(3, 2), torch.zeros(3, 2), 1, 1.0),
    (torch.ones(3, 3), -torch.ones(3, 3), 2, 1.0),
]
VALUES = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Two same-shape tensors (1-D or 2-D, up to 6 x 6), a top-k rank, and a base norm for task metrics."""
    shape = draw(st.one_of(st.tuples(st.integers(1, 12)), st.tuples(st.integers(1, 6), st.integers(1, 6))))
    n = math.prod(shape)
    a = torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)
    if draw(st.integers(0, 7)) == 0:
        a = torch.zeros(shape)  # an untouched tensor (a zero task vector) is a real case, not an edge
    kind = draw(st.sampled_from(["independent", "scaled", "negated", "sparse"]))
    if kind == "independent":
        b = torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float32).reshape(shape)
    elif kind == "scaled":
        b = a * draw(st.floats(min_value=0.01, max_value=100.0))
    elif kind == "negated":
        b = -a
    else:
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(shape)
        b = torch.where(keep, a, torch.zeros_like(a))
    rank = draw(st.integers(1, 4))
    reference = draw(st.floats(min_value=0.1, max_value=1e4))
    return a, b, rank, reference


def _edges(test):  # type: ignore[no-untyped-def]
    for case in EDGE_CASES:
        test = example(pair=case)(test)
    return test


EDGES = _edges


def _operand(t: torch.Tensor, rank: int, reference: float) -> Operand:
    return Operand(t.clone(), rank=rank, reference_norm=reference)


def _call(m: Metric, a: torch.Tensor, b: torch.Tensor, rank: int, reference: float) -> float | None:
    """The metric's value, or None where it does not apply; finite inputs must give a finite value."""
    x, y = _operand(a, rank, reference), _operand(b, rank, reference)
    if not m.applies_to(x):
        return None
    value = m(x, y)
    assert value is not None and math.isfinite(value), f"{m.name} gave no finite value on finite inputs"
    return value


def test_the_registry_holds_the_metrics_the_issue_names_and_each_key_is_its_function_name() -> None:
    assert {
        "cosine_similarity", "l2_distance", "kl_divergence", "spectral_overlap", "effective_rank_ratio",
        "task_cosine", "sign_disagreement", "sign_disagreement_top", "tsv_interference", "task_vector_energy",
        "magnitude_ratio",
    } <= set(REGISTRY)
    for name, m in REGISTRY.items():
        assert m.fn.__name__ == name
        assert m.doc, f"{name} has no docstring stating its formula"
    assert {m.name for m in weight_metrics()} | {m.name for m in task_metrics()} == set(REGISTRY)
    assert all(m.needs_base for m in task_metrics()) and not any(m.needs_base for m in weight_metrics())


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(pair=tensor_pairs())
@EDGES
def test_every_metric_stays_within_its_declared_bounds(name: str, pair: tuple) -> None:
    m = REGISTRY[name]
    value = _call(m, *pair)
    if value is None:
        return
    lo, hi = m.bounds
    assert math.isfinite(value)
    assert value >= lo - 1e-6
    assert hi is None or value <= hi + 1e-6


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].identical is not None])
@PROPERTY_SETTINGS
@given(pair=tensor_pairs())
@EDGES
def test_every_metric_gives_its_declared_value_on_identical_inputs(name: str, pair: tuple) -> None:
    a, _, rank, reference = pair
    m = REGISTRY[name]
    value = _call(m, a, a.clone(), rank, reference)
    if value is None:
        return
    assert value == pytest.approx(m.identical, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(pair=tensor_pairs())
@EDGES
def test_every_metric_is_symmetric(name: str, pair: tuple) -> None:
    a, b, rank, reference = pair
    m = REGISTRY[name]
    forward, backward = _call(m, a, b, rank, reference), _call(m, b, a, rank, reference)
    if forward is None:
        return
    assert backward == pytest.approx(forward, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(pair=tensor_pairs())
@EDGES
def test_every_metric_is_deterministic(name: str, pair: tuple) -> None:
    m = REGISTRY[name]
    assert _call(m, *pair) == _call(m, *pair)


# ---- each metric against hand arithmetic ----------------------------------------------------------------


def ops(a: list, b: list, *, rank: int = 16, reference: float | None = None) -> tuple[Operand, Operand]:
    return (
        Operand(torch.tensor(a, dtype=torch.float32), rank=rank, reference_norm=reference),
        Operand(torch.tensor(b, dtype=torch.float32), rank=rank, reference_norm=reference),
    )


def value(name: str, a: list, b: list, **kwargs: object) -> float:
    return REGISTRY[name](*ops(a, b, **kwargs))  # type: ignore[arg-type]


def test_cosine_similarity_by_hand() -> None:
    # <(1,0), (1,1)> = 1; |a| = 1, |b| = sqrt 2
    assert value("cosine_similarity", [1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert value("cosine_similarity", [1.0, 2.0], [-2.0, -4.0]) == pytest.approx(-1.0)
    assert value("cosine_similarity", [0.0, 0.0], [0.0, 0.0]) == 1.0
    assert value("cosine_similarity", [0.0, 0.0], [1.0, 0.0]) == 0.0


def test_l2_distance_by_hand() -> None:
    # |(3,0) - (0,4)| = 5, |a| + |b| = 3 + 4 = 7
    assert value("l2_distance", [3.0, 0.0], [0.0, 4.0]) == pytest.approx(5 / 7)
    assert value("l2_distance", [1.0, 1.0], [-1.0, -1.0]) == pytest.approx(1.0)  # 2 sqrt2 / 2 sqrt2


def test_kl_divergence_by_hand() -> None:
    # 4 values -> 8 shared bins over [0, 1]; a = three 0s and one 1, b = one 0 and three 1s.
    # counts + 0.5: p = (3.5, 0.5 x 6, 1.5) / 8, q = (1.5, 0.5 x 6, 3.5) / 8; the middle bins cancel.
    # KL(p|q) = 3.5/8 ln(3.5/1.5) + 1.5/8 ln(1.5/3.5) = (2/8) ln(7/3) = KL(q|p); the mean of both is the same.
    expected = 0.25 * math.log(7 / 3)
    assert value("kl_divergence", [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]) == pytest.approx(expected)
    assert value("kl_divergence", [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]) == 0.0  # same histogram


def test_spectral_overlap_by_hand() -> None:
    # rank 1: diag(2, 1) has u = v = e1; [[1, 1], [1, 1]] has u = v = (1, 1)/sqrt2.
    # left = (e1 . u)^2 = 1/2, right = 1/2 -> (1/2 + 1/2) / (2 k) with k = 1 -> 0.5
    diag21 = [[2.0, 0.0], [0.0, 1.0]]
    assert value("spectral_overlap", diag21, [[1.0, 1.0], [1.0, 1.0]], rank=1) == pytest.approx(0.5)
    # diag(2, 1) against diag(1, 2): top directions e1 vs e2 are orthogonal
    assert value("spectral_overlap", diag21, [[1.0, 0.0], [0.0, 2.0]], rank=1) == pytest.approx(0.0)


def test_effective_rank_ratio_by_hand() -> None:
    # diag(3, 1, 0): p = (3/4, 1/4), H = -(0.75 ln 0.75 + 0.25 ln 0.25), erank = e^H; the identity: 3.
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    a = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert value("effective_rank_ratio", a, eye) == pytest.approx(math.exp(h) / 3, rel=1e-5)
    # rank 1 (erank 1) against the 2 x 2 identity (erank 2)
    rank1, eye2 = [[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]
    assert value("effective_rank_ratio", rank1, eye2) == pytest.approx(0.5)


def test_task_cosine_and_task_l2_distance_by_hand() -> None:
    assert value("task_cosine", [1.0, 2.0, 0.0], [2.0, -1.0, 5.0]) == pytest.approx(0.0)  # 2 - 2 + 0
    assert value("task_cosine", [1.0, -1.0], [-1.0, 1.0]) == pytest.approx(-1.0)
    # |(2,0) - (0,1)| = sqrt 5, |a| + |b| = 3
    assert value("task_l2_distance", [2.0, 0.0], [0.0, 1.0]) == pytest.approx(math.sqrt(5) / 3)


def test_sign_disagreement_by_hand() -> None:
    # both non-zero at the first three coordinates; signs differ at the 2nd and 3rd -> 2/3
    assert value("sign_disagreement", [1.0, -1.0, 2.0, 0.0], [1.0, 1.0, -3.0, 5.0]) == pytest.approx(2 / 3)
    assert value("sign_disagreement", [0.0, 1.0], [1.0, 0.0]) == 0.0  # never both non-zero


def test_sign_disagreement_top_counts_only_coordinates_both_keep_after_trimming() -> None:
    # 10 coordinates, TOP_DENSITY 0.2 keeps 2 of each: a keeps #0 (10) and #1 (9), b keeps #0 (-8) and #1 (7).
    # Among those two, #0 conflicts -> 1/2; over all ten, only #0 conflicts -> 1/10.
    a = [10.0, 9.0] + [1.0] * 8
    b = [-8.0, 7.0] + [0.5] * 8
    assert value("sign_disagreement_top", a, b) == pytest.approx(0.5)
    assert value("sign_disagreement", a, b) == pytest.approx(0.1)


def test_tsv_interference_by_hand() -> None:
    # diag(2, 1) vs diag(1, 2), k = 2: s_a = (2, 1) with U_a = (e1, e2); s_b = (2, 1) with U_b = (e2, e1).
    # p = q = (4, 1) / 5; C = U_a^T U_b = [[0, 1], [1, 0]]:
    # sum sqrt(p_i q_j) C_ij^2 = 2 sqrt(0.8 x 0.2) = 0.8,
    # the same on the right -> 0.8.
    a, b = [[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]
    assert value("tsv_interference", a, b) == pytest.approx(0.8, abs=1e-6)
    # rank 1: diag(2, 1) vs [[1, 1], [1, 1]] -> weights 1, C = 1/2 on each side -> 0.5
    assert value("tsv_interference", a, [[1.0, 1.0], [1.0, 1.0]], rank=1) == pytest.approx(0.5, abs=1e-6)


def test_task_vector_energy_by_hand() -> None:
    # rank 1: diag(2, 1) keeps 4 of 5 in its top direction, diag(3, 0) all of it -> (0.8 + 1) / 2
    energy = value("task_vector_energy", [[2.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]], rank=1)
    assert energy == pytest.approx(0.9)


def test_magnitude_ratio_and_task_drift_by_hand() -> None:
    # |(3,4)| = 5, |(0,2)| = 2 -> 2/5; drift = (5 + 2) / (2 x 7)
    assert value("magnitude_ratio", [3.0, 4.0], [0.0, 2.0]) == pytest.approx(0.4)
    assert value("task_drift", [3.0, 4.0], [0.0, 2.0], reference=7.0) == pytest.approx(0.5)
    assert value("task_drift", [3.0, 4.0], [0.0, 2.0]) == 0.0  # no base norm known


def test_a_metric_that_computes_nan_or_inf_is_absent_not_zero() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        m = Metric("broken", lambda a, b, bad=bad: bad, (0.0, None), None, False, False, "")
        assert m(*ops([1.0], [1.0])) is None
    assert Metric("fine", lambda a, b: 0.25, (0.0, 1.0), None, False, False, "")(*ops([1.0], [1.0])) == 0.25


def test_the_property_checks_fail_for_a_metric_that_computes_nan() -> None:
    broken = Metric("broken", lambda a, b: float("nan"), (0.0, 1.0), 0.0, False, False, "")
    with pytest.raises(AssertionError, match="broken gave no finite value"):
        _call(broken, torch.ones(3), torch.ones(3), 1, 1.0)


def test_matrix_only_metrics_skip_vectors_and_single_rows() -> None:
    vector, row = ops([1.0, 2.0], [2.0, 1.0])[0], ops([[1.0, 2.0]], [[2.0, 1.0]])[0]
    for m in REGISTRY.values():
        assert m.applies_to(vector) is not m.matrix_only
        assert m.applies_to(row) is not m.matrix_only


def test_the_pass_that_takes_the_svds_final_products_gives_the_svds_decompose_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergelens_mcp.analysis import metrics
    from mergelens_mcp.analysis.metrics import weight_and_task_sums

    monkeypatch.setattr(metrics, "CHUNK", 7 * 90 + 5)  # 7 rows a chunk, 21 a block: 301 rows end on partial ones
    monkeypatch.setattr(metrics, "PRODUCT_BLOCK", 3 * 7 * 90 + 40)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(301, 90, generator=g).bfloat16()
    low_rank = torch.randn(301, 4, generator=g) @ torch.randn(4, 90, generator=g)
    a = (base.float() + 0.3 * low_rank + 0.01 * torch.randn(301, 90, generator=g)).bfloat16()
    b = (base.float() - 0.2 * low_rank + 0.01 * torch.randn(301, 90, generator=g)).bfloat16()

    def operands() -> tuple[Operand, ...]:
        return (Operand(a, rank=8, exact_max_elements=0), Operand(b, rank=8, exact_max_elements=0),
                Operand(a, rank=8, exact_max_elements=0, base=base),
                Operand(b, rank=8, exact_max_elements=0, base=base), Operand(base))

    *fused, zb = operands()
    assert all(op.fusable for op in fused)
    products = {op: (op.subspace(), torch.empty(301, 24)) for op in fused}
    made = dict(products)
    weight_and_task_sums(*fused, zb, products)
    assert products == {}  # all four taken
    *separate, _ = operands()
    for op, other in zip(fused, separate, strict=True):
        z, product = made[op]
        got, want = op.finish_svd(product, z), other.svd
        assert op.svd is got and not got.exact
        assert got.total_energy == pytest.approx(want.total_energy, rel=1e-6)
        assert torch.allclose(got.s, want.s, rtol=1e-5, atol=1e-5)
        overlap = (got.u.T @ want.u).abs().diagonal()
        assert overlap.min() > 1 - 1e-4


def test_a_pass_over_two_stored_matrices_takes_their_svds_final_products_and_the_same_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergelens_mcp.analysis import metrics
    from mergelens_mcp.analysis.metrics import pair_sums

    monkeypatch.setattr(metrics, "CHUNK", 7 * 90 + 5)  # 7 rows a chunk, 21 a block: 301 rows end on partial ones
    monkeypatch.setattr(metrics, "PRODUCT_BLOCK", 3 * 7 * 90 + 40)
    g = torch.Generator().manual_seed(4)
    low_rank = torch.randn(301, 4, generator=g) @ torch.randn(4, 90, generator=g)
    a = (low_rank + 0.05 * torch.randn(301, 90, generator=g)).bfloat16()
    b = (low_rank + 0.05 * torch.randn(301, 90, generator=g)).bfloat16()
    task = Operand(a, rank=8, exact_max_elements=0, base=b)  # a task vector is never taken here

    def operands() -> tuple[Operand, Operand]:
        return Operand(a, rank=8, exact_max_elements=0), Operand(b, rank=8, exact_max_elements=0)

    x, y = operands()
    assert x.fusable and y.fusable
    products = {op: (op.subspace(), torch.empty(301, 24)) for op in (x, y, task)}
    made = dict(products)
    fused = pair_sums(x, y, signs=True, products=products)
    assert list(products) == [task]  # both weights taken, the task vector left for its own SVD
    sx, sy = operands()
    plain = pair_sums(sx, sy, signs=True)
    assert fused.signs == plain.signs  # counts; the sums differ only by float32 chunk rounding (other chunks)
    assert fused.dot == pytest.approx(plain.dot, rel=1e-6)
    assert fused.distance_sq == pytest.approx(plain.distance_sq, rel=1e-6)
    assert x.norm == pytest.approx(sx.norm, rel=1e-6) and y.norm == pytest.approx(sy.norm, rel=1e-6)
    for op, other in ((x, sx), (y, sy)):
        z, product = made[op]
        got, want = op.finish_svd(product, z), other.svd
        assert got.total_energy == pytest.approx(want.total_energy, rel=1e-6)
        assert torch.allclose(got.s, want.s, rtol=1e-5, atol=1e-5)
        assert (got.u.T @ want.u).abs().diagonal().min() > 1 - 1e-4


# ---- the elementwise pass against float64 -------------------------------------------------------------------


def _set(kind: str, n: int = 2 * (1 << 17) + 4321) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, base), bf16 like a checkpoint's (so a - base, b - base and a - b are exact in float32), of one
    adversarial kind."""
    g = torch.Generator().manual_seed(11)
    base = (0.02 * torch.randn(n, generator=g)).bfloat16()

    def moved(scale: float) -> torch.Tensor:
        return (base.float() + scale * torch.randn(n, generator=g)).bfloat16()

    def nudged(t: torch.Tensor, share: float) -> torch.Tensor:
        """`t` with a `share` of its values one bf16 step further from 0 (the smallest change a bf16 has)."""
        step = (torch.rand(n, generator=g) < share).to(torch.int16)
        return (t.view(torch.int16) + step).view(torch.bfloat16)

    if kind == "near-identical":  # 1 - cos of the weights about 1e-7, of the task vectors about 1e-3
        a = moved(2e-4)
        return a, nudged(a, 0.01), base
    if kind == "identical":
        a = moved(2e-4)
        return a, a.clone(), base
    if kind == "untouched":  # a's task vector is zero
        return base.clone(), moved(2e-4), base
    if kind == "disparate":  # task vectors about 500x apart in norm
        return nudged(base, 0.001), moved(2e-3), base
    scale = {"huge": 2.0**48, "tiny": 2.0**-48}[kind]  # squares near 1e25 / 1e-33: still normal floats
    a, b = moved(2e-4), moved(2e-4)
    return (a.float() * scale).bfloat16(), (b.float() * scale).bfloat16(), (base.float() * scale).bfloat16()


@pytest.mark.parametrize("kind", ["near-identical", "identical", "untouched", "disparate", "huge", "tiny"])
def test_the_fused_pass_gives_float64_sums_and_the_exact_sign_counts(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp.analysis import metrics
    from mergelens_mcp.analysis.metrics import cosine_from, weight_and_task_sums

    monkeypatch.setattr(metrics._Accumulator, "ROWS", 2)  # three chunks (the last a partial one): two flushes
    a, b, base = _set(kind)
    wa, wb, ta, tb, zb = Operand(a), Operand(b), Operand(a, base=base), Operand(b, base=base), Operand(base)
    weight_and_task_sums(wa, wb, ta, tb, zb)
    x, y, z = (t.double() for t in (a, b, base))
    tx, ty = x - z, y - z
    for op, ref in ((wa, x), (wb, y), (ta, tx), (tb, ty), (zb, z)):
        assert op.norm == pytest.approx(float(ref.norm()), rel=1e-7, abs=0.0)
    weights, tasks = pair_sums(wa, wb), pair_sums(ta, tb, signs=True)
    for found, (p, q), u, v in ((weights, (wa, wb), x, y), (tasks, (ta, tb), tx, ty)):
        assert found.distance_sq == pytest.approx(float((u - v).square().sum()), rel=1e-7, abs=0.0)
        assert found.dot == pytest.approx(float(u @ v), rel=1e-7, abs=1e-7 * float(u.norm() * v.norm()))
        want = cosine_from(float(u.norm()), float(v.norm()), float(u @ v))
        # 1 - cos as the metric takes it (the pass's norms and dot), what the accumulator's docstring holds
        # (4e-8 at most here; float32 dots of the same chunks, BLAS sdot, are 3e-6 off in the dot above)
        assert cosine_from(p.norm, q.norm, found.dot) == pytest.approx(want, rel=0.0, abs=1e-7)
    keep = (tx.abs() >= ta.top_threshold) & (ty.abs() >= tb.top_threshold)
    both, conflict = (tx != 0) & (ty != 0), tx * ty < 0
    assert tasks.signs == tuple(float(m.sum()) for m in (both, conflict, both & keep, conflict & keep))
    if kind == "identical":
        assert weights.distance_sq == 0.0 and tasks.distance_sq == 0.0 and tasks.signs[1] == 0
    if kind == "untouched":
        assert ta.norm == 0.0 and tasks.dot == 0.0 and tasks.signs == (0, 0, 0, 0)


@pytest.mark.parametrize("threshold", [1e-30, 3e-19, 5e18, 1e25])
def test_a_value_at_or_above_a_tiny_or_huge_ties_threshold_counts_as_kept(threshold: float) -> None:
    t = float(torch.tensor(threshold))  # a float32 value, as a sample's quantile is
    x = torch.tensor([t, -t, t * 0.999, 2 * t, 0.0, -3 * t, t, t * 0.5])
    y = torch.tensor([-t, -t, t, t, t, 3 * t, t * 0.9999, 8 * t])
    a, b = Operand(x), Operand(y)
    a.__dict__["top_threshold"], b.__dict__["top_threshold"] = t, t
    found = pair_sums(a, b, signs=True)
    keep = (x.abs() >= t) & (y.abs() >= t)  # positions 0, 1, 3, 5
    assert keep.tolist() == [True, True, False, True, False, True, False, False]
    nonzero, conflict = (x != 0) & (y != 0), x * y < 0
    if threshold < 1e-20:  # x y underflows to 0 (|x y| < 1.4e-45): not counted as non-zero in both, as documented
        nonzero = conflict = torch.zeros(8, dtype=torch.bool)
    assert found.signs == tuple(float(m.sum()) for m in (nonzero, conflict, nonzero & keep, conflict & keep))


def test_a_nan_or_inf_reaches_the_norms_so_the_set_is_not_measured() -> None:
    from mergelens_mcp.analysis.metrics import weight_and_task_sums

    for bad in (float("nan"), float("inf")):
        a, b, base = _set("near-identical", 1000)
        base = base.clone()
        base[500] = bad
        ops = Operand(a), Operand(b), Operand(a, base=base), Operand(b, base=base), Operand(base)
        weight_and_task_sums(*ops)
        assert math.isfinite(ops[0].norm) and math.isfinite(ops[1].norm)  # the weights hold no bad value
        assert not math.isfinite(ops[2].norm) and not math.isfinite(ops[3].norm) and not math.isfinite(ops[4].norm)
