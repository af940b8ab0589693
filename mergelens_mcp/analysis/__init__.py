"""Pure computation on checkpoints and tensors. Imports no MCP, server, anyio or plotly code."""
