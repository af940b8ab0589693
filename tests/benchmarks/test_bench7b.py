"""The 7B benchmark's bookkeeping: which numbers of two results are compared, and the disk check."""

from pathlib import Path

import pytest

from benchmarks.bench7b import SHAPE_7B, agreement, check_disk, numbers


def test_numbers_flattens_a_result_by_path_and_leaves_out_timings_and_flags() -> None:
    result = {"mci": {"score": 71.5}, "elapsed_s": 3.0, "layers": [{"cos": 0.5, "exact": True}], "name": "x"}
    assert numbers(result) == {".mci.score": 71.5, ".layers[0].cos": 0.5}


def test_agreement_reports_the_largest_difference_and_where() -> None:
    a = {"mci": {"score": 70.0}, "layers": [{"cos": 0.5}, {"cos": 0.25}]}
    b = {"mci": {"score": 70.5}, "layers": [{"cos": 0.5}, {"cos": 0.0}]}
    assert agreement(a, b) == (0.5, ".mci.score", 70.0, 70.5)


def test_the_disk_check_names_the_size_needed_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 10 << 30})())
    with pytest.raises(SystemExit, match=r"needs 40 GB .* 11 GB are free: free some space or set --root"):
        check_disk(tmp_path / "llama-7b", SHAPE_7B)
