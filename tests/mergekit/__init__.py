"""Tests of mergelens_mcp.mergekit (a package, so module names cannot clash with tests/test_*.py)."""
