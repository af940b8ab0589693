"""Shared fixtures: generated checkpoints (seeded, written to temporary folders, never committed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fixtures.setup import pytest_terminal_summary  # noqa: F401 - a hook: names `make test-deps` after skips
from mergelens_mcp.demo import Family, make_family

# Tiny tensors: one thread is fastest, and two busy cores make torch's thread pool spin for nothing.
torch.set_num_threads(1)
# No test may reach the network: Hub ids resolve from a local cache or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """base, finetune_a, finetune_b, flipped (layer 2 reversed), opposed (2*base - finetune_a), unrelated."""
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory (the default allowed root)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path

