"""Parameter types shared by the tools; their descriptions become the tools' input schemas."""

from __future__ import annotations

from typing import Annotated

from mcp.types import ToolAnnotations
from pydantic import Field

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)

Models = Annotated[
    list[str],
    Field(
        min_length=2,
        description="two or more checkpoints to merge: local folders, .safetensors files or Hugging Face "
        "Hub ids (owner/name or owner/name@revision); local paths must be under the server's allowed folders "
        "(relative ones resolve against the server's working folder; absolute paths are safest)",
    ),
]
BaseModelPath = Annotated[
    str | None,
    Field(
        description="the common base model the candidates were fine-tuned from (path or Hub id); strongly "
        "recommended: without it only weight similarity is measured, not whether the fine-tunes conflict",
    ),
]
Detail = Annotated[
    bool,
    Field(description="also return every layer's raw metrics (large: dozens of numbers per layer); "
                      "leave false unless the compact answer is not enough"),
]
