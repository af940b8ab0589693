from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import mergelens_mcp
from fixtures.checkpoints import Family, Shape, make_family
from fixtures.configs import ties_config
from fixtures.results import make_result
from mergelens_mcp import cli, report, service
from mergelens_mcp.errors import InputError, PathNotAllowedError
from mergelens_mcp.models import (
    CompareResult,
    ConfigDiagnosis,
    Finding,
    FindingLevel,
    LayerInterference,
    MergeMethod,
    Strategy,
    Verdict,
)
from mergelens_mcp.security.paths import PathGuard
from mergelens_mcp.settings import Settings

FIGURE = re.compile(r'<script type="application/json" id="(fig-\d+-[^"]+)-data">(.*?)</script>', re.S)
XSS = "<script>alert(1)</script>"
ODD_TENSOR = "model.layers.0.q\"proj'</script><!--x.weight"
YAML = "merge_method: ties\nbase_model: /models/base\nparameters:\n  density: 0.5\n"


def figures(page: str) -> dict[str, dict]:
    """Figure id ('gauge', 'heatmap-model_a-model_b', ...) -> {'data', 'layout', 'config'}."""
    return {re.sub(r"^fig-\d+-", "", fid): json.loads(body) for fid, body in FIGURE.findall(page)}


def without_plotly(page: str) -> str:
    """The page minus the inlined Plotly library, so that assertions look only at our markup and data."""
    start = page.index("<script>", page.index("</style>"))
    return page[:start] + page[page.index("</script>", start):]


def with_strategy(result: CompareResult, yaml: str = YAML) -> CompareResult:
    strategy = Strategy(method=MergeMethod.TIES, confidence=0.8,
                        rationale=["the task vectors conflict in sign"], runner_up=MergeMethod.DARE_TIES,
                        parameters={"density": 0.5}, mergekit_yaml=yaml)
    return result.model_copy(update={"strategy": strategy})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Family:
    shape = Shape(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, vocab=32)
    return make_family(tmp_path_factory.mktemp("tiny"), shape)


def test_report_is_one_self_contained_file_with_plotly_inlined() -> None:
    page = report.render_report(make_result())
    assert page.startswith("<!DOCTYPE html>")
    assert report.MARKER in page[:500]
    assert re.findall(r"<script[^>]*\bsrc\s*=", page) == []
    assert re.findall(r"<link\b", page) == []
    assert re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", without_plotly(page)) == []
    assert page.count("<script>") == 2  # Plotly once, then the drawing code
    assert "Plotly.newPlot" in page and len(page) > 3_000_000


def test_gauge_shows_the_mci_and_the_verdict_with_plain_advice() -> None:
    result = make_result()
    page = report.render_report(result)
    gauge = figures(page)["gauge"]["data"][0]
    assert gauge["type"] == "indicator"
    assert gauge["value"] == pytest.approx(result.mci.score)
    assert result.mci.verdict.value == "compatible"
    assert '<span class="badge big" style="background:#66bd63">compatible</span>' in page
    advice = report.summary_paragraph(result)
    assert advice.startswith("Merge with care")
    assert "1 conflict zone (layers.2)" in advice and "ties or dare_ties" in advice
    assert f'<p class="advice">{advice.replace(chr(39), "&#x27;")}</p>' in page


def test_advice_says_not_to_merge_when_models_cannot_be_compared() -> None:
    result = make_result()
    broken = result.model_copy(update={"mci": result.mci.model_copy(update={
        "score": None, "verdict": Verdict.INCOMPATIBLE, "reasons": ["model_b is MistralForCausalLM"]})})
    assert report.summary_paragraph(broken) == (
        "Do not merge these models: they cannot be compared tensor by tensor "
        "(model_b is MistralForCausalLM).")
    assert figures(report.render_report(broken))["gauge"]["data"][0]["mode"] == "gauge"


def test_models_that_cannot_be_compared_get_the_gauge_and_the_reason_only() -> None:
    result = make_result()
    fatal = Finding(level=FindingLevel.ERROR, code="architecture_mismatch",
                    message="model_b is MistralForCausalLM, model_a is LlamaForCausalLM")
    none = {"score": None, "verdict": Verdict.INCOMPATIBLE}
    broken = result.model_copy(update={
        "mci": result.mci.model_copy(update={**none, "reasons": [fatal.message]}),
        "pairwise": [p.model_copy(update=none) for p in result.pairwise],
        "layer_metrics": [], "conflict_zones": [], "findings": [fatal],
    })
    page = report.render_report(broken)
    assert list(figures(page)) == ["gauge"]
    assert '<span class="badge big" style="background:#d73027">incompatible</span>' in page
    assert "No layers could be compared." in page and "MCI n/a" in page
    assert '<li class="finding error"><span class="badge lvl-error">error</span>' in page


def test_heatmap_rows_are_components_where_zero_is_bad_and_hover_shows_values_and_tensors() -> None:
    result = make_result(n_blocks=4)
    heat = figures(report.render_report(result))["heatmap-model_a-model_b"]["data"][0]
    assert heat["x"] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    assert heat["y"][:3] == ["layer score", "direction (cosine)", "distance (L2)"]
    assert (heat["zmin"], heat["zmax"]) == (0.0, 1.0)
    assert heat["colorscale"][0] == [0.0, "#a50026"] and heat["colorscale"][-1] == [1.0, "#1a9850"]
    layer2 = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.2")
    row, col = heat["y"].index("task alignment"), heat["x"].index("layers.2")
    assert heat["z"][row][col] == pytest.approx(layer2.components["alignment"], abs=1e-4)
    assert heat["z"][row][col] < 0.15 < 0.7 < heat["z"][row][heat["x"].index("layers.1")]
    hover = heat["customdata"][row][col]
    assert f"task_cosine = {layer2.metrics['task_cosine']:.4f}" in hover
    assert "model.layers.2.mlp.down_proj.weight" in hover
    norm = heat["x"].index("norm")
    assert heat["z"][heat["y"].index("subspace overlap")][norm] is None  # vectors have no spectrum


def test_line_chart_shades_each_conflict_zone_in_both_panels() -> None:
    result = make_result(n_blocks=6, conflict_layers=(2, 3))
    assert [z.layer_names for z in result.conflict_zones] == [["layers.2", "layers.3"]]
    lines = figures(report.render_report(result))["lines-model_a-model_b"]
    shapes = [s for s in lines["layout"]["shapes"] if s["type"] == "rect"]
    spans = [(s["x0"], s["x1"], s["yref"]) for s in shapes]
    assert spans == [(2.5, 4.5, "y domain"), (2.5, 4.5, "y2 domain")]
    names = [t["name"] for t in lines["data"]]
    assert names == ["layer score", "weight cosine", "subspace overlap", "task-vector cosine",
                     "sign disagreement", "TSV interference"]
    assert lines["data"][0]["y"] == [lm.score for lm in result.layer_metrics]


def test_zones_table_lists_each_zone_with_its_severity_and_recommendation() -> None:
    result = make_result(n_models=3)
    page = without_plotly(report.render_report(result))
    table = page[page.index('id="zones"'):page.index("</section>", page.index('id="zones"'))]
    assert len(result.conflict_zones) == 2
    assert table.count("<tr>") == 1 + 2
    for zone in result.conflict_zones:
        assert report.esc(zone.recommendation) in table
        assert f"<td class='nowrap'>{zone.model_a} + {zone.model_b}</td>" in table
    assert table.count('<span class="badge sev-medium">medium</span>') == 2


def test_no_zones_says_so() -> None:
    page = report.render_report(make_result(conflict_layers=()))
    assert "No conflict zones: no run of layers scores below the threshold." in page


def test_findings_are_listed_with_level_code_and_fix() -> None:
    finding = Finding(level=FindingLevel.WARNING, code="vocab_mismatch",
                      message="model_b has vocab_size=32002", fix="add tokenizer: {source: union}",
                      path="vocab_size")
    page = report.render_report(make_result(findings=[finding]))
    assert ('<li class="finding warning"><span class="badge lvl-warning">warning</span> '
            '<code class="code">vocab_mismatch</code> model_b has vocab_size=32002') in page
    assert '<div class="fix">fix: add tokenizer: {source: union}</div>' in page
    assert "No compatibility problems found" in report.render_report(make_result())


def test_strategy_yaml_is_shown_with_a_copy_button_only_when_set() -> None:
    plain = without_plotly(report.render_report(make_result()))
    assert 'id="strategy"' not in plain and "Copy YAML</button>" not in plain
    page = without_plotly(report.render_report(with_strategy(make_result())))
    assert '<span class="badge method">ties</span> confidence 0.80' in page
    assert f'<pre class="yaml"><code id="strategy-yaml">{YAML}</code></pre>' in page
    assert '<button type="button" class="copy" data-copy="strategy-yaml">Copy YAML</button>' in page
    assert "runner-up: dare_ties" in page and "parameters: density=0.5" in page
    assert "Recommended method: ties (confidence 0.80)" in page


def test_three_models_get_a_pairwise_matrix_and_a_section_per_pair_weakest_first() -> None:
    result = make_result(n_models=3)
    figs = figures(report.render_report(result))
    assert list(figs) == ["gauge", "pairwise", "heatmap-model_a-model_b", "lines-model_a-model_b",
                          "heatmap-model_b-model_c", "lines-model_b-model_c", "heatmap-model_a-model_c",
                          "lines-model_a-model_c"]
    matrix = figs["pairwise"]["data"][0]
    scores = {(p.model_a, p.model_b): p.score for p in result.pairwise}
    assert matrix["z"][0] == [None, scores[("model_a", "model_b")], scores[("model_a", "model_c")]]
    assert matrix["z"][2][1] == scores[("model_b", "model_c")]
    assert "/models/ft_2" in matrix["customdata"][0][2]


def test_two_models_get_no_pairwise_matrix() -> None:
    assert list(figures(report.render_report(make_result()))) == [
        "gauge", "heatmap-model_a-model_b", "lines-model_a-model_b"]


def test_script_json_cannot_close_a_script_or_open_a_comment() -> None:
    data = {"name": "</script><!-- & ]]> \u2028"}
    text = report.script_json(data)
    assert "</" not in text and "<!--" not in text and "<" not in text and "\u2028" not in text
    assert json.loads(text) == data


def test_strings_from_files_and_users_are_escaped_in_html_and_in_figure_json() -> None:
    finding = Finding(level=FindingLevel.ERROR, code="x", message="bad <img src=x onerror=alert(1)>",
                      fix="fix \"it\" & go", path="<b>")
    result = make_result(n_models=3, sources=[XSS, "/m/a'b\"c", "/m/ok"],
                         extra_tensors={"layers.0": [ODD_TENSOR]}, findings=[finding])
    page = report.render_report(with_strategy(result, yaml="a: 1\n</script><script>alert(2)</script>\n"))
    ours = without_plotly(page)
    for raw in (XSS, "<img src=x", "</script><script>alert(2)", "<!--x", "<b>"):
        assert raw not in ours
    assert ours.count("<script") == 1 + 8  # the drawing code + the figures' JSON blocks, nothing injected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in ours
    assert "/m/a&#x27;b&quot;c" in ours
    assert "bad &lt;img src=x onerror=alert(1)&gt;" in ours
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in ours
    figs = figures(page)
    hover = figs["heatmap-model_a-model_b"]["data"][0]["customdata"][0][1]
    assert "model.layers.0.q\"proj'&lt;/script&gt;&lt;!--x.weight" in hover
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in figs["pairwise"]["data"][0]["customdata"][0][1]


def test_diagnosis_section_shows_method_validity_findings_and_interference_per_layer() -> None:
    finding = Finding(level=FindingLevel.WARNING, code="weights_sum", message="weights sum to 1.6 <not 1>",
                      fix="normalize: true", path="parameters.weight")
    layers = [LayerInterference(layer_name=f"layers.{i}", layer_index=i, n_params=100, interference=v)
              for i, v in enumerate((0.1, 0.8))]
    diagnosis = ConfigDiagnosis(valid=False, merge_method="ties", findings=[finding], overall_interference=0.4213,
                                layers=layers,
                                models_checked=["/m/a", "/m/<b>"], notes=["simulated on 2 of 2 models"])
    page = report.render_report(make_result(), diagnosis=diagnosis)
    section = page[page.index('id="diagnosis"'):]
    assert '<span class="badge method">ties</span> <span class="badge lvl-error">will not run</span>' \
        in section
    assert "Simulated interference of this configuration: <b>0.421</b>" in section
    assert "Simulated on the weights of <code>/m/a</code>, <code>/m/&lt;b&gt;</code>." in section
    assert "weights sum to 1.6 &lt;not 1&gt;" in section and "<code>parameters.weight</code>" in section
    assert '<div class="fix">fix: normalize: true</div>' in section
    assert '<li class="note">simulated on 2 of 2 models</li>' in section
    bars = figures(page)["interference"]["data"][0]
    assert (bars["type"], bars["x"], bars["y"]) == ("bar", ["layers.0", "layers.1"], [0.1, 0.8])
    assert 'id="diagnosis"' not in report.render_report(make_result())


def test_diagnosis_section_shows_the_real_diagnosis_of_a_config(family: Family, tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    models = (str(family.finetune_a), str(family.flipped), str(family.base))
    config.write_text(yaml.safe_dump(ties_config(*models)))
    diagnosis = service.diagnose(str(config))
    assert diagnosis.overall_interference is not None and len(diagnosis.layers) == 7
    page = report.render_report(make_result(), diagnosis=diagnosis)
    section = page[page.index('id="diagnosis"'):]
    assert '<span class="badge method">ties</span> <span class="badge" style="background:#1a9850">valid</span>' \
        in section
    assert f"<b>{diagnosis.overall_interference:.3f}</b>" in section
    assert all(f"<code>{m}</code>" in section for m in models)
    bars = figures(page)["interference"]["data"][0]
    assert bars["x"] == [layer.layer_name for layer in diagnosis.layers]
    assert bars["y"] == [layer.interference for layer in diagnosis.layers]


def test_a_diagnosis_read_back_from_json_without_simulation_shows_no_interference() -> None:
    text = json.dumps({"valid": True, "merge_method": None, "overall_interference": None,
                       "findings": [{"level": "info", "code": "dtype", "message": "dtype is float16"}]})
    section = report.render_report(make_result(), diagnosis=ConfigDiagnosis.model_validate_json(text)) \
        .split('id="diagnosis"')[1]
    assert '<p> <span class="badge" style="background:#1a9850">valid</span></p>' in section
    assert '<code class="code">dtype</code> dtype is float16' in section
    assert "Simulated" not in section and "interference" not in figures(section)


def test_write_report_refuses_to_overwrite_a_file_that_is_not_a_report(tmp_path: Path) -> None:
    other = tmp_path / "notes.html"
    other.write_text("<html>my notes</html>")
    with pytest.raises(InputError, match="exists and is not a mergelens report; refusing to overwrite"):
        report.write_report(make_result(), other)
    assert other.read_text() == "<html>my notes</html>"
    assert list(tmp_path.iterdir()) == [other]  # no temporary file left behind
    report.write_report(make_result(), other, overwrite=True)
    assert report.is_report(other)


def test_write_report_replaces_an_earlier_report(tmp_path: Path) -> None:
    path = report.write_report(make_result(n_models=3), tmp_path / "r.html")
    assert 'id="pairwise"' in path.read_text()
    report.write_report(make_result(n_models=2), path)
    assert 'id="pairwise"' not in path.read_text()


def test_write_report_refuses_a_folder_or_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        report.write_report(make_result(), tmp_path)
    with pytest.raises(InputError, match="does not exist; create it first"):
        report.write_report(make_result(), tmp_path / "missing" / "r.html")


def test_generate_report_checks_the_output_against_allowed_roots_before_any_model(tmp_path: Path) -> None:
    guard = PathGuard([tmp_path / "root"])
    (tmp_path / "root").mkdir()
    with pytest.raises(PathNotAllowedError, match="report output"):
        service.generate_report(["/nowhere/a", "/nowhere/b"], None, tmp_path / "r.html", guard=guard)
    (tmp_path / "root" / "notes.html").write_text("mine")
    with pytest.raises(InputError, match="not a mergelens report"):
        service.generate_report(["/nowhere/a", "/nowhere/b"], None, "notes.html", guard=guard,
                                settings=Settings(allowed_roots=[tmp_path / "root"], include_hf_cache=False))


def test_generate_report_writes_the_report_and_returns_the_result(tiny: Family, tmp_path: Path) -> None:
    settings = Settings(allowed_roots=[tmp_path, tiny.base.parent], include_hf_cache=False)
    models = [str(tiny.finetune_a), str(tiny.flipped)]
    path, result = service.generate_report(models, str(tiny.base), "r.html", settings=settings,
                                           guard=settings.guard())
    assert path == tmp_path.resolve() / "r.html"
    assert result.mci.used_base and result.mci.score is not None
    page = path.read_text()
    assert f'<meta name="mergelens-mci" content="{result.mci.score:.2f}">' in page
    assert list(figures(page)) == ["gauge", "heatmap-finetune_a-flipped", "lines-finetune_a-flipped"]


def test_python_api_generate_report_is_public(tiny: Family, tmp_path: Path) -> None:
    assert "generate_report" in mergelens_mcp.__all__
    path = mergelens_mcp.generate_report([str(tiny.finetune_a), str(tiny.finetune_b)], tmp_path / "api.html")
    assert path == tmp_path / "api.html" and report.is_report(path)


def test_python_api_writes_a_report_from_a_result_already_computed_without_reading_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = make_family(tmp_path / "models", Shape(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32,
                                                     vocab=32))
    result = mergelens_mcp.compare_models([str(family.finetune_a), str(family.flipped)], base=str(family.base))
    shutil.rmtree(tmp_path / "models")  # any read of a checkpoint now fails
    monkeypatch.chdir(tmp_path)
    path = mergelens_mcp.generate_report(compare_result=result, output_path="dashboard.html")
    assert path == tmp_path.resolve() / "dashboard.html" and report.is_report(path)
    assert f'<meta name="mergelens-mci" content="{result.mci.score:.2f}">' in path.read_text()
    again = mergelens_mcp.generate_report(compare_result=result, output=tmp_path / "again.html")
    assert again.read_text() == path.read_text()


def test_python_api_generate_report_says_which_arguments_to_pass(tiny: Family, tmp_path: Path) -> None:
    result = make_result()
    with pytest.raises(TypeError, match="either `models` .* or `compare_result`"):
        mergelens_mcp.generate_report([str(tiny.finetune_a), str(tiny.finetune_b)], compare_result=result,
                                      output_path=tmp_path / "r.html")
    with pytest.raises(TypeError, match="pass `output` or `output_path`"):
        mergelens_mcp.generate_report(compare_result=result)
    with pytest.raises(TypeError, match="pass `output` or `output_path`"):
        mergelens_mcp.generate_report(compare_result=result, output="a.html", output_path="b.html")
    with pytest.raises(TypeError, match="compare_result must be the CompareResult of compare_models"):
        mergelens_mcp.generate_report(compare_result=result.model_dump(), output_path=tmp_path / "r.html")
    with pytest.raises(TypeError, match="needs `models` to compare, or `compare_result`"):
        mergelens_mcp.generate_report(output=tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_cli_compare_with_report_writes_the_report(tiny: Family, tmp_path: Path) -> None:
    out = tmp_path / "cmp.html"
    code = cli.main(["compare", str(tiny.finetune_a), str(tiny.flipped), "--base", str(tiny.base),
                     "--layers", "0", "--report", str(out)])
    assert code == cli.EXIT_OK
    assert report.is_report(out) and 'id="zones"' in out.read_text()


def test_cli_report_writes_the_report_and_refuses_a_foreign_file(tiny: Family, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep.html"
    assert cli.main(["report", str(tiny.finetune_a), str(tiny.finetune_b), "-o", str(out)]) == cli.EXIT_OK
    assert report.is_report(out)
    assert f"report written to {out}" in capsys.readouterr().err.replace("\n", "")
    foreign = tmp_path / "index.html"
    foreign.write_text("keep me")
    code = cli.main(["report", str(tiny.finetune_a), str(tiny.finetune_b), "-o", str(foreign)])
    assert code == cli.EXIT_BAD_INPUT
    assert "not a mergelens report" in capsys.readouterr().err
    assert foreign.read_text() == "keep me"


def test_the_predicted_outcome_per_method_is_shown_with_what_pushed_the_mci_method_up_or_down() -> None:
    from mergelens_mcp.models import MethodPrediction

    result = make_result(seed=3)
    predictions = {
        "linear": MethodPrediction(retention=0.62, low=0.41, high=0.83, used_base=True,
                                   contributions={"first_far": -0.12, "first_averaging_gap": 0.05}),
        "ties": MethodPrediction(retention=0.55, low=0.3, high=0.7, used_base=True),
    }
    mci = result.mci.model_copy(update={"score": 62.0, "method": "linear", "composite": 71.3,
                                        "verdict": Verdict.COMPATIBLE})
    page = without_plotly(report.render_report(result.model_copy(update={"predictions": predictions, "mci": mci})))
    section = page[page.index('id="predictions"'):]
    section = section[:section.index("</section>")]
    assert "<td>linear <strong>(MCI)</strong></td><td>0.62</td><td>0.41-0.83</td>" in section
    assert section.index("linear") < section.index("ties")  # best first
    assert "first_far: -0.120" in section and "first_averaging_gap: +0.050" in section
    assert "fitted on synthetic tasks with tiny Llama-style models" in section
    assert "The MCI is 100 x the predicted retention of linear" in page and "composite, which the layer scores " \
        "use, is 71.3" in page
    assert "(predicted; the layers' weight-space composite: 71.3)" in page  # above the layer figures
    assert 'id="predictions"' not in without_plotly(report.render_report(result))  # none: no section
