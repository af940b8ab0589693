"""The interactive HTML report: one self-contained file (Plotly's JavaScript inlined, no CDN, opens offline).

The only module that imports plotly. Every string that came from a file or a user (paths, tensor names, YAML,
finding messages) is HTML-escaped; the figures travel as JSON in ``<script type="application/json">``
blocks with ``<``, ``>`` and ``&`` written as ``\\u003c``/``\\u003e``/``\\u0026``, so no data can close a
script element.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

from .analysis.predict import FEATURES, mci_source
from .analysis.score import CATALOGUE
from .analysis.zones import ZONE_THRESHOLD
from .errors import InputError, MergeLensError
from .models import (
    CompareResult,
    ConfigDiagnosis,
    ConflictZone,
    Finding,
    FindingLevel,
    LayerMetrics,
    PairScore,
    PreviewResult,
    Verdict,
    VerifyResult,
    ZooResult,
)
from .security.paths import open_regular

GENERATOR = "mergelens-mcp"
MARKER = f'<meta name="generator" content="{GENERATOR}">'
MAX_HOVER_TENSORS = 12

# MCI components (1 = good for merging): label, and the raw metrics shown beside the 0..1 value.
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {c.name: (c.label, c.metrics) for c in CATALOGUE}
LINE_METRICS = {
    "cosine_similarity": ("weight cosine", "#1f77b4"),
    "spectral_overlap": ("subspace overlap", "#17becf"),
    "task_cosine": ("task-vector cosine", "#9467bd"),
    "sign_disagreement": ("sign disagreement", "#d62728"),
    "tsv_interference": ("TSV interference", "#ff7f0e"),
}
VERDICT_COLOR = {
    Verdict.HIGHLY_COMPATIBLE: "#1a9850", Verdict.COMPATIBLE: "#66bd63",
    Verdict.RISKY: "#f08c00", Verdict.INCOMPATIBLE: "#d73027",
}
VERDICT_TEXT = {
    Verdict.HIGHLY_COMPATIBLE: "highly compatible", Verdict.COMPATIBLE: "compatible",
    Verdict.RISKY: "risky", Verdict.INCOMPATIBLE: "incompatible",
}
# 0 = bad for merging (red), 1 = good (green), the same in every chart.
GOOD_BAD = [[0.0, "#a50026"], [0.25, "#e34a33"], [0.45, "#fdae61"], [0.6, "#fee08b"], [0.75, "#d9ef8b"],
            [0.9, "#91cf60"], [1.0, "#1a9850"]]
PLOT_CONFIG = {"responsive": True, "displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def esc(value: object) -> str:
    """Text for HTML element content and attribute values."""
    return html.escape(str(value), quote=True)


def plot_text(value: object) -> str:
    """Text for Plotly labels, which read a little HTML: escape only the markup characters (Plotly decodes
    &amp;, &lt; and &gt;, not &quot;)."""
    return html.escape(str(value), quote=False)


def script_json(data: object) -> str:
    """JSON that is safe inside a <script> element: no `</`, `<!--` or `]]>` can appear in it."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def plotly_js() -> str:
    """Plotly's bundled JavaScript, inlined once per report."""
    return plotly.offline.get_plotlyjs().replace("</script", "<\\/script")


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------------- figures


class Figures:
    """Collects figures as (div id, JSON) so that the page can draw them with one loop."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, fig: go.Figure, name: str, height: int, *, modebar: bool = True) -> str:
        div_id = f"fig-{len(self.items)}-{name}"
        fig.update_layout(height=height, font={"family": "system-ui, -apple-system, 'Segoe UI', sans-serif"},
                          paper_bgcolor="rgba(0,0,0,0)")
        spec = fig.to_plotly_json()
        config = {**PLOT_CONFIG, "displayModeBar": "hover" if modebar else False}
        payload = {"data": spec["data"], "layout": spec["layout"], "config": config}
        self.items.append((div_id, json.dumps(payload, cls=PlotlyJSONEncoder, separators=(",", ":"))))
        return f'<div class="plot" id="{div_id}" style="height:{height}px"></div>'

    def scripts(self) -> str:
        return "\n".join(
            f'<script type="application/json" id="{d}-data">{script_json(j)}</script>' for d, j in self.items
        )


def gauge_figure(result: CompareResult) -> go.Figure:
    score, verdict = result.mci.score, result.mci.verdict
    steps = [((0, 35), "#f6c8c2"), ((35, 55), "#fde2b8"), ((55, 75), "#dcefc4"), ((75, 100), "#b9e0b0")]
    fig = go.Figure(go.Indicator(
        mode="gauge+number" if score is not None else "gauge",
        value=score if score is not None else 0.0,
        number={"suffix": "", "valueformat": ".1f", "font": {"size": 46}},
        title={"text": "Merge Compatibility Index", "font": {"size": 15}},
        gauge={
            "axis": {"range": [0, 100], "tickvals": [0, 35, 55, 75, 100]},
            "bar": {"color": VERDICT_COLOR[verdict], "thickness": 0.3},
            "steps": [{"range": list(r), "color": c} for r, c in steps],
            "threshold": {"line": {"color": "#333", "width": 3}, "thickness": 0.8,
                          "value": score if score is not None else 0.0},
        },
    ))
    fig.update_layout(margin={"l": 30, "r": 30, "t": 50, "b": 10})
    return fig


def _tensor_lines(names: Sequence[str]) -> str:
    shown = [plot_text(n) for n in names[:MAX_HOVER_TENSORS]]
    more = len(names) - len(shown)
    tail = [f"... and {more} more"] if more > 0 else []
    return "<br>".join(["<b>tensors:</b>", *(f"  {n}" for n in shown), *tail])


def heatmap_figure(layers: list[LayerMetrics]) -> go.Figure:
    """Rows: layer score then MCI components, all 0..1 with 1 = good; columns: layers in depth order."""
    present = [c for c in COMPONENTS if any(c in lm.components for lm in layers)]
    extra = sorted({c for lm in layers for c in lm.components} - set(COMPONENTS))
    rows = [*present, *extra]
    x = [plot_text(lm.layer_name) for lm in layers]
    y = ["layer score", *(COMPONENTS[c][0] if c in COMPONENTS else plot_text(c) for c in rows)]
    z: list[list[float | None]] = [[round(lm.score / 100.0, 4) for lm in layers]]
    hover: list[list[str]] = [[
        f"<b>{plot_text(lm.layer_name)}</b>: layer score {lm.score:.1f} / 100<br>"
        + _tensor_lines(lm.tensor_names)
        for lm in layers
    ]]
    for comp in rows:
        label, raws = COMPONENTS.get(comp, (comp, ()))
        z_row: list[float | None] = []
        h_row: list[str] = []
        for lm in layers:
            value = lm.components.get(comp)
            z_row.append(None if value is None else round(value, 4))
            raw = "<br>".join(f"{plot_text(m)} = {lm.metrics[m]:.4f}" for m in raws if m in lm.metrics)
            h_row.append(
                f"<b>{plot_text(lm.layer_name)}</b> · {plot_text(label)}<br>"
                f"score {fmt(value)} (0 = bad, 1 = good for merging)<br>"
                + (f"{raw}<br>" if raw else "") + _tensor_lines(lm.tensor_names)
            )
        z.append(z_row)
        hover.append(h_row)
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
        colorscale=GOOD_BAD, zmin=0.0, zmax=1.0, xgap=1, ygap=1, hoverongaps=False,
        colorbar={"title": {"text": "good for<br>merging", "side": "top"}, "tickvals": [0, 0.5, 1],
                  "ticktext": ["0 bad", "0.5", "1 good"], "thickness": 12, "len": 0.9},
    ))
    fig.update_layout(margin={"l": 170, "r": 20, "t": 10, "b": 60}, plot_bgcolor="#eeeeee",
                      hoverlabel={"align": "left"})
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    fig.update_xaxes(type="category", tickangle=-45 if len(layers) > 12 else 0, showgrid=False)
    return fig


def lines_figure(layers: list[LayerMetrics], zones: list[ConflictZone]) -> go.Figure:
    """Top: layer score 0-100 with the zone threshold; bottom: the main raw metrics; zones shaded in both."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.45, 0.55],
                        subplot_titles=("layer score (0-100)", "main metrics (raw values)"))
    x = [plot_text(lm.layer_name) for lm in layers]
    tensors = [_tensor_lines(lm.tensor_names) for lm in layers]
    fig.add_trace(go.Scatter(
        x=x, y=[lm.score for lm in layers], mode="lines+markers", name="layer score",
        line={"color": "#333333", "width": 2},
        marker={"color": [lm.score for lm in layers], "colorscale": GOOD_BAD, "cmin": 0, "cmax": 100,
                "size": 8, "line": {"color": "#333", "width": 1}},
        customdata=tensors, hovertemplate="<b>%{x}</b>: layer score %{y:.1f}<br>%{customdata}<extra></extra>",
    ), row=1, col=1)
    fig.add_hline(y=ZONE_THRESHOLD, line={"dash": "dot", "color": "#999", "width": 1}, row=1, col=1,
                  annotation_text=f"zone threshold {ZONE_THRESHOLD:.0f}", annotation_position="bottom right",
                  annotation_font={"size": 10, "color": "#777"})
    for metric, (label, color) in LINE_METRICS.items():
        if not any(metric in lm.metrics for lm in layers):
            continue
        fig.add_trace(go.Scatter(
            x=x, y=[lm.metrics.get(metric) for lm in layers], mode="lines+markers", name=label,
            line={"color": color, "width": 1.6}, marker={"size": 5}, connectgaps=False,
            hovertemplate=f"<b>%{{x}}</b>: {plot_text(metric)} = %{{y:.4f}}<extra>{label}</extra>",
        ), row=2, col=1)
    index = {lm.layer_name: i for i, lm in enumerate(layers)}
    for zone in zones:
        spots = [index[n] for n in zone.layer_names if n in index]
        if not spots:
            continue
        for yref in ("y domain", "y2 domain"):
            fig.add_shape(type="rect", xref="x", yref=yref, x0=min(spots) - 0.5, x1=max(spots) + 0.5,
                          y0=0, y1=1, fillcolor="#d73027", opacity=0.13, line={"width": 0}, layer="below")
        fig.add_annotation(x=(min(spots) + max(spots)) / 2, xref="x", y=0.02, yref="y domain",
                           yanchor="bottom", text=f"{zone.severity.value} zone", showarrow=False,
                           font={"size": 11, "color": "#b2182b"})
    fig.update_yaxes(range=[-4, 106], row=1, col=1)
    fig.update_yaxes(range=[-1.05, 1.05], zeroline=True, zerolinecolor="#bbb", row=2, col=1)
    fig.update_xaxes(type="category", tickangle=-45 if len(layers) > 12 else 0)
    fig.update_layout(margin={"l": 50, "r": 20, "t": 30, "b": 60}, plot_bgcolor="#fafafa",
                      hovermode="closest", hoverlabel={"align": "left"},
                      legend={"orientation": "h", "y": -0.18, "x": 0, "font": {"size": 11}})
    return fig


def pairwise_figure(result: CompareResult) -> go.Figure:
    labels = [m.label for m in result.models]
    sources = {m.label: m.source for m in result.models}
    scores = {(p.model_a, p.model_b): p for p in result.pairwise}
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    hover: list[list[str]] = []
    for a in labels:
        z_row, t_row, h_row = [], [], []
        for b in labels:
            pair = scores.get((a, b)) or scores.get((b, a))
            value = 100.0 if a == b else (pair.score if pair else None)
            z_row.append(None if a == b else value)
            t_row.append("" if a == b else fmt(value, 1))
            what = "same model" if a == b else (VERDICT_TEXT[pair.verdict] if pair else "not compared")
            h_row.append(f"<b>{a} + {b}</b>: MCI {fmt(value, 1)} ({what})<br>"
                         f"{a}: {plot_text(sources[a])}<br>{b}: {plot_text(sources[b])}")
        z.append(z_row)
        text.append(t_row)
        hover.append(h_row)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, text=text, texttemplate="%{text}", textfont={"size": 14},
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", colorscale=GOOD_BAD, zmin=0, zmax=100,
        xgap=2, ygap=2, hoverongaps=False, colorbar={"title": {"text": "MCI"}, "thickness": 12},
    ))
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    fig.update_xaxes(type="category", side="top", showgrid=False)
    fig.update_layout(margin={"l": 80, "r": 20, "t": 40, "b": 10}, plot_bgcolor="#eeeeee",
                      hoverlabel={"align": "left"})
    return fig


# ---------------------------------------------------------------------------------------------------- words


ADVICE_HEAD = {
    Verdict.HIGHLY_COMPATIBLE: "Merge: these models share an origin and agree almost everywhere "
    "(MCI {score}, {zones}).",
    Verdict.COMPATIBLE: "Merge with care: the models are compatible overall (MCI {score}) with {zones}; "
    "follow the zone recommendations below for those layers.",
    Verdict.RISKY: "Risky: merge only with a conflict-resolving method and evaluate the result (MCI {score}, "
    "{zones}); consider taking the conflicting layers from one model.",
    Verdict.INCOMPATIBLE: "Do not merge: the models are not compatible (MCI {score}, {zones}); they most "
    "likely do not share a base model, or their fine-tunes pull in opposite directions.",
}
HOW_WITH_BASE = (" A task-vector method (ties or dare_ties against the base) keeps both fine-tunes' changes "
                 "and resolves their sign conflicts.")
HOW_WITHOUT_BASE = (" Without a base only weight similarity was measured: linear or slerp averaging is the "
                    "simple option; pass the base model to also check whether the fine-tunes conflict.")


def summary_paragraph(result: CompareResult) -> str:
    """One paragraph, in plain words: whether to merge and how."""
    mci, zones, strategy = result.mci, result.conflict_zones, result.strategy
    if mci.score is None:
        why = mci.reasons[0] if mci.reasons else "the checkpoints could not be compared"
        return f"Do not merge these models: they cannot be compared tensor by tensor ({why})."
    many = len(result.pairwise) > 1
    zone_words = "no conflict zones"
    if zones:
        spans = ", ".join(_span(z, many) for z in zones[:4]) + (", ..." if len(zones) > 4 else "")
        zone_words = f"{len(zones)} conflict zone{'s' if len(zones) > 1 else ''} ({spans})"
    text = ADVICE_HEAD[mci.verdict].format(score=fmt(mci.score, 1), zones=zone_words)
    if many:
        worst = _ordered_pairs(result)[0]
        text += (f" The weakest pair is {worst.model_a} + {worst.model_b} ({fmt(worst.score, 1)}); a merge "
                 "of all the models is only as safe as that pair.")
    source = mci_source(result)
    if source is not None and mci.composite is not None:
        text += (f" The MCI is {source} (the predictor is fitted on synthetic tasks with tiny Llama-style models); "
                 f"the weight-space composite, which the layer scores use, is {fmt(mci.composite, 1)}.")
    if mci.verdict is Verdict.INCOMPATIBLE:
        return text
    if strategy is not None:
        return text + (f" Recommended method: {strategy.method.value} "
                       f"(confidence {strategy.confidence:.2f}); the mergekit configuration below is a "
                       "starting point.")
    return text + (HOW_WITH_BASE if mci.used_base else HOW_WITHOUT_BASE)


def _span(zone: ConflictZone, many: bool) -> str:
    names = zone.layer_names
    span = names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"
    return f"{span} of {zone.model_a} + {zone.model_b}" if many else span


# ---------------------------------------------------------------------------------------------------- html


def render_report(
    result: CompareResult, *, diagnosis: ConfigDiagnosis | None = None, preview: PreviewResult | None = None,
    verify: VerifyResult | None = None,
) -> str:
    """The whole report as one HTML document (about 5 MB: Plotly's JavaScript is inlined)."""
    figures = Figures()
    mci = result.mci
    title = "MergeLens report: " + " + ".join(m.label for m in result.models)
    body = [
        _header(result),
        _summary(result, figures),
        _predictions(result),
        _strategy(result),
        _zones(result),
        _findings(result),
        _diagnosis(diagnosis, figures),
        _preview(preview, figures),
        _verify(verify, figures),
        _pairwise(result, figures),
        *_pairs(result, figures),
        _models(result),
        _footer(result),
    ]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        MARKER,
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="mergelens-mci" content="{esc(fmt(mci.score, 2))}">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{plotly_js()}</script>",
        "</head><body><main>",
        *[part for part in body if part],
        "</main>",
        figures.scripts(),
        f"<script>{_draw_js()}</script>",
        "</body></html>",
    ])


def _header(result: CompareResult) -> str:
    names = " + ".join(f"<code>{esc(Path(m.source).name or m.source)}</code>" for m in result.models)
    base = f' against base <code>{esc(Path(result.base.source).name or result.base.source)}</code>' \
        if result.base else ""
    return f'<header><h1>Should I merge these models?</h1><p class="sub">{names}{base}</p></header>'


def _summary(result: CompareResult, figures: Figures) -> str:
    mci = result.mci
    color = VERDICT_COLOR[mci.verdict]
    score = "n/a" if mci.score is None else f"{mci.score:.1f} / 100"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in mci.reasons)
    return (
        '<section class="card summary" id="summary">'
        f'<div class="gauge">{figures.add(gauge_figure(result), "gauge", 250, modebar=False)}</div>'
        '<div class="verdict">'
        f'<p><span class="badge big" style="background:{color}">{esc(VERDICT_TEXT[mci.verdict])}</span> '
        f'<span class="score">MCI {esc(score)}</span> '
        f'<span class="muted">confidence: {esc(mci.confidence)}</span></p>'
        f'<p class="advice">{esc(summary_paragraph(result))}</p>'
        f'<ul class="reasons">{reasons}</ul>'
        "</div></section>"
    )


def _models(result: CompareResult) -> str:
    rows = [*result.models, *([result.base] if result.base else [])]
    body = "".join(
        f"<tr><td>{esc(m.label)}</td><td class='path'>{esc(m.source)}</td>"
        f"<td>{esc(m.architecture or '?')}</td>"
        f"<td class='num'>{m.n_params:,}</td><td class='num'>{m.n_tensors:,}</td>"
        f"<td>{esc(', '.join(f'{k}×{v}' for k, v in sorted(m.dtypes.items())))}</td></tr>"
        for m in rows
    )
    cov = result.coverage
    return (
        '<section class="card" id="models"><h2>Models</h2>'
        "<table><thead><tr><th>label</th><th>source</th><th>architecture</th><th>parameters</th><th>tensors</th>"
        f"<th>dtypes</th></tr></thead><tbody>{body}</tbody></table>"
        f'<p class="muted">{cov.tensors_compared:,} of {cov.tensors_total:,} tensors compared '
        f"({cov.params_compared:,} parameters) on {esc(result.device)} in {result.elapsed_s:.1f} s.</p>"
        "</section>"
    )


def _finding_items(findings: Iterable[Finding]) -> str:
    items = []
    for f in findings:
        level = f.level.value
        items.append(
            f'<li class="finding {esc(level)}"><span class="badge lvl-{esc(level)}">{esc(level)}</span> '
            f'<code class="code">{esc(f.code)}</code> {esc(f.message)}'
            + (f' <span class="muted">at <code>{esc(f.path)}</code></span>' if f.path else "")
            + (f'<div class="fix">fix: {esc(f.fix)}</div>' if f.fix else "")
            + "</li>"
        )
    return "".join(items)


def _findings(result: CompareResult) -> str:
    order = {FindingLevel.ERROR: 0, FindingLevel.WARNING: 1, FindingLevel.INFO: 2}
    findings = sorted(result.findings, key=lambda f: order[f.level])
    items = _finding_items(findings) or '<li class="finding ok">No compatibility problems found: same ' \
        "architecture, vocabulary and tensors.</li>"
    notes = "".join(f'<li class="note">{esc(n)}</li>' for n in result.notes)
    notes_html = f'<h3>Notes</h3><ul class="findings">{notes}</ul>' if notes else ""
    return (f'<section class="card" id="findings"><h2>Compatibility findings</h2>'
            f'<ul class="findings">{items}</ul>{notes_html}</section>')


def _predictions(result: CompareResult) -> str:
    """The predicted retention per method (the MCI's method marked), and what pushed that one up or down."""
    if not result.predictions:
        return ""
    method = result.mci.method
    rows = "".join(
        f"<tr><td>{esc(m)}{' <strong>(MCI)</strong>' if m == method else ''}</td><td>{p.retention:.2f}</td>"
        f"<td>{p.low:.2f}-{p.high:.2f}</td></tr>"
        for m, p in sorted(result.predictions.items(), key=lambda kv: -kv[1].retention)
    )
    pushes = ""
    if method in result.predictions:
        items = "".join(
            f"<li>{esc(f)}: {v:+.3f}{' - ' + esc(FEATURES[f].meaning) if f in FEATURES else ''}</li>"
            for f, v in result.predictions[method].contributions.items()
        )
        pushes = (f"<p>What pushed {esc(method)}'s prediction up (+) or down (-) against the fit's average "
                  f"pair, in retention:</p><ul class=\"reasons\">{items}</ul>")
    basis = "with task-vector evidence (the base)" if next(iter(result.predictions.values())).used_base else \
        "from weight-space evidence alone (no base: wider intervals)"
    return (
        '<section class="card" id="predictions"><h2>Predicted outcome per merge method</h2>'
        f'<p class="muted">Expected share of each model\'s own accuracy the merge keeps (0..1) with its 80% '
        f"interval, {basis}; fitted on synthetic tasks with tiny Llama-style models, a yardstick rather than a "
        "measurement of this merge.</p>"
        f'<table><tr><th>method</th><th>retention</th><th>80% interval</th></tr>{rows}</table>{pushes}</section>'
    )


def _strategy(result: CompareResult) -> str:
    s = result.strategy
    if s is None:
        return ""
    rationale = "".join(f"<li>{esc(r)}</li>" for r in s.rationale)
    warnings = "".join(f'<li class="finding warning">{esc(w)}</li>' for w in s.warnings)
    runner = f' <span class="muted">runner-up: {esc(s.runner_up.value)}</span>' if s.runner_up else ""
    params = ", ".join(f"{esc(k)}={esc(v)}" for k, v in s.parameters.items())
    return (
        '<section class="card" id="strategy"><h2>Recommended merge</h2>'
        f'<p><span class="badge method">{esc(s.method.value)}</span> '
        f"confidence {s.confidence:.2f}{runner}</p>"
        + (f'<p class="muted">parameters: {params}</p>' if params else "")
        + f'<ul class="reasons">{rationale}</ul>'
        + (f'<ul class="findings">{warnings}</ul>' if warnings else "")
        + '<div class="yaml-head"><span>mergekit configuration</span>'
        '<button type="button" class="copy" data-copy="strategy-yaml">Copy YAML</button></div>'
        f'<pre class="yaml"><code id="strategy-yaml">{esc(s.mergekit_yaml)}</code></pre></section>'
    )


def interference_figure(scores: Mapping[str, float]) -> go.Figure:
    """Per-layer interference of a configured merge: 0 = nothing lost, 1 = the models cancel out."""
    names, values = [plot_text(n) for n in scores], [float(v) for v in scores.values()]
    colors = sample_colorscale(GOOD_BAD, [1.0 - min(1.0, max(0.0, v)) for v in values])
    fig = go.Figure(go.Bar(
        x=names, y=values, marker={"color": colors, "line": {"width": 0}},
        hovertemplate="<b>%{x}</b>: interference %{y:.4f}<extra></extra>",
    ))
    fig.update_yaxes(range=[0, 1], title={"text": "interference"})
    fig.update_xaxes(type="category", tickangle=-45 if len(names) > 12 else 0)
    fig.update_layout(margin={"l": 60, "r": 20, "t": 10, "b": 60}, plot_bgcolor="#fafafa", bargap=0.15)
    return fig


def _diagnosis(diagnosis: ConfigDiagnosis | None, figures: Figures) -> str:
    """A mergekit config diagnosis: method and validity, simulated interference overall and per layer (when the
    models could be read), the models read, findings and notes."""
    if diagnosis is None:
        return ""
    parts = ['<section class="card" id="diagnosis"><h2>Merge configuration diagnosis</h2>']
    state = (' <span class="badge" style="background:#1a9850">valid</span>' if diagnosis.valid
             else ' <span class="badge lvl-error">will not run</span>')
    method = diagnosis.merge_method
    badge = f'<span class="badge method">{esc(method)}</span>' if method else ""
    parts.append(f"<p>{badge}{state}</p>")
    if diagnosis.overall_interference is not None:
        parts.append(f"<p>Simulated interference of this configuration: <b>{diagnosis.overall_interference:.3f}"
                     '</b> <span class="muted">(0 = nothing lost, 1 = the models cancel out)</span></p>')
    if diagnosis.models_checked:
        read = ", ".join(f"<code>{esc(m)}</code>" for m in diagnosis.models_checked)
        parts.append(f'<p class="muted">Simulated on the weights of {read}.</p>')
    items = _finding_items(diagnosis.findings)
    items = items or '<li class="finding ok">No problems found in the configuration.</li>'
    parts.append(f'<ul class="findings">{items}</ul>')
    notes = "".join(f'<li class="note">{esc(n)}</li>' for n in diagnosis.notes)
    if notes:
        parts.append(f'<ul class="findings">{notes}</ul>')
    if diagnosis.layers:
        scores = {layer.layer_name: layer.interference for layer in diagnosis.layers}
        parts.append("<h3>Interference per layer</h3>"
                     + figures.add(interference_figure(scores), "interference", 300))
    parts.append("</section>")
    return "".join(parts)


def retention_figure(preview: PreviewResult) -> go.Figure:
    """Per candidate merge, each source's retention on its probes (1 = its behaviour kept)."""
    fig = go.Figure()
    sources = [s.source for s in preview.methods[0].sources] if preview.methods else []
    for k, source in enumerate(sources):
        values = [next((s.retention for s in m.sources if s.source == source), None) for m in preview.methods]
        fig.add_trace(go.Bar(x=[plot_text(m.method) for m in preview.methods], y=values, name=plot_text(source),
                             hovertemplate=f"<b>%{{x}}</b> {plot_text(source)}: retention %{{y:.4f}}<extra></extra>",
                             marker={"color": ["#4575b4", "#d73027", "#1a9850", "#984ea3"][k % 4]}))
    fig.update_yaxes(title={"text": "retention"})
    fig.update_layout(barmode="group", margin={"l": 60, "r": 20, "t": 10, "b": 40}, plot_bgcolor="#fafafa")
    return fig


def _preview(preview: PreviewResult | None, figures: Figures) -> str:
    """Candidate merges measured on probe inputs: the ranking, per-source retention and the measures."""
    if preview is None:
        return ""
    parts = ['<section class="card" id="preview"><h2>Preview: candidate merges on probe inputs</h2>',
             f"<p>{preview.probes} probes ({esc(preview.probe_set)}), measured as a {esc(preview.kind)}; best: "
             f'<span class="badge method">{esc(preview.best)}</span></p>']
    rows = []
    for m in preview.methods:
        cells = "".join(
            f"<td>{fmt(s.retention, 4)}"
            + (f' <span class="muted">KL {fmt(s.kl, 4)}, agree {fmt(s.agreement, 3)}, ppl {fmt(s.perplexity, 4)}'
               "</span>" if s.kl is not None else
               f' <span class="muted">embedding cos {fmt(s.embedding_similarity, 4)}</span>')
            + "</td>" for s in m.sources)
        rows.append(f"<tr><td>{m.rank}</td><td>{esc(m.method)}</td><td>{fmt(m.retention, 4)}</td>{cells}</tr>")
    heads = "".join(f"<th>{esc(s.source)}</th>" for s in (preview.methods[0].sources if preview.methods else []))
    parts.append(f"<table><tr><th>rank</th><th>method</th><th>retention</th>{heads}</tr>{''.join(rows)}</table>")
    if preview.methods:
        parts.append(figures.add(retention_figure(preview), "preview", 280))
    parts.extend(f'<p class="muted">{esc(n)}</p>' for n in preview.notes)
    parts.append("</section>")
    return "".join(parts)


def coefficients_figure(verify: VerifyResult) -> go.Figure:
    """Per layer of a written merge, each source's coefficient in merged - base and the unexplained share."""
    names = [plot_text(lm.layer_name) for lm in verify.layers]
    fig = go.Figure()
    for source in verify.layers[0].coefficients if verify.layers else []:
        fig.add_trace(go.Scatter(x=names, y=[lm.coefficients[source] for lm in verify.layers], mode="lines+markers",
                                 name=plot_text(source)))
    fig.add_trace(go.Bar(x=names, y=[lm.residual for lm in verify.layers], name="unexplained",
                         marker={"color": "#fdae61"}, opacity=0.6))
    fig.update_xaxes(type="category", tickangle=-45 if len(names) > 12 else 0)
    fig.update_layout(margin={"l": 60, "r": 20, "t": 10, "b": 60}, plot_bgcolor="#fafafa")
    return fig


def _verify(verify: VerifyResult | None, figures: Figures) -> str:
    """A written merge checked: verdict, reasons, next steps, findings, per-layer coefficients, behaviour."""
    if verify is None:
        return ""
    color = {"ok": "#1a9850", "warning": "#fdae61", "failed": "#a50026"}.get(verify.verdict, "#777")
    parts = ['<section class="card" id="verify"><h2>Verification of the merged model</h2>',
             f'<p><span class="badge" style="background:{color}">{esc(verify.verdict)}</span> '
             f"<code>{esc(verify.merged)}</code></p>",
             '<ul class="findings">' + "".join(f'<li class="note">{esc(r)}</li>' for r in verify.reasons)
             + "".join(f'<li class="note">try: {esc(t)}</li>' for t in verify.next_steps) + "</ul>"]
    items = _finding_items(verify.findings)
    if items:
        parts.append(f'<ul class="findings">{items}</ul>')
    if verify.layers:
        parts.append("<h3>Each source's share per layer</h3>" + figures.add(coefficients_figure(verify), "verify", 300))
    if verify.behaviour:
        rows = "".join(f"<tr><td>{esc(s.source)}</td><td>{fmt(s.retention, 4)}</td><td>{fmt(s.perplexity, 4)}</td>"
                       f"<td>{fmt(s.best_source_perplexity, 4)}</td></tr>" for s in verify.behaviour)
        parts.append("<h3>Each source vs merged, on the probes</h3><table><tr><th>source</th><th>retention</th>"
                     f"<th>merged perplexity</th><th>best source perplexity</th></tr>{rows}</table>")
    parts.append("</section>")
    return "".join(parts)


def _pairwise(result: CompareResult, figures: Figures) -> str:
    if len(result.models) < 3:
        return ""
    size = 140 + 70 * len(result.models)
    rows = []
    for pair in _ordered_pairs(result):
        zones = sum((z.model_a, z.model_b) == (pair.model_a, pair.model_b) for z in result.conflict_zones)
        link = f'<a href="#{esc(_pair_id(pair))}">{esc(pair.model_a)} + {esc(pair.model_b)}</a>'
        badge = (f'<span class="badge" style="background:{VERDICT_COLOR[pair.verdict]}">'
                 f"{esc(VERDICT_TEXT[pair.verdict])}</span>")
        rows.append(f'<tr><td class="nowrap">{link}</td><td class="num">{esc(fmt(pair.score, 1))}</td>'
                    f'<td>{badge}</td><td class="num">{zones}</td></tr>')
    plot = figures.add(pairwise_figure(result), "pairwise", size, modebar=False)
    return ('<section class="card" id="pairwise"><h2>Pairwise MCI</h2>'
            '<p class="muted">Every pair of candidates, weakest first; a merge of all of them is as risky as '
            "its weakest pair.</p>"
            f'<div class="pairgrid"><div>{plot}</div>'
            "<table><thead><tr><th>pair</th><th>MCI</th><th>verdict</th><th>zones</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _pair_id(pair: PairScore) -> str:
    return f"pair-{pair.model_a}-{pair.model_b}"


def _ordered_pairs(result: CompareResult) -> list[PairScore]:
    return sorted(result.pairwise, key=lambda p: p.score if p.score is not None else -1.0)


def _pairs(result: CompareResult, figures: Figures) -> list[str]:
    sections = []
    many = len(result.pairwise) > 1
    for n, pair in enumerate(_ordered_pairs(result)):
        key = (pair.model_a, pair.model_b)
        layers = [lm for lm in result.layer_metrics if (lm.model_a, lm.model_b) == key]
        zones = [z for z in result.conflict_zones if (z.model_a, z.model_b) == key]
        name = f"{pair.model_a} + {pair.model_b}"
        color = VERDICT_COLOR[pair.verdict]
        head = (f'<h2>Layers{": " + esc(name) if many else ""} '
                f'<span class="badge" style="background:{color}">{esc(VERDICT_TEXT[pair.verdict])} '
                f"{esc(fmt(pair.score, 1))}</span>"
                + (' <span class="muted">(weakest pair)</span>' if many and n == 0 else "")
                + (f' <span class="muted">(predicted; the layers\' weight-space composite: '
                   f"{esc(fmt(result.mci.composite, 1))})</span>" if not many and result.mci.method else "")
                + "</h2>")
        if not layers:
            sections.append(f'<section class="card pair">{head}<p>No layers could be compared.</p></section>')
            continue
        heat_h = 90 + 26 * (1 + len({c for lm in layers for c in lm.components}))
        tag = f"{pair.model_a}-{pair.model_b}"
        sections.append(
            f'<section class="card pair" id="{esc(_pair_id(pair))}">{head}'
            '<h3>Layer × metric</h3><p class="muted">Every row is scaled so that red is bad for merging and '
            "green is good; hover a cell for the raw metric values and the tensors behind it.</p>"
            f"{figures.add(heatmap_figure(layers), 'heatmap-' + tag, heat_h)}"
            '<h3>Per-layer metrics</h3><p class="muted">Conflict zones are shaded red.</p>'
            f"{figures.add(lines_figure(layers, zones), 'lines-' + tag, 520)}</section>"
        )
    return sections


def _zones(result: CompareResult) -> str:
    if not result.conflict_zones:
        return ('<section class="card" id="zones"><h2>Conflict zones</h2>'
                "<p>No conflict zones: no run of layers scores below the threshold.</p></section>")
    many = len(result.pairwise) > 1
    rows = "".join(
        "<tr>"
        + (f"<td class='nowrap'>{esc(z.model_a)} + {esc(z.model_b)}</td>" if many else "")
        + f"<td class='nowrap'>{esc(_span(z, False))}</td>"
        f'<td><span class="badge sev-{esc(z.severity.value)}">{esc(z.severity.value)}</span></td>'
        f"<td class='num'>{z.score:.1f}</td><td>{esc(', '.join(z.driving_metrics))}</td>"
        f"<td class='rec'>{esc(z.recommendation)}</td></tr>"
        for z in sorted(result.conflict_zones, key=lambda z: z.score)
    )
    pair_head = "<th>pair</th>" if many else ""
    return ('<section class="card" id="zones"><h2>Conflict zones</h2>'
            f"<table class='zones'><thead><tr>{pair_head}<th>layers</th><th>severity</th><th>score</th>"
            f"<th>driven by</th><th>recommendation</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _footer(result: CompareResult) -> str:
    return (f"<footer>Generated by mergelens-mcp {esc(result.version)}. MCI: 0-100, higher is safer to "
            "merge; verdicts: ≥75 highly compatible, ≥55 compatible, ≥35 risky, below incompatible.</footer>")


def _draw_js() -> str:
    """Draw every figure from its JSON block; when all are drawn, <html data-plots="N"> says how many."""
    return """(function () {
  var root = document.documentElement, divs = document.querySelectorAll("div.plot"), drawn = [];
  divs.forEach(function (div) {
    var spec = JSON.parse(document.getElementById(div.id + "-data").textContent);
    drawn.push(Plotly.newPlot(div, spec.data, spec.layout, spec.config));
  });
  Promise.all(drawn).then(function () { root.setAttribute("data-plots", String(drawn.length)); },
                          function (err) { console.error("mergelens: a plot failed: " + err); });
  document.querySelectorAll("button.copy").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var text = document.getElementById(btn.dataset.copy).textContent;
      var done = function () {
        btn.textContent = "Copied";
        setTimeout(function () { btn.textContent = "Copy YAML"; }, 1500);
      };
      var fallback = function () {
        var area = document.createElement("textarea");
        area.value = text;
        document.body.appendChild(area);
        area.select();
        try { document.execCommand("copy"); done(); } catch (e) { /* nothing more to try */ }
        area.remove();
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, fallback);
      } else { fallback(); }
    });
  });
})();"""


CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2328;
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px 20px 40px}
header h1{margin:0 0 4px;font-size:26px;font-weight:650}
.sub{margin:0 0 16px;color:#57606a;word-break:break-all}
h2{font-size:19px;margin:0 0 12px;font-weight:620}
h3{font-size:15px;margin:18px 0 2px;font-weight:600}
.card{background:#fff;border:1px solid #d8dee4;border-radius:10px;padding:18px 22px;margin:0 0 18px;
box-shadow:0 1px 2px rgba(0,0,0,.04)}
.summary{display:grid;grid-template-columns:minmax(260px,360px) 1fr;gap:24px;align-items:center}
@media (max-width:820px){.summary{grid-template-columns:1fr}}
.verdict p{margin:0 0 10px}
.advice{font-size:16.5px;line-height:1.55}
.score{font-size:20px;font-weight:650;margin:0 8px}
.muted{color:#6e7781;font-size:13px}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;color:#fff;font-size:12.5px;font-weight:600;
vertical-align:middle;background:#6e7781}
.badge.big{font-size:15px;padding:4px 14px}
.badge.method{background:#0969da;font-size:14px}
.lvl-error,.sev-critical{background:#b2182b}.lvl-warning,.sev-high{background:#e34a33}
.sev-medium{background:#f08c00}.lvl-info,.sev-low{background:#6e7781}
.reasons{margin:0;padding-left:20px;color:#424a53}
ul.findings{list-style:none;margin:0;padding:0}
.finding{padding:8px 10px;border-left:4px solid #d0d7de;margin:0 0 6px;background:#f6f8fa;
border-radius:0 6px 6px 0}
.finding.error{border-color:#b2182b;background:#fdf0ee}.finding.warning{border-color:#f08c00;background:#fff8eb}
.finding.ok{border-color:#1a9850;background:#eef8f0}
.note{padding:4px 0;color:#57606a}
.fix{color:#424a53;font-size:13.5px;margin-top:3px}
code{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eff1f3;padding:1px 5px;
border-radius:4px}
.code{color:#57606a}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:7px 10px;border-bottom:1px solid #e4e8ec;vertical-align:top}
th{background:#f6f8fa;font-weight:600;font-size:13px;color:#424a53}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.path{word-break:break-all;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
td.rec{min-width:320px}
.nowrap{white-space:nowrap}
.yaml-head{display:flex;justify-content:space-between;align-items:center;margin:14px 0 6px;font-weight:600}
button.copy{font:inherit;font-size:13px;padding:4px 12px;border:1px solid #d0d7de;border-radius:6px;
background:#f6f8fa;cursor:pointer}
button.copy:hover{background:#eaeef2}
pre.yaml{margin:0;background:#0d1117;color:#e6edf3;padding:14px 16px;border-radius:8px;overflow:auto}
pre.yaml code{background:none;color:inherit;padding:0;font-size:13px}
.pairgrid{display:grid;grid-template-columns:minmax(300px,560px) 1fr;gap:28px;align-items:start}
@media (max-width:900px){.pairgrid{grid-template-columns:1fr}}
a{color:#0969da;text-decoration:none}
a:hover{text-decoration:underline}
footer{color:#6e7781;font-size:12.5px;text-align:center;margin-top:8px}
"""


# ---------------------------------------------------------------------------------------------------- files


def is_report(path: Path) -> bool:
    """True when `path` is a report this module wrote (its head carries our generator marker)."""
    try:
        with open_regular(path, "report output") as fh:  # never blocks on a FIFO or reads a device
            head = fh.read(4096)
    except (OSError, MergeLensError):
        return False
    return MARKER.encode() in head


def check_output(path: Path, *, overwrite: bool = False) -> Path:
    """Refuse an output path we should not write: a folder, a missing folder, or someone else's file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"report output {str(path)!r} is a folder; give a file name such as report.html")
    if not path.parent.is_dir():
        raise InputError(
            f"report output {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first"
        )
    if path.exists() and not overwrite and not is_report(path):
        raise InputError(
            f"report output {str(path)!r} exists and is not a mergelens report; refusing to overwrite it "
            "(choose another file name, or pass overwrite=True / --overwrite)"
        )
    return path


def write_report(
    result: CompareResult, path: Path, *, overwrite: bool = False, diagnosis: ConfigDiagnosis | None = None,
    preview: PreviewResult | None = None, verify: VerifyResult | None = None,
) -> Path:
    """Write the report to `path` (atomically) and return it. Replaces an earlier mergelens report without
    asking; any other existing file only with ``overwrite=True``."""
    path = check_output(Path(path), overwrite=overwrite)
    return _write_html(render_report(result, diagnosis=diagnosis, preview=preview, verify=verify), path)


def _write_html(text: str, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".mergelens-", suffix=".html.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- the zoo view (issue 16) -----------------------------------------------------------------------------------


def zoo_matrix_figure(result: ZooResult) -> go.Figure:
    """Every pair's estimated MCI, the models ordered group by group (compatible groups first)."""
    order = list(dict.fromkeys([*(m for g in result.clusters for m in g), *(m.label for m in result.models)]))
    index = {label: i for i, label in enumerate(order)}
    z: list[list[float | None]] = [[100.0 if a == b else None for b in order] for a in order]
    hover = [["" for _ in order] for _ in order]
    for p in result.pairs:
        i, j = index[p.model_a], index[p.model_b]
        z[i][j] = z[j][i] = p.mci
        text = (f"{plot_text(p.model_a)} + {plot_text(p.model_b)}<br>MCI {p.mci:.1f} "
                f"({p.mci_low:.1f} to {p.mci_high:.1f})<br>{VERDICT_TEXT.get(p.verdict, p.verdict.value)}")
        hover[i][j] = hover[j][i] = text
    labels = [plot_text(m) for m in order]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, zmin=0, zmax=100, colorscale=GOOD_BAD, text=hover,
                               hoverinfo="text", colorbar={"title": "MCI"}))
    fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis={"autorange": "reversed"},
                      title="Estimated MCI of every pair (grouped)")
    return fig


def render_zoo_report(result: ZooResult) -> str:
    """The zoo as one HTML document: the pair matrix, the best sets, the groups and the notes."""
    figures = Figures()
    rows = "".join(
        f"<tr><td>{esc(', '.join(s.models))}</td><td>{s.mci:.1f}</td><td>{s.mci_low:.1f}</td>"
        f"<td>{s.mean_mci:.1f}</td><td>{esc(VERDICT_TEXT.get(s.verdict, s.verdict.value))}</td></tr>"
        for s in result.best_sets
    )
    groups = "".join(f"<li>{esc(title)}: {esc(', '.join(g))}</li>" for title, found in
                     (("near-duplicates", result.near_duplicates), ("compatible group", result.clusters))
                     for g in found)
    body = [
        f"<h1>MergeLens zoo: {len(result.models)} models</h1>",
        figures.add(zoo_matrix_figure(result), "zoo-matrix", 120 + 28 * len(result.models)),
        "<h2>Best sets</h2><table><tr><th>models</th><th>MCI (weakest pair)</th><th>at least</th>"
        f"<th>mean</th><th>verdict</th></tr>{rows}</table>",
        f"<h2>Groups</h2><ul>{groups}</ul>" if groups else "",
        f"<pre>{esc(result.strategy.mergekit_yaml)}</pre>" if result.strategy else "",
        "".join(f"<p class=note>{esc(n)}</p>" for n in result.notes),
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', MARKER,
        f"<title>MergeLens zoo ({len(result.models)} models)</title>", f"<style>{CSS}</style>",
        f"<script>{plotly_js()}</script>", "</head><body><main>", *[b for b in body if b], "</main>",
        figures.scripts(), f"<script>{_draw_js()}</script>", "</body></html>",
    ])


def write_zoo_report(result: ZooResult, path: Path, *, overwrite: bool = False) -> Path:
    """Write the zoo view to `path` (atomically), with the same output checks as `write_report`."""
    return _write_html(render_zoo_report(result), check_output(Path(path), overwrite=overwrite))
