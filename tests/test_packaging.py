"""What `pip install mergelens-mcp` puts in a user's environment: the `mergelens_mcp` package and nothing beside it
(a top-level `fixtures` would shadow the PyPI library of that name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", ".cache", ".bench", ".demo", "build", "*.egg-info", "__pycache__", ".*_cache",
              ".hypothesis", "node_modules", ".whl", ".tools")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the source tree (so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT, tmp / "src", ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(source)], check=True, timeout=300)
    [built] = (tmp / "dist").glob("mergelens_mcp-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_the_mergelens_mcp_package(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mergelens_mcp"}


def test_the_wheel_holds_the_demo_generator_and_the_probe_texts(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"mergelens_mcp/demo.py", "mergelens_mcp/data/probe_texts.txt", "mergelens_mcp/py.typed"} <= names
    assert not any(n.startswith(("fixtures/", "tests/", "benchmarks/")) for n in names)
