"""Compatibility findings before any metric, and how they shape the result: reasons, not crashes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fixtures.checkpoints import (
    TINY,
    make_checkpoint,
    make_finetune,
    make_gpt2,
    make_vocab_variant,
    make_with_int_tensor,
    make_with_nonfinite,
    random_model,
    save,
    variant,
)
from mergelens_mcp import Verdict, compare_models
from mergelens_mcp.analysis.compat import plan_comparison
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.models import CompareResult, FindingLevel


def codes(result: CompareResult) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in result.findings:
        out.setdefault(f.code, []).append(f.message)
    return out


def finding(result: CompareResult, code: str):  # type: ignore[no-untyped-def]
    return next(f for f in result.findings if f.code == code)


def test_different_architectures_give_an_incompatible_verdict_with_reasons_and_no_score(
    tmp_path: Path,
) -> None:
    llama, gpt2 = make_checkpoint(tmp_path / "llama"), make_gpt2(tmp_path / "gpt2")
    result = compare_models([str(llama), str(gpt2)])
    assert result.mci.score is None
    assert result.mci.verdict is Verdict.INCOMPATIBLE
    assert [p.score for p in result.pairwise] == [None]
    assert result.layer_metrics == [] and result.conflict_zones == []
    arch = finding(result, "architecture_mismatch")
    assert arch.level is FindingLevel.ERROR
    assert arch.message.startswith("gpt2 is GPT2LMHeadModel, llama is LlamaForCausalLM: different arch")
    assert arch.message in result.mci.reasons
    assert "gpt2 has hidden_size=24, llama hidden_size=16" in codes(result)["config_mismatch"]
    assert result.coverage.tensors_compared == 0


def test_a_different_hidden_size_in_the_same_architecture_is_incompatible(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b", variant(TINY, hidden=24, heads=2, kv_heads=1))
    result = compare_models([str(a), str(b)])
    assert result.mci.score is None and result.mci.verdict is Verdict.INCOMPATIBLE
    assert "b has hidden_size=24, a hidden_size=16" in result.mci.reasons  # models named by their folders
    assert any(m.startswith("model.embed_tokens.weight has shape [32, 16] vs [32, 24]")
               for m in codes(result)["shape_mismatch"])


def test_a_layer_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", variant(TINY, layers=4))
    b = make_checkpoint(tmp_path / "b", variant(TINY, layers=6))
    result = compare_models([str(a), str(b)])
    assert result.mci.score is None and result.mci.verdict is Verdict.INCOMPATIBLE
    [message] = codes(result)["layer_count_mismatch"]
    assert message.startswith("b has 6 layers, a 4")
    assert message in result.mci.reasons


def test_a_tensor_shape_mismatch_is_fatal_and_names_the_tensor(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a")
    state = random_model(TINY, 0)
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(16, 16)
    b = save(state, tmp_path / "b", TINY)
    result = compare_models([str(a), str(b)])
    assert result.mci.score is None and result.mci.verdict is Verdict.INCOMPATIBLE
    [message] = codes(result)["shape_mismatch"]
    name = "model.layers.1.mlp.down_proj.weight"
    assert message == f"{name} has shape [16, 32] vs [16, 16] across a, b"


def test_missing_and_extra_tensors_are_warned_about_and_the_shared_ones_compared(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a")
    extra = {"model.layers.0.mlp.extra.weight": torch.ones(4, 4).bfloat16()}
    b = make_checkpoint(tmp_path / "b", extra=extra)
    result = compare_models([str(a), str(b)])
    [message] = codes(result)["missing_tensors"]
    assert message == "a lacks 1 tensor(s) the others have, e.g. model.layers.0.mlp.extra.weight"
    assert finding(result, "missing_tensors").level is FindingLevel.WARNING
    assert result.mci.score == 100.0  # everything shared is identical
    assert result.coverage.tensors_compared == len(TINY.tensor_shapes())


def test_models_sharing_under_half_their_tensor_names_are_not_the_same_architecture(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a")
    (b := tmp_path / "b").mkdir()
    other = {f"encoder.block.{i}.weight": torch.ones(4, 4) for i in range(30)}
    save_file(other | {"model.norm.weight": torch.ones(16)}, str(b / "model.safetensors"))
    result = compare_models([str(a), str(b)])
    assert result.mci.score is None
    assert codes(result)["tensor_mismatch"] == [
        "the models share only 1 of 51 tensor names: they are not the same architecture"
    ]


def test_a_vocab_mismatch_compares_the_shared_rows_and_points_at_mergekits_tokenizer_section(
    tmp_path: Path,
) -> None:
    a = make_checkpoint(tmp_path / "a")
    b = make_vocab_variant(tmp_path / "b", vocab=40)
    result = compare_models([str(a), str(b)])
    vocab = finding(result, "vocab_mismatch")
    assert vocab.level is FindingLevel.WARNING
    assert vocab.message == "b has vocab_size=40, a 32"
    assert "tokenizer" in vocab.fix and "mergekit" in vocab.fix
    embed = next(lm for lm in result.layer_metrics if lm.layer_name == "embed")
    assert embed.cosine_similarity == pytest.approx(1.0)  # the 32 shared rows are the same
    assert result.mci.score == 100.0


def test_a_vocab_mismatch_without_configs_is_found_from_the_embedding_shapes(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a")
    b = make_vocab_variant(tmp_path / "b", vocab=40)
    (a / "config.json").unlink()
    (b / "config.json").unlink()
    result = compare_models([str(a), str(b)])
    vocab = finding(result, "vocab_mismatch")
    assert vocab.message.endswith("has 32 vs 40 rows: the vocabularies differ")
    assert "tokenizer" in vocab.fix
    assert [f.code for f in result.findings].count("no_config") == 2
    assert result.mci.score == 100.0


def test_a_base_with_a_smaller_vocab_limits_the_rows_of_the_task_vectors(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base")
    a = make_vocab_variant(tmp_path / "a", vocab=40)
    b = make_vocab_variant(tmp_path / "b", vocab=40, seed=0)
    result = compare_models([str(a), str(b)], base=str(base))
    assert result.mci.used_base
    assert result.mci.score == 100.0
    assert "base_mismatch" not in codes(result)


def test_tied_embeddings_are_noted(tmp_path: Path) -> None:
    tied = variant(TINY, tie_embeddings=True)
    a = make_checkpoint(tmp_path / "a", tied)
    b = make_finetune(tmp_path / "b", tied)
    result = compare_models([str(a), str(b)])
    note = finding(result, "tied_embeddings")
    assert note.level is FindingLevel.INFO
    assert note.message.startswith("a ties its output head to the input embeddings")
    assert not any(lm.layer_name == "lm_head" for lm in result.layer_metrics)
    assert result.mci.score is not None


def test_a_tied_and_an_untied_model_warn_about_the_missing_head(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", variant(TINY, tie_embeddings=True))
    b = make_checkpoint(tmp_path / "b")
    result = compare_models([str(a), str(b)])
    assert "tied_embeddings" in codes(result)
    [message] = codes(result)["missing_tensors"]
    assert message == "a lacks 1 tensor(s) the others have, e.g. lm_head.weight"


def test_non_float_tensors_are_skipped_listed_and_not_compared(tmp_path: Path) -> None:
    a = make_with_int_tensor(tmp_path / "a")
    b = make_with_int_tensor(tmp_path / "b")
    result = compare_models([str(a), str(b)])
    assert [m.skipped_tensors for m in result.models] == [["model.position_ids"], ["model.position_ids"]]
    assert not any("model.position_ids" in lm.tensor_names for lm in result.layer_metrics)
    assert result.mci.score == 100.0


def test_nan_and_inf_values_are_counted_reported_and_never_reach_the_scores(tmp_path: Path) -> None:
    bad = make_with_nonfinite(tmp_path / "bad", nan=3, inf=2)
    clean = make_checkpoint(tmp_path / "clean", dtype=torch.float32)
    base = make_checkpoint(tmp_path / "base", seed=9)
    result = compare_models([str(bad), str(clean)], base=str(base))
    assert [m.nonfinite_values for m in result.models] == [5, 0]
    message = finding(result, "nonfinite_values").message
    assert message == "bad holds 5 NaN or Inf values; they were read as 0"
    assert result.mci.score is not None and math.isfinite(result.mci.score)
    for lm in result.layer_metrics:
        assert all(math.isfinite(v) for v in [*lm.metrics.values(), *lm.components.values(), lm.score])
    data = json.loads(result.model_dump_json())  # pydantic would write a NaN as null
    assert data["mci"]["score"] == result.mci.score
    for lm in data["layer_metrics"]:
        assert all(isinstance(v, float | int) for v in [*lm["metrics"].values(), lm["score"]])


def test_the_same_weights_in_bf16_and_fp32_are_highly_compatible(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", dtype=torch.bfloat16)
    b = make_checkpoint(tmp_path / "b", dtype=torch.float32)
    result = compare_models([str(a), str(b)])
    assert result.models[0].dtypes == {"BF16": 21} and result.models[1].dtypes == {"F32": 21}
    assert result.mci.verdict is Verdict.HIGHLY_COMPATIBLE
    assert result.mci.score is not None and result.mci.score > 95


def test_a_sharded_and_a_single_file_copy_of_one_model_score_100(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", shards=2)
    b = make_checkpoint(tmp_path / "b", dtype=torch.bfloat16)
    result = compare_models([str(a), str(b / "model.safetensors")])
    assert [m.files for m in result.models] == [2, 1]
    assert result.mci.score == 100.0


def test_a_base_of_another_architecture_is_ignored_with_a_warning(tmp_path: Path) -> None:
    a, b = make_checkpoint(tmp_path / "a"), make_finetune(tmp_path / "b")
    base = make_gpt2(tmp_path / "gpt2")
    result = compare_models([str(a), str(b)], base=str(base))
    assert result.mci.score is not None
    assert not result.mci.used_base
    assert "architecture_mismatch" in codes(result)
    assert all(f.level is not FindingLevel.ERROR for f in result.findings)
    assert any("base model could not be paired" in n for n in result.notes)


def test_plan_comparison_finds_nothing_wrong_with_two_fine_tunes_of_one_base(tmp_path: Path) -> None:
    base, a = make_checkpoint(tmp_path / "base"), make_finetune(tmp_path / "a", task_seed=1)
    b = make_finetune(tmp_path / "b", task_seed=2)
    with load_checkpoint(str(a), "model_a") as ca, load_checkpoint(str(b), "model_b") as cb, \
            load_checkpoint(str(base), "base") as cbase:
        plan = plan_comparison([ca, cb], cbase)
    assert plan.findings == [] and plan.fatal == []
    assert len(plan.tensors) == len(TINY.tensor_shapes()) == len(plan.base_tensors)
    assert plan.n_blocks == 2


def test_a_base_with_a_larger_vocab_is_cut_to_the_candidates_rows(tmp_path: Path) -> None:
    base = make_vocab_variant(tmp_path / "base", vocab=40)
    a, b = make_checkpoint(tmp_path / "a"), make_finetune(tmp_path / "b")
    result = compare_models([str(a), str(b)], base=str(base))
    assert result.mci.used_base and result.mci.score is not None
    embed = next(lm for lm in result.layer_metrics if lm.layer_name == "embed")
    assert embed.task_cosine is not None
    assert "vocab_mismatch" in codes(result)


def test_a_base_with_a_wider_mlp_is_not_used_for_those_tensors(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base", variant(TINY, intermediate=48))
    a, b = make_checkpoint(tmp_path / "a"), make_finetune(tmp_path / "b")
    result = compare_models([str(a), str(b)], base=str(base))
    assert result.mci.score is not None
    [message] = codes(result)["base_mismatch"]
    assert message.startswith("the base lacks or reshapes 6 of 21 compared tensors")  # 3 MLP x 2 layers


def test_empty_tensors_are_listed_and_not_compared(tmp_path: Path) -> None:
    extra = {"model.layers.0.mlp.empty.weight": torch.zeros(0, 16).bfloat16()}
    a = make_checkpoint(tmp_path / "a", extra=extra)
    b = make_finetune(tmp_path / "b", extra=extra)
    result = compare_models([str(a), str(b)], base=str(a))
    name = "model.layers.0.mlp.empty.weight"
    listed = codes(result).get("empty_tensors", []) + [n for m in result.models for n in m.skipped_tensors]
    assert any(name in entry for entry in listed)  # as a finding, or with the skipped tensors
    assert not any(name in lm.tensor_names for lm in result.layer_metrics)
    assert result.mci.score is not None
    assert result.coverage.tensors_compared == len(TINY.tensor_shapes())


def test_a_different_rope_theta_is_a_warning_not_a_reason_to_refuse(tmp_path: Path) -> None:
    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b")
    config = json.loads((b / "config.json").read_text()) | {"rope_theta": 500000.0}
    (b / "config.json").write_text(json.dumps(config))
    result = compare_models([str(a), str(b)])
    [message] = codes(result)["config_difference"]
    assert message == "b has rope_theta=500000.0, a rope_theta=10000.0"
    assert result.mci.score == 100.0


def test_an_unreadable_config_falls_back_to_tensor_names(tmp_path: Path) -> None:
    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b")
    (a / "config.json").write_text("{")
    (b / "config.json").write_text("[1, 2]")
    result = compare_models([str(a), str(b)])
    assert [f.code for f in result.findings] == ["no_config", "no_config", "same_checkpoint"]  # same weights
    assert result.models[0].architecture is None
    assert result.mci.score == 100.0
