"""`mergelens compare`: in-process through cli.main, and once as a real `python -m mergelens_mcp` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.checkpoints import make_checkpoint, make_finetune, make_gpt2, write_pickle_only
from mergelens_mcp.cli import EXIT_BAD_INPUT, EXIT_OK, main
from mergelens_mcp.models import CompareResult, Verdict

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps at the terminal width; wide lines keep long tmp paths and messages on one line."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny base and three fine-tunes of it."""
    root = tmp_path_factory.mktemp("trio")
    paths = {"base": make_checkpoint(root / "base")}
    for i, name in enumerate(("a", "b", "c")):
        paths[name] = make_finetune(root / name, task_seed=10 + i)
    return {k: str(v) for k, v in paths.items()}


def test_compare_prints_the_verdict_the_layer_table_and_exits_0(
    trio: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", trio["a"], trio["b"], "--base", trio["base"], "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Merge Compatibility Index:" in out
    assert any(v in out for v in ("highly compatible", "compatible", "risky", "incompatible"))
    assert "Per layer" in out and "layers.1" in out and "task cos" in out


def test_compare_json_round_trips_through_the_result_model(
    trio: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "result.json"
    code = main(["compare", trio["a"], trio["b"], "--base", trio["base"], "--json", str(out_file)])
    printed = capsys.readouterr()
    assert code == EXIT_OK
    assert f"JSON written to {out_file}" in printed.err
    text = out_file.read_text(encoding="utf-8")
    result = CompareResult.model_validate_json(text)
    assert result.model_dump_json(indent=2) + "\n" == text
    assert result.mci.used_base
    assert f"{result.mci.score:.1f}/100" in printed.out
    assert result.mci.verdict.value.replace("_", " ") in printed.out
    assert [m.source for m in result.models] == [trio["a"], trio["b"]]


def test_three_models_give_three_pairs(
    trio: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "three.json"
    code = main(["compare", trio["a"], trio["b"], trio["c"], "--json", str(out_file), "--layers", "0"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    result = CompareResult.model_validate_json(out_file.read_text())
    assert [(p.model_a, p.model_b) for p in result.pairwise] == [
        ("a", "b"), ("a", "c"), ("b", "c")  # named by their folders
    ]
    assert {(lm.model_a, lm.model_b) for lm in result.layer_metrics} == {
        (p.model_a, p.model_b) for p in result.pairwise
    }
    assert "Pairs" in out and "Per layer" not in out
    assert result.mci.score == min(p.score for p in result.pairwise if p.score is not None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "{a}"], "nope: '{missing}' is neither an existing path nor a Hugging Face Hub id"),
        (["{a}"], "compare needs at least two models"),
        (["{a}", "{pickle}"], "pytorch_model.bin is a pickle-based checkpoint"),
        (["{a}", "{empty}"], "holds no .safetensors files"),
    ],
    ids=["missing-path", "one-model", "bin-only", "empty-folder"],
)
def test_bad_input_exits_2_with_a_clear_message_and_no_traceback(
    trio: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    names = {"a": trio["a"], "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"),
             "pickle": str(write_pickle_only(tmp_path / "bin"))}
    code = main(["compare", *(a.format(**names) for a in args)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert err.startswith("error: ")
    assert message.format(**names) in err
    assert "Traceback" not in err


def test_an_unknown_device_is_refused_by_the_parser(
    trio: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", trio["a"], trio["b"], "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_python_dash_m_mergelens_mcp_compare_runs_as_a_subprocess(
    trio: dict[str, str], tmp_path: Path
) -> None:
    out_file = tmp_path / "sub.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "-m", "mergelens_mcp", "compare", trio["a"], trio["b"], "--base", trio["base"],
         "--json", str(out_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = CompareResult.model_validate_json(out_file.read_text())
    assert f"Merge Compatibility Index: {result.mci.score:.1f}/100" in done.stdout
    assert result.mci.verdict.value.replace("_", " ") in done.stdout
    assert result.mci.verdict in (Verdict.HIGHLY_COMPATIBLE, Verdict.COMPATIBLE)  # two fine-tunes of one base
    assert json.loads(out_file.read_text())["mci"]["score"] == result.mci.score


def test_a_json_path_in_a_missing_folder_is_bad_input_found_before_the_analysis(
    trio: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no" / "such" / "dir" / "out.json"
    code = main(["compare", trio["a"], trio["b"], "--json", str(target)])
    err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert "--json" in err.err and "folder" in err.err
    assert "Merge Compatibility Index" not in err.out  # refused before any tensor was read


def test_incompatible_models_print_the_verdict_and_the_reason_and_exit_0(
    trio: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", trio["a"], str(make_gpt2(tmp_path / "gpt2"))])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Merge Compatibility Index: n/a  incompatible" in out
    assert "gpt2 is GPT2LMHeadModel, a is LlamaForCausalLM" in out
    assert "Per layer" not in out


def test_compare_prints_the_answer_first_and_the_same_model_twice_is_a_clear_no_not_a_crash(
    trio: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", trio["a"], trio["a"] + "/", "--device", "cpu"])  # two spellings, one checkpoint
    out = capsys.readouterr().out
    assert code == EXIT_OK
    first = next(line for line in out.splitlines() if line.strip())
    assert first.startswith("No: a and a-2 are the same checkpoint")
    assert "Recommended merge" not in out


def test_diagnose_with_a_base_hint_warns_that_a_linear_merge_of_opposed_fine_tunes_cancels_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from mergelens_mcp.demo import make_family

    f = make_family(tmp_path / "family")
    config = tmp_path / "linear.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(f.finetune_a), "parameters": {"weight": 0.5}},
        {"model": str(f.opposed), "parameters": {"weight": 0.5}},
    ]}))
    main(["diagnose", "--config", str(config)])
    blind = capsys.readouterr().out
    main(["diagnose", "--config", str(config), "--base", str(f.base)])
    seen = capsys.readouterr().out
    assert "no base model: the simulation measures how the weights average" in blind
    assert "high_interference" not in blind and "cancel or discard" not in blind
    assert "the merge would cancel or discard 98% of the models' changes (warned above 50%)" in seen


def test_report_reads_the_base_of_lora_adapters_only_with_read_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fixtures.adapters import make_adapter_family
    from mergelens_mcp import service

    monkeypatch.setenv("MERGELENS_WORKER_PROCESSES", "0")
    _, adapters, _ = make_adapter_family(tmp_path / "lora")
    asked: list[bool] = []
    real = service.compare_checkpoints

    def recording(models, base, options, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(options.read_base)
        return real(models, base, options, **kwargs)

    monkeypatch.setattr(service, "compare_checkpoints", recording)
    for flags in ([], ["--read-base"]):
        out = tmp_path / f"report{len(flags)}.html"
        assert main(["report", str(adapters[0]), str(adapters[1]), "-o", str(out), *flags]) == EXIT_OK
        assert out.stat().st_size > 0
    assert asked == [False, True]


def test_compare_reads_the_base_of_lora_adapters_only_with_read_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures.adapters import make_adapter_family

    monkeypatch.setenv("MERGELENS_WORKER_PROCESSES", "0")
    _, adapters, _ = make_adapter_family(tmp_path / "lora")
    found = {}
    for flags in ([], ["--read-base"]):
        out_file = tmp_path / f"result{len(flags)}.json"
        assert main(["compare", str(adapters[0]), str(adapters[1]), "--json", str(out_file), *flags]) == EXIT_OK
        found[bool(flags)] = CompareResult.model_validate_json(out_file.read_text()).coverage
    assert not found[False].base_read and found[False].not_measured == ["effective_rank_ratio", "spectral_overlap"]
    assert "cosine_similarity" in found[False].base_sampled and found[False].base_bytes_share > 0
    assert found[True].base_read and found[True].not_measured == [] and found[True].base_sampled == []
