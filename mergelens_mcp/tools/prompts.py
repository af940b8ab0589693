"""The should_i_merge prompt: walks an assistant through the tools in a sensible order."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import Field


def should_i_merge(
    models: Annotated[str, Field(description="the checkpoints to merge (two or more), separated by commas or new "
                                             "lines")],
    base_model: Annotated[str, Field(description="their common base model, if known")] = "",
) -> str:
    names = [m.strip() for m in models.replace("\n", ",").split(",") if m.strip()]
    if len(names) < 2:
        raise MCPError(INVALID_PARAMS, f"should_i_merge needs two or more models, got {len(names)}: pass them "
                                       "separated by commas")  # MCPError: its text reaches the client
    listed = ", ".join(repr(n) for n in names)
    base = repr(base_model.strip()) if base_model.strip() else "none given (ask the user; it matters)"
    return (
        f"The user wants to know whether to merge these models: {listed}. Base model: {base}.\n"
        "1. Call compare_models with models and base_model. Its `merge_advised` (yes / with_care / no) is the "
        "decision and `answer` says it in one sentence: quote the answer, then give the reasons in one or two "
        "sentences. Relative paths resolve against the server's folder.\n"
        "2. Call suggest_strategy with the same arguments, whatever the decision: its method and warnings "
        "agree with the decision (passthrough means keep one model). If merge_advised is no, advise against "
        "merging, say why, and which model to keep; do not offer a merge method. If it is yes or with_care, "
        "show the mergekit YAML.\n"
        "3. If merge_advised is with_care, call get_conflict_zones and say which layers conflict and what "
        "its recommendations say; call explain_layer on the worst one if the user wants to understand it.\n"
        "4. Offer generate_report for an HTML report to open in a browser.\n"
        "5. If the user has prompts of their own, call preview_merge with them as probe_file to rank the "
        "candidate methods on those prompts before merging (and verify_merge on the merged model after)."
    )


def register(server: MCPServer) -> None:
    server.prompt(
        name="should_i_merge", title="Should I merge these models?",
        description="Decide whether and how to merge two or more models, using the mergelens tools in order.",
    )(should_i_merge)
