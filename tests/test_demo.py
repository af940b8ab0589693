"""The demo family (`python -m mergelens_mcp.demo DIR`): seeded and byte-for-byte reproducible. What the product
says about its members is held by tests/test_public_api.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.checkpoints import TINY, variant
from mergelens_mcp.demo import main, make_family

MEMBERS = ["base", "finetune_a", "finetune_b", "flipped", "opposed", "unrelated"]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_the_family_is_the_same_bytes_for_the_same_arguments_and_differs_by_seed(tmp_path: Path) -> None:
    shape = variant(TINY, layers=3)
    one, two = make_family(tmp_path / "one", shape), make_family(tmp_path / "two", shape)
    first = digest(tmp_path / "one")
    assert len(first) == 2 * len(MEMBERS) and first == digest(tmp_path / "two")
    assert list(one.as_dict()) == MEMBERS and one.base == tmp_path / "one" / "base" != two.base
    make_family(tmp_path / "seeded", shape, seed=5)
    assert digest(tmp_path / "seeded")["base/model.safetensors"] != first["base/model.safetensors"]


def test_main_writes_the_family_into_the_folder_given_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in printed] == MEMBERS
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(MEMBERS)
    assert (tmp_path / "demo" / "finetune_a" / "model.safetensors").is_file()


def test_the_demo_runs_as_a_module_of_the_installed_package(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "mergelens_mcp.demo", str(tmp_path / "d")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True)
    assert f"finetune_a: {tmp_path / 'd' / 'finetune_a'}" in run.stdout
