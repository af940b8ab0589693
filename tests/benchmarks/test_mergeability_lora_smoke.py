"""The mergeability benchmark with LoRA fine-tunes on two tasks and few steps: adapters, merges, scores."""

import json
import shutil

import pytest
import torch

from benchmarks.mergeability.lora import load_adapter, merged_state
from benchmarks.mergeability.merge import METHODS
from benchmarks.mergeability.model import build_model, load_config, load_state
from benchmarks.mergeability.run import main, train_finetune
from benchmarks.mergeability.tasks import accuracy, make_test_set

ARGS = ["--tasks", "copy,shift", "--pretrain-tasks", "copy", "--steps", "100,40", "--lrs", "5e-3,1e-2",
        "--test-size", "24", "--min-acc", "0", "--seed", "1", "--finetune", "lora", "--lora-rank", "4"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("mergeability-lora")
    return out, main([*ARGS, "--out", str(out)])


def test_every_fine_tune_is_a_peft_adapter_of_the_runs_base(smoke):
    out, results = smoke
    assert results["settings"]["finetune"] == "lora"
    assert (results["settings"]["lora_rank"], results["settings"]["lora_alpha"]) == (4, 8.0)
    assert sorted(results["finetunes"]) == ["copy-lr0.005", "copy-lr0.01", "shift-lr0.005", "shift-lr0.01"]
    for f in results["finetunes"].values():
        folder = out / "checkpoints" / f"{f['task']}-lr{f['lr']:g}"
        assert f["path"] == str(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((out / "checkpoints" / "base").resolve())
        assert (config["r"], config["lora_alpha"]) == (4, 8.0)


def test_each_adapters_accuracy_is_that_of_its_base_plus_delta_model(smoke):
    out, results = smoke
    base_state = load_state(out / "checkpoints" / "base")
    config = load_config(out / "checkpoints" / "base")
    for name, f in results["finetunes"].items():
        model = build_model(config, merged_state(base_state, out / "checkpoints" / name))
        assert f["accuracy"]["shift"] == accuracy(model, make_test_set("shift", 1, 24)), name
    assert {f["accuracy"]["copy"] for f in results["finetunes"].values()} != {0.0}  # not all trivially zero


def test_every_pair_is_merged_with_every_method_on_base_plus_the_adapters_delta(smoke):
    out, results = smoke
    assert results["summary"]["n_pairs"] == 4
    for row in results["pairs"]:
        assert set(row["merged"]) == set(METHODS)
        for outcome in row["merged"].values():
            assert 0.0 <= outcome["acc_a"] <= 1.0 and 0.0 <= outcome["acc_b"] <= 1.0
        # the task-vector norm is the adapter's |(B @ A) * scale| over its adapted tensors
        factors, scale = load_adapter(out / "checkpoints" / row["a"])
        norm = float(torch.cat([((b @ a) * scale).flatten() for a, b in factors.values()]).norm())
        assert row["tv"]["norm_a"] == pytest.approx(norm, rel=1e-4)


def test_the_product_scores_every_pair_as_two_adapters_with_predictions(smoke):
    out, results = smoke
    for row in results["pairs"]:
        score = row["score"]
        assert score["adapters"] == [row["a"], row["b"]]
        assert row["mci"] is not None and 0.0 <= row["mci"] <= 100.0
        assert set(score["predictions"]) == set(METHODS)
        assert score["predicted_best"] in METHODS
        assert all(0.0 <= low <= score["predictions"][m] <= high <= 1.0
                   for m, (low, high) in score["prediction_intervals"].items())
        assert any(name.startswith("layers.0/") for name in row["features"])
        if row["recommended"] in METHODS:  # merged again with the recommendation's own parameters
            assert json.loads(row["recommended_merge"]["spec"])["method"] == row["recommended"]
            assert 0.0 <= row["recommended_merge"]["normalized"] <= 1.0
    summary = results["summary"]
    assert summary["methods"]["ties"]["predictors"]["predicted"]["n"] == 4
    assert summary["recommendation"]["pairs_with_predictions"] == 4
    assert 0.0 <= summary["methods"]["ties"]["predicted_mae"] <= 1.0
    table = (out / "results.md").read_text()
    assert table.count("| predicted |") == len(METHODS)
    assert table.count(", 80% interval holds ") == len(METHODS)


def test_a_second_run_reuses_the_adapters_and_the_outcomes(smoke):
    out, results = smoke
    adapter = out / "checkpoints" / "copy-lr0.005" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    again = main([*ARGS, "--out", str(out)])
    assert adapter.stat().st_mtime_ns == stamp
    assert [r["merged"] for r in again["pairs"]] == [r["merged"] for r in results["pairs"]]


def test_another_rank_reuses_a_copied_base_and_trains_new_adapters(smoke, tmp_path):
    out, results = smoke
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(out / "checkpoints" / "base", tmp_path / "checkpoints" / "base")
    shutil.copy(out / "checkpoints.json", tmp_path / "checkpoints.json")
    stamp = (tmp_path / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns
    args = [*ARGS[:-1], "2", "--lrs", "5e-3", "--methods", "linear", "--no-score", "--jobs", "2",
            "--out", str(tmp_path)]
    other = main(args)
    assert (tmp_path / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert other["base"]["accuracy"] == results["base"]["accuracy"]
    assert other["base"]["path"] == str(tmp_path / "checkpoints" / "base")
    config = json.loads((tmp_path / "checkpoints" / "copy-lr0.005" / "adapter_config.json").read_text())
    assert (config["r"], config["base_model_name_or_path"]) == (2, str((tmp_path / "checkpoints" / "base").resolve()))
    # trained in a pool of two processes, the adapter has the bits of the same job run here
    tests = {t: make_test_set(t, 1, 24) for t in ("copy", "shift")}
    job = {"name": "again", "task": "copy", "lr": 5e-3, "kind": "lora", "base": str(tmp_path / "checkpoints" / "base"),
           "folder": str(tmp_path / "again"), "steps": 40, "seed": 1, "rank": 2, "alpha": 4.0, "tests": tests}
    entry = train_finetune(job)
    assert entry["accuracy"] == other["finetunes"]["copy-lr0.005"]["accuracy"]
    pooled = (tmp_path / "checkpoints" / "copy-lr0.005" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == pooled


def test_merges_recomputed_in_two_processes_give_the_same_outcomes(smoke):
    out, results = smoke
    (out / "outcomes.json").unlink()
    methods = ["dare_ties", "linear"]  # a seeded random method and a plain one
    again = main([*ARGS, "--jobs", "2", "--no-score", "--methods", ",".join(methods), "--out", str(out)])
    assert {r["pair"]: r["merged"] for r in again["pairs"]} == {
        r["pair"]: {m: r["merged"][m] for m in methods} for r in results["pairs"]}
    assert {r["pair"]: r["tv"] for r in again["pairs"]} == {r["pair"]: r["tv"] for r in results["pairs"]}
