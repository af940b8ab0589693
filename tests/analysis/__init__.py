"""Tests of mergelens_mcp.analysis (a package, so module names cannot clash with tests/test_*.py)."""
