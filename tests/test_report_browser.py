"""The report in a real browser: headless Chromium loads it from disk, offline, and draws every plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fixtures import browser
from fixtures.results import make_result
from mergelens_mcp.models import ConfigDiagnosis, Finding, FindingLevel, LayerInterference, MergeMethod, Strategy
from mergelens_mcp.report import write_report

CHROMIUM = browser.find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no Chromium to test the report in: {browser.INSTALL_HINT}"
)

HOSTILE_SOURCE = "<script>document.title='pwned'</script>"
HOSTILE_FINDING = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three candidates (a pairwise matrix and three pairs), a strategy, a config diagnosis, and strings that
    try to run code."""
    finding = Finding(level=FindingLevel.WARNING, code="vocab_mismatch", message=HOSTILE_FINDING,
                      fix="union")
    result = make_result(n_models=3, sources=[HOSTILE_SOURCE, "/models/b", "/models/c"],
                         findings=[finding], extra_tensors={"layers.1": ["model.layers.1.\"quoted\".weight"]})
    yaml = "merge_method: ties\n# </script><script>document.title='pwned'</script>"
    strategy = Strategy(method=MergeMethod.TIES, confidence=0.7, rationale=["signs conflict"],
                        mergekit_yaml=yaml)
    layers = [LayerInterference(layer_name=f"layers.{i}", layer_index=i, n_params=100, interference=v)
              for i, v in enumerate((0.1, 0.7))]
    diagnosis = ConfigDiagnosis(merge_method="ties", valid=True, overall_interference=0.2, findings=[finding],
                                layers=layers)
    path = tmp_path_factory.mktemp("browser") / "report.html"
    return write_report(result.model_copy(update={"strategy": strategy}), path, diagnosis=diagnosis)


@pytest.fixture(scope="module")
def page(report_file: Path) -> browser.Page:
    assert CHROMIUM is not None
    return browser.load(CHROMIUM, report_file)


def test_every_plot_is_drawn(page: browser.Page) -> None:
    assert 'data-plots="9"' in page.dom  # set only once every Plotly.newPlot promise has resolved
    assert len(re.findall(r'class="plot js-plotly-plot"', page.dom)) == 9
    assert 'class="xangularaxistick"' in page.dom  # the gauge's dial
    assert page.dom.count('class="hm"') == 4  # pairwise matrix + one layer x metric heatmap per pair
    assert len(re.findall(r'class="trace scatter ', page.dom)) == 3 * 6  # score + 5 metrics per pair
    assert page.dom.count('class="trace bars"') == 1  # the diagnosis' interference per layer


def test_the_page_logs_nothing_to_the_console(page: browser.Page) -> None:
    assert page.console == []


def test_hostile_strings_stay_text(page: browser.Page) -> None:
    title = re.search(r"<title>(.*?)</title>", page.dom, re.S)
    body = re.search(r"<body([^>]*)>", page.dom)
    assert title is not None and title.group(1) == "MergeLens report: model_a + model_b + model_c"
    assert body is not None and "pwned" not in body.group(1)
    assert "<img" not in page.dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in page.dom
    assert "&lt;img src=x onerror=" in page.dom
    assert 'data-copy="strategy-yaml">Copy YAML</button>' in page.dom


def test_screenshot_of_the_report(report_file: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    png = browser.screenshot(CHROMIUM, report_file, tmp_path / "report.png", size=(1400, 2400))
    assert browser.png_size(png) == (1400, 2400)
    assert png.stat().st_size > 60_000  # a blank or unstyled page compresses to far less
