"""The preview and verify evaluation of the mergeability benchmark: probe files disjoint from the test prompts,
the tokenizer that gives the benchmark's ids, the configs that are the run's merges, and the whole evaluation
on a smoke run, checked against the benchmark's own model."""

import json

import pytest
import torch

from benchmarks.mergeability.merge import METHODS, merge_states
from benchmarks.mergeability.model import TinyConfig, TinyLlama, build_model, load_config, load_state, save_checkpoint
from benchmarks.mergeability.preview import (
    drop_bin,
    main,
    merge_config,
    probe_records,
    spread,
    write_tokenizer,
)
from benchmarks.mergeability.run import main as run_benchmark
from benchmarks.mergeability.tasks import TASKS, answer, encode_answer, encode_prompt, make_test_set
from mergelens_mcp.probe import merged_tensors, open_config


def _ids(text: str) -> list[int]:
    from benchmarks.mergeability.preview import TOKENS

    return [TOKENS[t] for t in text.split()]


def test_probe_prompts_are_16_per_task_correctly_answered_and_none_is_a_held_out_test_prompt():
    for task in TASKS:
        records = probe_records(task, seed=0, source=f"{task}-lr0.001", test_size=200)
        held_out = {tuple(p) for p in make_test_set(task, 0, 200).prompts}
        prompts = [tuple(_ids(r["prompt"])) for r in records]
        assert len(records) == 16 and len(set(prompts)) == 16
        assert not held_out & set(prompts), task
        for r, prompt in zip(records, prompts, strict=True):
            assert r["source"] == f"{task}-lr0.001"
            digits = [-1 if t == 3 else t - 4 for t in prompt[1:-1]]
            assert _ids(r["completion"]) == encode_answer(answer(task, digits))
            assert list(prompt) == encode_prompt(task, digits)


def test_probe_prompts_come_from_their_own_stream_and_depend_only_on_the_arguments():
    first = probe_records("sort", 0, "s", 200)
    assert first == probe_records("sort", 0, "s", 200)
    assert first != probe_records("sort", 1, "s", 200)
    # a stream of its own: not the test set's first prompts with the held-out ones skipped
    tests = [tuple(p) for p in make_test_set("sort", 0, 216).prompts[200:]]
    assert [tuple(_ids(r["prompt"])) for r in first] != tests


def test_a_task_with_too_few_prompts_outside_the_test_set_is_refused(monkeypatch):
    import benchmarks.mergeability.preview as preview

    monkeypatch.setattr(preview, "sample", lambda task, rng: ([1, 2, 3], [1, 2, 3]))  # one prompt only
    with pytest.raises(ValueError, match="only 1 prompts outside the 24 held-out"):
        preview.probe_records("copy", 0, "c", test_size=24, n=2)


def test_the_tokenizer_gives_the_benchmarks_own_ids(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    record = probe_records("add", 0, "a", 200)[0]
    assert tok(record["prompt"])["input_ids"] == _ids(record["prompt"])
    full = tok(record["prompt"] + record["completion"])["input_ids"]
    assert full == _ids(record["prompt"]) + _ids(record["completion"])
    assert tok("Hello world")["input_ids"] == [22, 22]


@pytest.mark.parametrize("method", list(METHODS))
def test_the_config_previewed_is_the_merge_the_run_measured(tmp_path, method):
    from contextlib import ExitStack

    config = TinyConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1)
    folders = {}
    for i, name in enumerate(("base", "a", "b")):
        torch.manual_seed(i)
        folders[name] = save_checkpoint(TinyLlama(config), tmp_path / name)
    states = {n: load_state(f) for n, f in folders.items()}
    expected = merge_states(METHODS[method], states["base"], states["a"], states["b"], seed=0)
    with ExitStack() as stack:
        merge = open_config(merge_config(method, folders["a"], folders["b"], folders["base"]), stack,
                            guard=None, limits=None)
        got = {job.output: tensor for job, tensor, _ in merged_tensors(merge)}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), (method, name)


def test_verdict_bins_and_spread():
    assert [drop_bin(x) for x in (1.0, 0.9, 0.89, 0.5, 0.49, 0.0)] == ["ok", "ok", "warning", "warning",
                                                                       "failed", "failed"]
    values = {f"p{i}": i / 10 for i in range(11)}
    assert spread(values, 3) == ["p0", "p5", "p10"]
    assert spread(values, 20) == sorted(values, key=values.get)


pytestmark = pytest.mark.slow

ARGS = ["--tasks", "copy,shift", "--pretrain-tasks", "copy", "--steps", "80,30", "--lrs", "2e-3,4e-3",
        "--test-size", "24", "--min-acc", "0", "--seed", "1", "--no-score"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    run_benchmark([*ARGS, "--out", str(run)])
    out = tmp_path_factory.mktemp("preview")
    return run, out, main(["--run", str(run), "--out", str(out), "--min-acc", "0", "--verify-per-method", "1"])


def _agreement(merged: TinyLlama, source: TinyLlama, records: list[dict]) -> float:
    """Greedy-token agreement of two benchmark models on the completions, computed on the benchmark's model."""
    agree = []
    for r in records:
        prompt, completion = _ids(r["prompt"]), _ids(r["completion"])
        tokens = torch.tensor([prompt + completion])
        with torch.no_grad():
            a, b = merged(tokens)[0], source(tokens)[0]
        span = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
        agree.extend((a[span].argmax(-1) == b[span].argmax(-1)).tolist())
    return sum(agree) / len(agree)


def test_every_pair_is_previewed_with_every_method_on_both_probe_sets(evaluated):
    _, out, results = evaluated
    previews = json.loads((out / "preview.json").read_text())
    assert results["summary"]["n_pairs"] == 4 == len(previews)
    for entry in previews.values():
        for probe_set in ("task", "generic"):
            assert set(entry[probe_set]["methods"]) == set(METHODS)
            for m in entry[probe_set]["methods"].values():
                assert 0.0 <= m["retention"] <= 1.0 and len(m["sources"]) == 2
    for probe_set in ("task", "generic"):
        figures = results["summary"]["probe_sets"][probe_set]
        assert set(figures["spearman"]) == set(METHODS)
        assert 0 <= figures["best_within_tolerance"]["retention"] <= 4


def test_the_previews_agreement_is_the_benchmark_models_own_greedy_agreement(evaluated):
    run, out, _ = evaluated
    previews = json.loads((out / "preview.json").read_text())
    manifest = json.loads((run / "checkpoints.json").read_text())
    key = sorted(previews)[0]
    a, b = key.split("|")
    ckpts = out / "checkpoints"
    states = {n: load_state(ckpts / n) for n in ("base", a, b)}
    config = load_config(ckpts / "base")
    for method in ("linear", "ties"):
        merged = build_model(config, merge_states(METHODS[method], states["base"], states[a], states[b], seed=1))
        for name in (a, b):
            task = manifest["finetunes"][name]["task"]
            records = probe_records(task, 1, name, 24)
            want = _agreement(merged, build_model(config, states[name]), records)
            got = previews[key]["task"]["methods"][method]["sources"][name]["agreement"]
            assert got == pytest.approx(want, abs=1e-6), (method, name)


def test_verify_checks_one_written_merge_per_method_and_the_confusion_table_counts_them(evaluated):
    _, out, results = evaluated
    rows = results["verify"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    table = results["summary"]["verify"]["confusion"]
    assert sum(sum(row.values()) for row in table.values()) == len(rows)
    for r in rows:
        assert r["verdict"] in ("ok", "warning", "failed")
        assert "config_mismatch" not in r["codes"], r  # written as the config says
        assert r["actual"] == drop_bin(r["normalized"])
    assert not (out / "merged").exists() or not any((out / "merged").rglob("*.safetensors"))
    table = (out / "summary.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and f"{len(rows)} written merges" in table
