"""LoRA adapters made by real peft: exact low-rank algebra against the dense computation, bad adapters refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.adapters import dense_delta, make_adapter, make_base, make_dense
from fixtures.checkpoints import TINY, variant
from mergelens_mcp import service
from mergelens_mcp.analysis import adapters
from mergelens_mcp.analysis.adapters import LowRankOperand, low_rank_svd
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.analysis.metrics import REGISTRY, Operand, pair_sums
from mergelens_mcp.analysis.predict import CONFIDENCE_LEVELS
from mergelens_mcp.analysis.score import verdict_for
from mergelens_mcp.errors import CheckpointFormatError, CheckpointNotFoundError, InputError, PathNotAllowedError
from mergelens_mcp.security.paths import PathGuard

TOLERANCE = 1e-4
SHAPE = variant(TINY, hidden=32, intermediate=48)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One float32 base and peft adapters of it: several ranks, targets and alphas, rsLoRA, DoRA, a saved
    lm_head; each with its dense counterpart base + scale * B @ A."""
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base", SHAPE)
    specs = {
        "r4_qv": dict(seed=1, r=4, alpha=8.0, targets=("q_proj", "v_proj")),
        "r8_all_rslora": dict(seed=2, r=8, alpha=4.0, rslora=True,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        "r2_qk_head": dict(seed=3, r=2, alpha=16.0, targets=("q_proj", "k_proj"), modules_to_save=("lm_head",)),
        "r4_dora": dict(seed=4, r=4, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), dora=True),
        "r4_qv_b": dict(seed=5, r=4, alpha=8.0, targets=("q_proj", "v_proj")),
        "r3_embed_head": dict(seed=6, r=3, alpha=6.0, targets=("embed_tokens", "lm_head", "q_proj")),
    }
    out = {"base": base}
    for name, spec in specs.items():
        out[name] = make_adapter(root / name, base, **spec)  # type: ignore[arg-type]
        out[f"{name}_dense"] = make_dense(root / f"{name}_dense", base, out[name])
    return out


def spy_on_reads(monkeypatch: pytest.MonkeyPatch, base: Path) -> tuple[list[str], dict[str, list[int]]]:
    """The tensors of `base`'s files that any checkpoint views, prefetches or reads whole from now on, and the
    rows of each that it reads row by row (`Checkpoint.rows`)."""
    from mergelens_mcp.analysis.loading import Checkpoint

    files = {p.resolve() for p in base.glob("*.safetensors")}
    seen: list[str] = []
    rows: dict[str, list[int]] = {}

    def spy(method: str) -> None:
        original = getattr(Checkpoint, method)

        def wrapped(self: Checkpoint, name: str, *args: object, **kwargs: object) -> object:
            if self.tensors[name].file.resolve() in files:
                seen.append(f"{method} {name}")
            return original(self, name, *args, **kwargs)

        monkeypatch.setattr(Checkpoint, method, wrapped)

    for method in ("view", "prefetch", "blocks", "read"):
        spy(method)
    original_rows = Checkpoint.rows

    def read_rows(self: Checkpoint, name: str, index: torch.Tensor) -> torch.Tensor:
        if self.tensors[name].file.resolve() in files:
            assert name not in rows, f"{name} read twice"
            rows[name] = index.tolist()
        return original_rows(self, name, index)

    monkeypatch.setattr(Checkpoint, "rows", read_rows)
    return seen, rows


SPECTRAL = {"spectral_overlap", "effective_rank_ratio"}  # the weights' SVDs: every row of the base
ESTIMATED = {"cosine_similarity", "l2_distance", "kl_divergence", "task_drift"}  # from the base's row sample


@pytest.mark.parametrize("pair", [
    ("r4_qv", "r8_all_rslora"), ("r2_qk_head", "r4_dora"), ("r3_embed_head", "r2_qk_head"),
])
def test_adapters_of_one_base_read_only_the_base_s_sampled_rows_and_equal_the_dense_values_where_all_are_sampled(
    made: dict[str, Path], pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    dense = service.compare([str(made[f"{a}_dense"]), str(made[f"{b}_dense"])], str(made["base"]), device="cpu")
    reads, rows = spy_on_reads(monkeypatch, made["base"])
    lowrank = service.compare([str(made[a]), str(made[b])], device="cpu")
    assert reads == []  # never viewed, prefetched or read whole: only rows
    stored = any(json.loads((made[m] / "adapter_config.json").read_text())["modules_to_save"] for m in pair)
    if stored:  # a tensor one adapter stores (modules_to_save): its task vector needs the base
        assert SPECTRAL < set(lowrank.coverage.not_measured) and "lm_head.weight" not in rows
    else:
        assert set(lowrank.coverage.not_measured) == SPECTRAL
    assert set(lowrank.coverage.base_sampled) == ESTIMATED
    assert not lowrank.coverage.base_read
    assert lowrank.base is not None and lowrank.mci.used_base
    # the fixtures' tensors are under the sample's size: every row is read, so the estimates are exact
    assert lowrank.coverage.base_sample_rows == lowrank.coverage.base_rows == sum(len(r) for r in rows.values())
    share = lowrank.coverage.base_bytes_share
    assert 0.5 < share < 1 if stored else share == 1.0  # all but the stored tensor's rows
    compared = 0
    for x, y in zip(lowrank.layer_metrics, dense.layer_metrics, strict=True):
        assert x.layer_name == y.layer_name and set(x.metrics) <= set(y.metrics)
        for name, value in x.metrics.items():
            assert value == pytest.approx(y.metrics[name], abs=TOLERANCE), (x.layer_name, name)
            compared += 1
        for name in set(y.metrics) - set(x.metrics):  # left out, and said why
            assert x.unavailable[name].startswith("not measured on "), (x.layer_name, name)
            assert "it needs the base's values" in x.unavailable[name]
    assert compared >= 40  # 6 layers x the 12 non-spectral metrics, less where a tensor is stored (lm_head)
    assert any("read only on a seeded sample of rows" in n for n in lowrank.notes)
    assert any("not measured: " in r for r in lowrank.mci.reasons)
    assert lowrank.strategy is not None and lowrank.strategy.method.value != "passthrough"


def test_a_base_sample_smaller_than_the_tensor_reads_only_the_seeded_rows_and_estimates_the_weights_closely(
    made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters, "BASE_SAMPLE_VALUES", 256)  # 8 of a 32-wide matrix's rows, 5 of a 48-wide
    pair = [str(made["r4_qv"]), str(made["r8_all_rslora"])]
    full = service.compare(pair, device="cpu", read_base=True)
    reads, rows = spy_on_reads(monkeypatch, made["base"])
    sampled = service.compare(pair, device="cpu")
    assert reads == []
    base = load_file(made["base"] / "model.safetensors")
    for name, index in rows.items():
        shape = base[name].shape
        cols = math.prod(shape[1:])
        assert index == adapters.sample_rows(shape[0], cols, torch.device("cpu"), 256).tolist()
        assert len(index) == (max(1, 256 // cols) if shape[0] * cols > 256 else shape[0])
    assert 0.2 < sampled.coverage.base_bytes_share < 0.35
    for x, y in zip(sampled.layer_metrics, full.layer_metrics, strict=True):
        for name in ("cosine_similarity", "l2_distance", "task_drift"):
            assert x.metrics[name] == pytest.approx(y.metrics[name], rel=0.1, abs=0.002), (x.layer_name, name)
        for name in set(x.metrics) - ESTIMATED:  # the task vectors' own: exact whatever the base's sample
            assert x.metrics[name] == pytest.approx(y.metrics[name], abs=TOLERANCE), (x.layer_name, name)


@pytest.mark.parametrize(("size", "drift", "gap"), [(0.01, (0.0, 0.02), 1.0), (0.05, (0.1, 0.3), 7.0),
                                                    (0.2, (2.0, 4.0), 11.0)])
def test_the_score_from_the_base_s_row_sample_follows_the_one_with_the_whole_base_at_every_drift(
    made: dict[str, Path], tmp_path: Path, size: float, drift: tuple[float, float], gap: float
) -> None:
    pair = [str(make_adapter(tmp_path / f"a_{s}", made["base"], seed=s, r=4, alpha=8.0,
                             targets=("q_proj", "v_proj", "up_proj"), size=size)) for s in (21, 22)]
    sampled = service.compare(pair, device="cpu")
    full = service.compare(pair, device="cpu", read_base=True)
    moved = max(lm.metrics["task_drift"] for lm in full.layer_metrics if lm.layer_name.startswith("layers."))
    assert drift[0] < moved < drift[1]
    assert sampled.mci.composite is not None and full.mci.composite is not None
    # the subspace and rank components are left out: never optimistic, a few points low as drift grows
    assert full.mci.composite - gap < sampled.mci.composite <= full.mci.composite + 0.5
    assert verdict_for(sampled.mci.composite) is verdict_for(full.mci.composite)
    for name in ("direction", "distance", "distribution", "drift"):
        assert sampled.mci.components[name] == pytest.approx(full.mci.components[name], abs=1e-3), name
    # the headline's confidence is also capped by its prediction's interval and fitted range: the sample never
    # raises it, and the reasons say what it did not measure
    assert CONFIDENCE_LEVELS.index(sampled.mci.confidence) <= CONFIDENCE_LEVELS.index(full.mci.confidence)
    assert any("not measured" in r for r in sampled.mci.reasons)


def test_the_base_s_squared_norm_from_its_row_sample_is_within_its_standard_error_on_a_4096_wide_matrix() -> None:
    generator = torch.Generator().manual_seed(7)
    rows, cols = 4096, 4096
    index = adapters.sample_rows(rows, cols, torch.device("cpu"), adapters.BASE_SAMPLE_VALUES)
    assert len(index) == 256  # 6% of the rows
    even = torch.randn(rows, cols, generator=generator)
    # rows of unequal size, as real weights have (log-normal scales, sigma 0.3): the harder case for a sample
    uneven = even * torch.exp(0.3 * torch.randn(rows, 1, generator=generator))
    for weights, bound in ((even, 0.002), (uneven, 0.05)):
        squares = (weights.double() ** 2).sum(dim=1)
        spread = float(squares.std() / squares.mean())  # the rows' squared norms' CV
        standard_error = spread * math.sqrt((1 - len(index) / rows) / len(index))
        assert standard_error < bound
        sample = adapters.BaseSample(index, weights[index], rows, 0)
        assert abs(sample.energy / float(squares.sum()) - 1) < 3 * standard_error


def assert_same_metrics(lowrank: object, dense: object) -> int:
    """Every layer metric of two results equal within TOLERANCE; the number of values compared."""
    compared = 0
    assert [lm.layer_name for lm in lowrank.layer_metrics] == [lm.layer_name for lm in dense.layer_metrics]
    for x, y in zip(lowrank.layer_metrics, dense.layer_metrics, strict=True):
        assert set(x.metrics) == set(y.metrics), x.layer_name
        for name, value in x.metrics.items():
            assert value == pytest.approx(y.metrics[name], abs=TOLERANCE), (x.layer_name, name)
            compared += 1
    return compared


@pytest.mark.parametrize("pair", [
    ("r4_qv", "r8_all_rslora"), ("r2_qk_head", "r4_dora"), ("r4_qv", "r4_qv_b"), ("r8_all_rslora", "r2_qk_head"),
    ("r3_embed_head", "r2_qk_head"),
])
def test_every_metric_of_two_adapters_equals_the_dense_comparison_of_base_plus_delta(
    made: dict[str, Path], pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    reads, _ = spy_on_reads(monkeypatch, made["base"])
    lowrank = service.compare([str(made[a]), str(made[b])], device="cpu", read_base=True)
    assert reads and lowrank.coverage.base_read and lowrank.coverage.not_measured == []  # the opt-in reads it
    dense = service.compare([str(made[f"{a}_dense"]), str(made[f"{b}_dense"])], str(made["base"]), device="cpu")
    assert assert_same_metrics(lowrank, dense) > 50
    assert lowrank.mci.score == pytest.approx(dense.mci.score, abs=0.05)
    assert lowrank.coverage.low_rank_tensors > 0 and dense.coverage.low_rank_tensors == 0
    assert lowrank.base is not None and lowrank.base.source == str(made["base"])  # from base_model_name_or_path


def test_an_adapter_against_a_full_finetune_equals_the_dense_comparison(made: dict[str, Path]) -> None:
    lowrank = service.compare([str(made["r4_qv"]), str(made["r8_all_rslora_dense"])], device="cpu")
    dense = service.compare(
        [str(made["r4_qv_dense"]), str(made["r8_all_rslora_dense"])], str(made["base"]), device="cpu"
    )
    assert assert_same_metrics(lowrank, dense) > 50
    assert lowrank.models[0].adapter is not None and lowrank.models[1].adapter is None


def test_mergekit_base_plus_adapter_and_an_explicit_base_give_the_same_result(made: dict[str, Path]) -> None:
    base = str(made["base"])
    joined = service.compare([f"{base}+{made['r4_qv']}", f"{base}+{made['r4_qv_b']}"], base, device="cpu")
    plain = service.compare([str(made["r4_qv"]), str(made["r4_qv_b"])], base, device="cpu")
    assert [lm.metrics for lm in joined.layer_metrics] == [lm.metrics for lm in plain.layer_metrics]


def random_operands(rows: int, cols: int, ranks: tuple[int, int], seed: int = 0) -> tuple[list, list, Operand]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    lows, denses = [], []
    base_op = Operand(base)
    for r in ranks:
        left, right = torch.randn(rows, r, generator=g, dtype=torch.float64) * 0.1, torch.randn(
            r, cols, generator=g, dtype=torch.float64)
        delta = (left @ right).float()
        lows.append((LowRankOperand(left, right, None, rank=16, exact_max_elements=1 << 30),
                     LowRankOperand(left, right, base_op, rank=16, exact_max_elements=1 << 30)))
        denses.append((Operand(delta), Operand(base + delta)))
    return lows, denses, base_op


@pytest.mark.parametrize("ranks", [(3, 7), (16, 2), (5, 5)])
def test_every_registered_metric_on_low_rank_operands_equals_it_on_the_dense_ones(ranks: tuple[int, int]) -> None:
    lows, denses, _ = random_operands(40, 24, ranks)
    for metric in REGISTRY.values():
        which = 0 if metric.needs_base else 1  # task vectors, or base + delta weights
        low = metric(lows[0][which], lows[1][which])
        dense = metric(denses[0][which], denses[1][which])
        assert low == pytest.approx(dense, abs=TOLERANCE), metric.name


def test_sign_conflict_is_exact_on_the_seeded_row_sample_of_a_large_task_vector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(adapters, "SAMPLE_VALUES", 24 * 10)  # 10 of 40 rows
    lows, _, _ = random_operands(40, 24, (3, 6), seed=3)
    a, b = lows[0][0], lows[1][0]
    rows = adapters.sample_rows(40, 24, torch.device("cpu"))
    assert len(rows) == 10 and torch.equal(rows, adapters.sample_rows(40, 24, torch.device("cpu")))
    x = ((a.left @ a.right)[rows]).float().reshape(-1)
    y = ((b.left @ b.right)[rows]).float().reshape(-1)
    both = (x != 0) & (y != 0)
    expected = float(((x.sign() != y.sign()) & both).sum()) / float(both.sum())
    assert REGISTRY["sign_disagreement"](a, b) == expected
    tx = x.abs().sort(descending=True).values[math.ceil(0.2 * x.numel()) - 1]
    ty = y.abs().sort(descending=True).values[math.ceil(0.2 * y.numel()) - 1]
    top = both & (x.abs() >= tx) & (y.abs() >= ty)
    expected_top = float(((x.sign() != y.sign()) & top).sum()) / float(top.sum())
    assert REGISTRY["sign_disagreement_top"](a, b) == pytest.approx(expected_top, abs=1e-12)


def test_the_low_rank_svd_has_the_dense_singular_values_and_subspace() -> None:
    g = torch.Generator().manual_seed(7)
    left = torch.randn(30, 5, generator=g, dtype=torch.float64)
    right = torch.randn(5, 20, generator=g, dtype=torch.float64)
    svd = low_rank_svd(left, right, rank=16)
    s = torch.linalg.svdvals(left @ right)
    assert torch.allclose(svd.s[:5].double(), s[:5], atol=1e-5)
    assert float(svd.s[5:].abs().max()) == 0.0 and svd.k == 16 and svd.exact
    projector = svd.u[:, :5].double() @ svd.u[:, :5].double().T
    assert torch.allclose(projector @ (left @ right), left @ right, atol=1e-5)
    assert svd.total_energy == pytest.approx(float((left @ right).pow(2).sum()), rel=1e-6)


def test_a_zero_rank_task_vector_pairs_like_a_zero_tensor() -> None:
    lows, denses, _ = random_operands(12, 8, (3, 3))
    zero = LowRankOperand(torch.zeros(12, 0, dtype=torch.float64), torch.zeros(0, 8, dtype=torch.float64), None,
                          rank=16, exact_max_elements=1 << 30)
    found = pair_sums(zero, lows[0][0])
    assert found.dot == 0.0 and found.distance_sq == pytest.approx(denses[0][0].norm ** 2, rel=1e-6)
    assert zero.norm == 0.0 and zero.svd.total_energy == 0.0


def test_adapters_with_different_targets_and_ranks_are_findings_and_dora_is_stated(made: dict[str, Path]) -> None:
    result = service.compare([str(made["r4_qv"]), str(made["r4_dora"])], device="cpu")
    codes = {f.code for f in result.findings}
    assert {"adapter_target_mismatch", "dora_magnitude_ignored"} <= codes
    target = next(f for f in result.findings if f.code == "adapter_target_mismatch")
    assert "down_proj" in target.message
    assert any("seeded sample of rows" in note for note in result.notes)
    assert result.models[1].adapter is not None and result.models[1].adapter.use_dora


def test_adapters_of_different_bases_are_incompatible_with_the_reason(made: dict[str, Path], tmp_path: Path) -> None:
    other = make_base(tmp_path / "other_base", SHAPE, seed=9)
    foreign = make_adapter(tmp_path / "foreign", other, seed=1, r=4)
    result = service.compare([str(made["r4_qv"]), str(foreign)], device="cpu")
    assert result.mci.score is None and result.mci.verdict.value == "incompatible"
    assert any("different bases" in reason for reason in result.mci.reasons)


# ---- bad adapters ------------------------------------------------------------------------------------------


def copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_missing_adapter_config_is_named(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointFormatError, match="no adapter_config.json"):
        load_checkpoint(str(folder), "model_a")


def test_factors_that_do_not_multiply_are_refused(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    state[key] = torch.zeros(state[key].shape[0], 3)
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="do not multiply"):
        load_checkpoint(str(folder), "model_a")


def test_a_config_rank_that_differs_from_the_tensors_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    edit_config(folder, r=16)
    with pytest.raises(CheckpointFormatError, match="rank 4 in adapter_model.safetensors but 16"):
        load_checkpoint(str(folder), "model_a")


@pytest.mark.parametrize(("peft_type", "words"), [
    ("IA3", "IA3 adapter is not supported"), ("PREFIX_TUNING", "PREFIX_TUNING adapter is not supported"),
    ("SOMETHING_NEW", "unknown PEFT type"),
])
def test_peft_types_other_than_lora_are_named_and_refused(
    made: dict[str, Path], tmp_path: Path, peft_type: str, words: str
) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    edit_config(folder, peft_type=peft_type)
    with pytest.raises(CheckpointFormatError, match=words):
        load_checkpoint(str(folder), "model_a")


def test_a_base_outside_the_allowed_roots_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    with pytest.raises(PathNotAllowedError, match="the base of the LoRA adapter model_a"):
        load_checkpoint(str(folder), "model_a", guard=PathGuard([tmp_path]))


def test_a_base_that_cannot_be_found_asks_for_base(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    edit_config(folder, base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(CheckpointNotFoundError, match="pass it with --base"):
        load_checkpoint(str(folder), "model_a")


def test_an_adapter_for_another_architecture_is_refused_against_its_base(made: dict[str, Path], tmp_path: Path) -> None:
    other = make_base(tmp_path / "wide", variant(SHAPE, hidden=48))
    with pytest.raises(CheckpointFormatError, match="made for another base"):
        load_checkpoint(str(made["r4_qv"]), "model_a", base=load_checkpoint(str(other), "base"))


@pytest.mark.parametrize("adapter", ["r8_all_rslora", "r3_embed_head"])
def test_dense_delta_of_the_fixture_matches_peft_merge_and_unload(made: dict[str, Path], adapter: str) -> None:
    """The reference itself: base + scale * B @ A (transposed for an Embedding) is what peft's merge_and_unload
    builds."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(str(made["base"]))
    model = PeftModel.from_pretrained(base_model, str(made[adapter]))
    merged = model.merge_and_unload().state_dict()
    base = load_file(str(made["base"] / "model.safetensors"))
    deltas = dense_delta(made[adapter])
    assert adapter != "r3_embed_head" or {"model.embed_tokens.weight", "lm_head.weight"} <= set(deltas)
    for name, delta in deltas.items():
        assert torch.allclose(merged[name].double() - base[name].double(), delta, atol=1e-6), name


def test_the_low_rank_svd_stays_exact_for_ill_conditioned_and_rank_deficient_factors() -> None:
    g = torch.Generator().manual_seed(11)
    left = torch.randn(50, 4, generator=g, dtype=torch.float64)
    left[:, 3] = left[:, 2] * (1 + 1e-9)  # nearly dependent columns: Householder QR, not Cholesky
    right = torch.randn(4, 30, generator=g, dtype=torch.float64)
    right[1] = 0.0  # a zero row: rank 2 in all
    svd = low_rank_svd(left, right, rank=16)
    assert torch.allclose(svd.s.double()[:4], torch.linalg.svdvals(left @ right)[:4], atol=1e-6)
    assert svd.total_energy == pytest.approx(float((left @ right).pow(2).sum()), rel=1e-6)


def test_a_lora_bias_is_refused_by_name(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    state = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    state[key.replace(".weight", ".bias")] = torch.zeros(state[key].shape[0])
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="LoRA bias"):
        load_checkpoint(str(folder), "model_a")


def test_an_adapter_compared_over_another_base_than_its_config_names_is_a_finding(
    made: dict[str, Path], tmp_path: Path
) -> None:
    twin = make_base(tmp_path / "twin", SHAPE)  # same bytes as the base, another folder
    result = service.compare([str(made["r4_qv"]), str(made["r4_qv_b"])], str(twin), device="cpu")
    found = [f for f in result.findings if f.code == "adapter_declared_base"]
    assert len(found) == 2 and str(made["base"]) in found[0].message
    plain = service.compare([str(made["r4_qv"]), str(made["r4_qv_b"])], str(made["base"]), device="cpu")
    assert not [f for f in plain.findings if f.code == "adapter_declared_base"]


def test_an_adapter_whose_base_is_an_adapter_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_adapter(made["r4_qv"], tmp_path / "a")
    edit_config(folder, base_model_name_or_path=str(made["r4_qv_b"]))
    with pytest.raises(InputError, match="is itself a LoRA adapter"):
        load_checkpoint(str(folder), "model_a")


def test_activation_similarity_of_adapters_is_refused_with_the_way_out(made: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="merge_and_unload"):
        service.compare([str(made["r4_qv"]), str(made["r4_qv_b"])], device="cpu", activations=True)


def test_the_stream_reads_an_adapter_as_base_plus_delta_through_the_bases_own_mapping(made: dict[str, Path]) -> None:
    from mergelens_mcp.analysis.stream import TensorSet, read

    name = "model.layers.0.self_attn.q_proj.weight"
    with load_checkpoint(str(made["base"]), "base") as base:
        adapter = load_checkpoint(str(made["r4_qv"]), "r4_qv", base=base)
        sets = [TensorSet(n, [(adapter, n), (base, n)]) for n in (name, "model.norm.weight")]
        (adapted, plain) = [(s.views[0].clone(), s.views[1].clone()) for s in read(sets, "test")]
        expected = load_file(str(made["r4_qv_dense"] / "model.safetensors"))
        assert torch.allclose(adapted[0], expected[name], atol=1e-6) and not torch.equal(adapted[0], adapted[1])
        assert torch.equal(plain[0], plain[1])  # a tensor the adapter leaves alone is the base's, as stored
        assert adapter._maps == {} and base.files[0] in base._maps  # one mapping of the base's file
        adapter.close()


def test_rows_of_a_checkpoint_are_the_stored_rows_whether_its_file_is_mapped_or_read_row_by_row(
    made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = load_file(made["base"] / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    index = torch.tensor([0, 3, 17, 31])
    with load_checkpoint(str(made["base"]), "base") as base:
        mapped = base.rows(name, index)
    monkeypatch.setattr("mergelens_mcp.analysis.loading.Checkpoint._map", lambda self, path: None)
    with load_checkpoint(str(made["base"]), "base") as base:
        unmapped = base.rows(name, index)
    assert torch.equal(mapped, stored[name][index].float()) and torch.equal(unmapped, mapped)


def test_a_nan_in_the_base_s_sampled_rows_is_counted_for_the_base_and_the_estimates_stay_finite(
    made: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(made["base"], base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][2, 5] = float("nan")  # every row is sampled here
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    pair = []
    for name in ("r4_qv", "r4_qv_b"):
        shutil.copytree(made[name], tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        pair.append(str(tmp_path / name))
    result = service.compare(pair, device="cpu")
    assert result.base is not None and result.base.nonfinite_values == 1
    assert not result.coverage.base_read and result.coverage.base_sample_rows > 0
    layer = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.0")
    assert all(math.isfinite(v) for v in layer.metrics.values()) and "cosine_similarity" in layer.metrics
