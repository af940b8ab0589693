"""mergelens 2.0.3's MCI beside ours: the peer script's JSON lines, their cache, and the predictor row."""

import argparse
import json
import stat
import sys

import pytest

from benchmarks.mergeability.run import parse_peer_output, peer_scores, render_markdown, summarize
from benchmarks.mergeability.stats import spearman

LINES = "\n".join([
    json.dumps({"version": "2.0.3"}),
    json.dumps({"key": "add-lr0.001|copy-lr0.001", "peer_mci": 94.0, "risk_tier": "lower"}),
    json.dumps({"key": "add-lr0.001|max-lr0.001", "peer_mci": 71.5, "risk_tier": "moderate"}),
    json.dumps({"key": "copy-lr0.001|max-lr0.001", "peer_mci": None, "risk_tier": None}),
    "",
])
MANIFEST = {
    "base": {"path": "ck/base"},
    "finetunes": {n: {"path": f"ck/{n}"} for n in ("add-lr0.001", "copy-lr0.001", "max-lr0.001")},
}
PAIRS = [("add-lr0.001", "copy-lr0.001"), ("add-lr0.001", "max-lr0.001"), ("copy-lr0.001", "max-lr0.001")]


def fake_peer(tmp_path, lines):
    """An executable standing in for the peer venv's python: it prints `lines` whatever it is asked."""
    (tmp_path / "lines.jsonl").write_text(lines)
    script = tmp_path / "python"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.read()\n"
                      f"print(open({str(tmp_path / 'lines.jsonl')!r}).read(), end='')\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def args_for(tmp_path, python, rescore=True):
    return argparse.Namespace(out=tmp_path, rescore=rescore, peer_python=python)


def test_the_peer_lines_give_its_version_and_every_pairs_score_and_risk_tier():
    parsed = parse_peer_output(LINES)
    assert parsed["version"] == "2.0.3"
    assert parsed["scores"] == {"add-lr0.001|copy-lr0.001": 94.0, "add-lr0.001|max-lr0.001": 71.5,
                                "copy-lr0.001|max-lr0.001": None}
    assert parsed["risk_tiers"]["add-lr0.001|max-lr0.001"] == "moderate"


def test_peer_scores_are_read_from_the_peer_process_and_cached_next_to_the_checkpoints(tmp_path):
    scores = peer_scores(args_for(tmp_path, fake_peer(tmp_path, LINES)), MANIFEST, PAIRS)
    assert scores["scores"]["add-lr0.001|max-lr0.001"] == 71.5
    cached = json.loads((tmp_path / "peer_scores.json").read_text())
    assert cached["scores"] == scores["scores"] and cached["version"] == "2.0.3"
    # without --rescore the cache answers, even once the peer is gone
    again = peer_scores(args_for(tmp_path, tmp_path / "gone", rescore=False), MANIFEST, PAIRS)
    assert again["scores"] == scores["scores"]


def test_without_rescore_the_peer_is_not_asked(tmp_path):
    assert peer_scores(args_for(tmp_path, fake_peer(tmp_path, LINES), rescore=False), MANIFEST, PAIRS) == {}
    assert not (tmp_path / "peer_scores.json").exists()


def test_a_missing_peer_python_is_skipped_with_a_message(tmp_path, capsys):
    assert peer_scores(args_for(tmp_path, tmp_path / "no-venv" / "python"), MANIFEST, PAIRS) == {}
    assert "peer MCI not computed" in capsys.readouterr().err
    assert not (tmp_path / "peer_scores.json").exists()


def test_a_pair_the_peer_left_out_stops_the_run(tmp_path):
    short = "\n".join(LINES.splitlines()[:2])
    with pytest.raises(SystemExit, match="no score for 2 pairs"):
        peer_scores(args_for(tmp_path, fake_peer(tmp_path, short)), MANIFEST, PAIRS)


def _rows(peer):
    tasks = ["add", "copy", "max", "sort"]
    rows = []
    for i, (ta, tb) in enumerate([(a, b) for j, a in enumerate(tasks) for b in tasks[j + 1:]] * 2):
        y = 0.3 + 0.1 * ((i * 7) % 5)
        rows.append({
            "pair": f"{ta}{i}|{tb}{i}", "a": f"{ta}-{i % 2}", "b": f"{tb}-{i % 2}", "task_a": ta, "task_b": tb,
            "merged": {"linear": {"normalized": y}},
            "tv": {"norm_a": 1.0 + i, "norm_b": 2.0 + (i % 3), "distance": 1.0 + i % 4, "cosine": 0.1 * (i % 3)},
            "mci": 50.0 + (i % 4), "peer_mci": peer[i], "recommended": "linear", "recommended_merge": None,
            "features": {},
        })
    return rows


def test_the_peer_mci_becomes_a_predictor_row_beside_ours_and_norms_only():
    peer = [90.0 - 3 * i if i != 5 else None for i in range(12)]
    rows = _rows(peer)
    table = summarize(rows, ["linear"])["methods"]["linear"]["predictors"]
    assert {"mci", "peer_mci", "norms_only"} <= set(table)
    kept = [i for i in range(12) if peer[i] is not None]
    y = [rows[i]["merged"]["linear"]["normalized"] for i in kept]
    assert table["peer_mci"]["n"] == 11
    assert table["peer_mci"]["spearman"] == pytest.approx(spearman([peer[i] for i in kept], y))
    summary = summarize(rows, ["linear"])
    markdown = render_markdown({"summary": summary, "settings": {}, "mci_available": True,
                                "peer": {"version": "2.0.3"}})
    assert "| linear |" in markdown and "| peer_mci | 11 |" in markdown
    assert "mergelens 2.0.3's MCI" in markdown


def test_without_peer_scores_there_is_no_peer_row():
    table = summarize(_rows([None] * 12), ["linear"])["methods"]["linear"]["predictors"]
    assert "peer_mci" not in table and "mci" in table
