"""Protocol tests: MCP clients against `build_server`, on the generated fixture family."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.checkpoints import Family
from mergelens_mcp.settings import Settings


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed folder for files a module's tests create."""
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def settings(family: Family, scratch: Path) -> Settings:
    """The family's folder and `scratch` are allowed; reports go to scratch/reports."""
    return Settings(allowed_roots=[family.base.parent, scratch], include_hf_cache=False,
                    output_dir=scratch / "reports")


@pytest.fixture
def flipped_pair(family: Family) -> dict[str, object]:
    """Tool arguments: finetune_a against `flipped` (layer 2's update reversed), with their base."""
    return {"models": [str(family.finetune_a), str(family.flipped)], "base_model": str(family.base)}
