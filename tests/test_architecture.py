"""STYLE.md's import arrows, held by walking every module's imports (function-level ones too) with `ast`."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergelens_mcp"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
MCP_SIDE = ("mcp", "mcp_types", "starlette", "uvicorn")  # the SDK and the web stack it brings


def module_name(path: Path) -> str:
    parts = ["mergelens_mcp", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports_of(path: Path) -> frozenset[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import errors` is a module
    return frozenset(found)


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports_of(path) if any(i == p or i.startswith(p + ".") for p in prefixes))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_the_walker_sees_relative_absolute_and_function_level_imports() -> None:
    engine = imports_of(PACKAGE / "analysis" / "engine.py")
    assert {"torch", "mergelens_mcp.models", "mergelens_mcp.analysis.score", "mergelens_mcp.errors"} <= engine
    assert "mergelens_mcp.service" in imports_of(PACKAGE / "__init__.py")  # imported inside compare_models
    assert "mergelens_mcp.errors" in imports_of(PACKAGE / "__init__.py")  # `from . import errors`
    assert len(MODULES) >= 15
    tool = imports_of(PACKAGE / "tools" / "report.py")
    assert {"mcp.server.mcpserver", "mergelens_mcp.report.write_report", "mergelens_mcp.tools.views"} <= tool


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("analysis/")], ids=rel)
def test_analysis_never_imports_tools_server_mcp_anyio_or_plotly(path: Path) -> None:
    ours = ("mergelens_mcp.tools", "mergelens_mcp.server", "mergelens_mcp.cli", "mergelens_mcp.report")
    assert imports_any(path, (*ours, *MCP_SIDE, "anyio", "plotly")) == []


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("analysis/")], ids=rel)
def test_analysis_never_imports_the_mergekit_subpackage(path: Path) -> None:
    assert imports_any(path, ("mergelens_mcp.mergekit",)) == []


MERGEKIT_MAY_IMPORT = ("mergelens_mcp.mergekit", "mergelens_mcp.analysis", "mergelens_mcp.models",
                       "mergelens_mcp.errors", "mergelens_mcp.security")


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("mergekit/")], ids=rel)
def test_mergekit_imports_only_analysis_models_errors_and_security_of_ours(path: Path) -> None:
    ours = [i for i in imports_any(path, ("mergelens_mcp",)) if i != "mergelens_mcp"]
    assert [i for i in ours if not i.startswith(tuple(f"{p}." for p in MERGEKIT_MAY_IMPORT))
            and i not in MERGEKIT_MAY_IMPORT] == []


def test_the_mergekit_subpackage_holds_schema_diagnose_simulate_and_recommend() -> None:
    assert {"schema.py", "diagnose.py", "simulate.py", "recommend.py"} <= {
        p.name for p in (PACKAGE / "mergekit").glob("*.py")
    }
    moved = ("mergekit_schema.py", "config.py", "simulation.py", "strategy.py")
    assert [name for name in moved if (PACKAGE / "analysis" / name).exists()] == []
    assert "mergelens_mcp.mergekit.diagnose" in imports_of(PACKAGE / "service.py")


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_only_tools_and_server_import_mcp(path: Path) -> None:
    if rel(path).startswith("tools/") or rel(path) == "server.py":
        return
    assert imports_any(path, MCP_SIDE) == []


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_only_report_imports_plotly(path: Path) -> None:
    if rel(path) == "report.py":
        return
    assert imports_any(path, ("plotly",)) == []


def test_errors_imports_nothing_of_ours() -> None:
    errors = PACKAGE / "errors.py"
    assert imports_any(errors, ("mergelens_mcp",)) == []
    assert imports_of(errors) <= {"__future__", "__future__.annotations"}


def test_analysis_types_is_a_leaf_that_loads_no_torch() -> None:
    types = PACKAGE / "analysis" / "types.py"
    ours = imports_any(types, ("mergelens_mcp",))
    assert ours == ["mergelens_mcp.errors", "mergelens_mcp.errors.InputError"]
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mergelens_mcp.analysis.types, mergelens_mcp.settings; "
                               "print(sorted(m for m in sys.modules if m == 'torch' or m.endswith('.spectral')))"],
        capture_output=True, text=True, timeout=120, check=True, cwd=PACKAGE.parent,
    )
    assert loaded.stdout.strip() == "[]"
