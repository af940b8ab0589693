"""The package's version: its one home. pyproject.toml reads it (setuptools `dynamic`), and the engine's
results, the MCP server's handshake and `mergelens_mcp.__version__` import it."""

VERSION = "0.1.0"
