"""Fixtures of the hostile-input suite, generated into each test's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.hostile import Sandbox, make_sandbox


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """`allowed/` (model_a, model_b) is the only root; `outside/secret_model` must stay out of reach."""
    return make_sandbox(tmp_path)
