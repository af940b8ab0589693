"""Benchmarks of mergelens-mcp: measurements of the product's promises, not part of the installed package."""
