"""generate_report: the interactive HTML report, written under the server's output folder."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from ..analysis.types import Cancelled, Progress
from ..errors import MergeLensError, PathNotAllowedError
from ..security.paths import PathGuard
from ..security.redact import redact
from . import views
from .params import BaseModelPath, Models, ReadBase
from .runtime import AppContext, analyse, run_in_worker, state_of

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


def report_path(folder: Path, filename: str | None, models: Sequence[str], base: str | None) -> Path:
    """Where the report goes: a plain file name inside `folder`, never a path out of it."""
    if filename is None:
        digest = hashlib.sha256("\0".join([*models, base or ""]).encode()).hexdigest()[:10]
        filename = f"mergelens-report-{digest}.html"
    if not filename.endswith(".html"):
        filename += ".html"
    if not SAFE_NAME.match(filename):
        raise PathNotAllowedError(
            f"report filename {filename!r} is not a plain file name; use letters, digits, '.', '_' or '-' "
            "(no folders: reports are always written to the server's output folder)"
        )
    path = (folder / filename).resolve()
    if path.parent != folder.resolve():
        raise PathNotAllowedError(f"report filename {filename!r} resolves outside the output folder {folder}")
    return path


async def generate_report(
    models: Models,
    ctx: AppContext,
    base_model: BaseModelPath = None,
    filename: Annotated[
        str | None,
        Field(description="file name for the report (e.g. 'llama-merge.html'); it is always written to the "
                          "server's output folder. Default: a name derived from the models"),
    ] = None,
    overwrite: Annotated[
        bool,
        Field(description="replace an existing file of that name even if it is not a mergelens report "
                          "(reports mergelens wrote are always replaced); leave false unless the user asked"),
    ] = False,
    read_base: ReadBase = False,
) -> views.Report:
    from ..report import check_output, write_report

    folder = state_of(ctx).settings.reports_dir
    try:  # refuse a bad name before any tensor is read
        folder.mkdir(parents=True, exist_ok=True)
        path = report_path(folder, filename, models, base_model)
        path = PathGuard([folder]).check_output(path, "report output")  # no FIFO, device or folder
        target = check_output(path, overwrite=overwrite)  # and not someone else's file unless asked
    except MergeLensError as exc:
        raise ToolError(redact(str(exc))) from exc
    except OSError as exc:
        raise ToolError(f"cannot use the output folder {folder}: {exc.strerror}") from exc
    result, cached = await analyse(ctx, models, base_model, read_base)

    def job(progress: Progress, cancelled: Cancelled) -> Path:
        return state_of(ctx).isolated(write_report, result, target, overwrite=overwrite)

    path = await run_in_worker(ctx, job)
    return views.Report(merge_advised=result.merge_advised, answer=result.answer,
                        path=str(path), bytes=path.stat().st_size, score=result.mci.score,
                        verdict=result.mci.verdict, summary=views.summary(result), cached=cached)


def register(server: MCPServer) -> None:
    server.add_tool(
        generate_report, title="Write an HTML merge report",
        annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                                    openWorldHint=False),
        description=(
            "Write a self-contained interactive HTML report (per-layer heatmaps, conflict zones, the score "
            "and its reasons, the recommended mergekit config) for these models into the server's output "
            "folder, and return its path and a one-line summary. Use when the user wants something to open "
            "in a browser or share. It replaces an earlier mergelens report of the same name, never other "
            "files."
        ),
    )
