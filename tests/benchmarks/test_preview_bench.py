"""The preview bench on the tiny family: 32 probes of 64 tokens, the floor's one read and one forward, and the
preview and floor measured as child processes."""

from pathlib import Path

import pytest

from benchmarks.preview import PROBES, TOKENS, floor, measure, write_probes
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.probe import read_probes, skeleton_of, tokenize


def test_the_probe_set_is_32_seeded_lines_of_64_tokens(tmp_path: Path, family) -> None:
    path = write_probes(tmp_path / "p.txt")
    assert path.read_text() == write_probes(tmp_path / "q.txt").read_text()
    with load_checkpoint(str(family.finetune_a), "a") as ckpt:
        batch = tokenize(read_probes(str(path)), skeleton_of(ckpt))
    assert batch.ids.shape == (PROBES, TOKENS) and int(batch.mask.sum()) == PROBES * TOKENS


def test_the_floor_reads_three_models_and_runs_one_forward_pass(tmp_path: Path, family) -> None:
    figures = floor(str(family.finetune_a), str(family.finetune_b), str(family.base),
                    str(write_probes(tmp_path / "p.txt")))
    assert figures["tokens"] == PROBES * TOKENS
    assert figures["read_s"] > 0 and figures["forward_s"] > 0


@pytest.mark.slow
def test_preview_and_floor_are_measured_alternately_as_children(tmp_path: Path, family) -> None:
    folders = {"ft_a": family.finetune_a, "ft_b": family.finetune_b, "base": family.base}
    figures = measure(folders, tmp_path / "work", repeat=1)
    assert len(figures["walls"]["floor"]) == len(figures["walls"]["preview"]) == 1
    assert figures["ratio_cpu"] == pytest.approx(figures["preview"]["cpu_s"] / figures["floor"]["cpu_s"])
    assert figures["preview"]["peak_rss_bytes"] > 0 and figures["floor"]["peak_rss_bytes"] > 0
