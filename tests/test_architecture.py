"""The import arrows of STYLE.md, read from every module with `ast` (imports inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergelens_mcp"
MCP_SIDE = ("mcp", "mcp_types", "starlette", "uvicorn")


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything `path` imports; relative imports resolved against its package."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                names.add(target)
                names.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module or "")
    return names


def uses(names: set[str], *roots: str) -> set[str]:
    return {n for n in names if any(n == r or n.startswith(r + ".") for r in roots)}


MODULES = sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_only_the_tools_and_the_server_import_mcp(path: Path) -> None:
    if rel(path).startswith("tools/") or rel(path) == "server.py":
        return
    assert uses(imports_of(path), *MCP_SIDE) == set()


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("analysis/")], ids=rel)
def test_analysis_is_pure_compute(path: Path) -> None:
    forbidden = uses(imports_of(path), *MCP_SIDE, "anyio", "plotly", "mergelens_mcp.tools",
                     "mergelens_mcp.server", "mergelens_mcp.cli", "mergelens_mcp.report")
    assert forbidden == set()


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_plotly_is_imported_only_by_the_report(path: Path) -> None:
    if rel(path) != "report.py":
        assert uses(imports_of(path), "plotly") == set()


def test_the_checker_sees_relative_and_function_level_imports() -> None:
    names = imports_of(PACKAGE / "tools" / "report.py")
    assert {"mcp.server.mcpserver", "mergelens_mcp.report.write_report", "mergelens_mcp.tools.views"} <= names
