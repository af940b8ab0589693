"""The use-cases shared by the CLI, the Python API and the MCP tools: a comparison's result is built once,
with its strategy and its redaction, and says the one version of the package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import mergelens_mcp
from fixtures.checkpoints import make_checkpoint, make_finetune
from mergelens_mcp import service
from mergelens_mcp._version import VERSION
from mergelens_mcp.models import CompareResult
from mergelens_mcp.security.redact import REDACTED

ROOT = Path(__file__).parents[1]
TOKEN = "hf_" + "a1B2c3D4e5F6g7H8i9J0"


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time a CompareResult is built or copied: by its constructor, model_validate or model_copy."""
    calls: list[str] = []
    init, validate, copy = CompareResult.__init__, CompareResult.model_validate.__func__, CompareResult.model_copy

    def counted_init(self: CompareResult, **data: Any) -> None:
        calls.append("init")
        init(self, **data)

    def counted_validate(cls: type[CompareResult], *args: Any, **kwargs: Any) -> Any:
        calls.append("model_validate")
        return validate(cls, *args, **kwargs)

    def counted_copy(self: CompareResult, *args: Any, **kwargs: Any) -> Any:
        calls.append("model_copy")
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(CompareResult, "__init__", counted_init)
    monkeypatch.setattr(CompareResult, "model_validate", classmethod(counted_validate))
    monkeypatch.setattr(CompareResult, "model_copy", counted_copy)
    return calls


def test_a_comparison_builds_its_result_once_with_its_strategy_and_its_strings_redacted(
    tmp_path: Path, built: list[str]
) -> None:
    folder = tmp_path / TOKEN  # a secret in a path must not reach the result
    base = make_checkpoint(folder / "base")
    a, b = make_finetune(folder / "a", task_seed=1), make_finetune(folder / "b", task_seed=2)
    result = service.compare([str(a), str(b)], str(base), device="cpu")
    assert len(built) == 1
    assert result.strategy is not None and REDACTED in result.strategy.mergekit_yaml
    dumped = result.model_dump_json()
    assert TOKEN not in dumped and f"{REDACTED}/a" in result.models[0].source


def test_the_package_has_one_version_that_pyproject_the_api_the_server_and_results_agree_on(
    tmp_path: Path
) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+, we support 3.10
    assert re.findall(r"(?m)^version\s*=.*$", pyproject) == ['version = { attr = "mergelens_mcp._version.VERSION" }']
    assert re.search(r'(?m)^dynamic = \["version"\]$', pyproject)
    assert mergelens_mcp.__version__ == VERSION and re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    literal = re.compile(r"""(VERSION|__version__|version)\s*[:=]\s*(str\s*=\s*)?["']\d""")
    elsewhere = [p.relative_to(ROOT) for p in (ROOT / "mergelens_mcp").rglob("*.py")
                 if p.name != "_version.py" and literal.search(p.read_text(encoding="utf-8"))]
    assert elsewhere == []
    a, b = make_finetune(tmp_path / "a", task_seed=1), make_finetune(tmp_path / "b", task_seed=2)
    assert service.compare([str(a), str(b)], device="cpu").version == VERSION
