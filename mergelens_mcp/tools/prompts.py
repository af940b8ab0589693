"""The should_i_merge prompt: walks an assistant through the tools in a sensible order."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field


def should_i_merge(
    models: Annotated[str, Field(description="the checkpoints to merge, separated by commas or new lines")],
    base_model: Annotated[str, Field(description="their common base model, if known")] = "",
) -> str:
    names = [m.strip() for m in models.replace("\n", ",").split(",") if m.strip()]
    listed = ", ".join(repr(n) for n in names) or "(none given: ask the user)"
    base = repr(base_model.strip()) if base_model.strip() else "none given (ask the user; it matters)"
    return (
        f"The user wants to know whether to merge these models: {listed}. Base model: {base}.\n"
        "1. Call compare_models with models and base_model. Report the score, the verdict and its reasons "
        "in one or two sentences.\n"
        "2. If there are conflict zones, say which layers and why; call explain_layer on the worst one if "
        "the user wants to understand it.\n"
        "3. If the verdict is compatible or better, call suggest_strategy and show the mergekit YAML. If it "
        "is risky, propose the zone recommendations (e.g. take those layers from one model). If it is "
        "incompatible, advise against merging and say why.\n"
        "4. Offer generate_report for an HTML report to open in a browser.\n"
        "5. If the user has prompts of their own, call preview_merge with them as probe_file to rank the "
        "candidate methods on those prompts before merging (and verify_merge on the merged model after)."
    )


def register(server: MCPServer) -> None:
    server.prompt(
        name="should_i_merge", title="Should I merge these models?",
        description="Decide whether and how to merge two or more models, using the mergelens tools in order.",
    )(should_i_merge)
