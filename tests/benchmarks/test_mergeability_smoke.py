"""The whole mergeability benchmark on two tasks and few steps: train, merge, evaluate, score, correlate."""

import json

import pytest

from benchmarks.mergeability.merge import METHODS
from benchmarks.mergeability.run import main

ARGS = ["--tasks", "copy,shift", "--pretrain-tasks", "copy", "--steps", "100,40", "--lrs", "2e-3,4e-3",
        "--test-size", "24", "--min-acc", "0", "--seed", "1"]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("mergeability")
    return out, main([*ARGS, "--out", str(out)])


def test_every_cross_task_pair_is_merged_with_every_method(smoke):
    _, results = smoke
    assert results["summary"]["n_pairs"] == 4
    assert sorted(r["pair"] for r in results["pairs"]) == [
        "copy-lr0.002|shift-lr0.002", "copy-lr0.002|shift-lr0.004",
        "copy-lr0.004|shift-lr0.002", "copy-lr0.004|shift-lr0.004",
    ]
    for row in results["pairs"]:
        assert row["task_a"] == "copy" and row["task_b"] == "shift"
        assert set(row["merged"]) == set(METHODS)
        for outcome in row["merged"].values():
            assert 0.0 <= outcome["acc_a"] <= 1.0 and 0.0 <= outcome["acc_b"] <= 1.0


def test_normalized_accuracy_is_the_mean_share_of_each_fine_tunes_own_accuracy(smoke):
    _, results = smoke
    for row in results["pairs"]:
        outcome = row["merged"]["linear"]
        fa, fb = row["finetuned_acc_a"], row["finetuned_acc_b"]
        expected = ((outcome["acc_a"] / fa if fa else 0.0) + (outcome["acc_b"] / fb if fb else 0.0)) / 2
        assert outcome["normalized"] == pytest.approx(expected)


def test_the_fine_tunes_learned_their_task_and_moved_from_the_base(smoke):
    _, results = smoke
    shift = [f for f in results["finetunes"].values() if f["task"] == "shift"]
    assert all(f["accuracy"]["shift"] > results["base"]["accuracy"]["shift"] for f in shift)
    for row in results["pairs"]:
        assert row["tv"]["norm_a"] > 0 and row["tv"]["norm_b"] > 0
        assert -1.0 <= row["tv"]["cosine"] <= 1.0


def test_the_report_has_a_row_per_method_and_predictor_and_the_json_is_written(smoke):
    out, results = smoke
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"]["n_pairs"] == 4
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert table.count("| norms_only |") == len(METHODS)
    norms = results["summary"]["methods"]["linear"]["predictors"]["norms_only"]
    assert norms["n"] == 4


def test_a_second_run_reuses_the_cached_checkpoints_and_outcomes(smoke):
    out, results = smoke
    stamp = (out / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns
    again = main([*ARGS, "--out", str(out)])
    assert (out / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [r["merged"] for r in again["pairs"]] == [r["merged"] for r in results["pairs"]]


def test_every_pair_gets_an_mci_and_per_layer_metrics_from_the_public_api(smoke):
    _, results = smoke
    assert results["mci_available"] is True
    for row in results["pairs"]:
        assert row["mci"] is not None and 0.0 <= row["mci"] <= 100.0
        assert row["score"]["layers"], row["pair"]
        assert any(name.startswith("layers.0/") for name in row["features"])
    assert results["summary"]["methods"]["linear"]["predictors"]["mci"]["n"] == 4
    assert results["summary"]["methods"]["linear"]["predictors"]["composite"]["n"] == 4
    for row in results["pairs"]:
        score = row["score"]
        if score["mci_method"] is not None:  # the MCI is the recommended method's predicted retention
            assert score["mci_method"] == row["recommended"]
            assert row["mci"] == pytest.approx(100 * score["predictions"][row["recommended"]], abs=0.01)
        else:
            assert row["mci"] == row["composite"] and row["recommended"] == "passthrough"
        if row["recommended"] in METHODS:
            merged = row["recommended_merge"]
            assert json.loads(merged["spec"])["method"] == row["recommended"]
            assert 0.0 <= merged["acc_a"] <= 1.0 and 0.0 <= merged["acc_b"] <= 1.0


def test_the_mci_recomputed_from_the_saved_layers_equals_the_apis(smoke):
    from benchmarks.mergeability.calibration import recompute_mci

    _, results = smoke
    for row in results["pairs"]:
        assert recompute_mci(row["score"]["layers"]) == pytest.approx(row["composite"], abs=1e-9), row["pair"]
    assert "held_out_spearman_mean" in results["summary"]["mci_calibration"]
