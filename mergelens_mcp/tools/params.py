"""Parameter types shared by the tools; their descriptions become the tools' input schemas."""

from __future__ import annotations

from typing import Annotated

from mcp.types import ToolAnnotations
from pydantic import Field

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)

MAX_LISTED = 4096  # schema bounds; the server's own cap (MERGELENS_MAX_MODELS, default 16) is checked first
MAX_SOURCE_CHARS = 4096  # a path or Hub id: PATH_MAX

Models = Annotated[
    list[Annotated[str, Field(max_length=MAX_SOURCE_CHARS)]],
    Field(
        min_length=2, max_length=MAX_LISTED,
        description="two or more checkpoints to merge: local folders, .safetensors files or Hugging Face "
        "Hub ids (owner/name or owner/name@revision); PEFT LoRA adapter folders or ids (their base from "
        "base_model or the adapter's config), or mergekit's base+adapter; local paths must be under the "
        "server's allowed folders (relative ones resolve against the server's working folder; absolute paths "
        "are safest)",
    ),
]
BaseModelPath = Annotated[
    str | None,
    Field(
        description="the common base model the candidates were fine-tuned from (path or Hub id); strongly "
        "recommended: without it only weight similarity is measured, not whether the fine-tunes conflict",
    ),
]
ReadBase = Annotated[
    bool,
    Field(description="LoRA adapters of one base are compared from their factors and a seeded sample of the "
                      "base's rows (the weights' cosine, distance and task_drift estimated, their spectra not "
                      "measured); true reads the whole base, for exact values and the spectra"),
]
Detail = Annotated[
    bool,
    Field(description="also return every layer's raw metrics (large: dozens of numbers per layer); "
                      "leave false unless the compact answer is not enough"),
]

RandomSeed = Annotated[int, Field(ge=0, le=(1 << 63) - 1, description=(
    "the random methods' (DARE, della) masks are drawn as `mergekit-yaml --random-seed` draws them with this seed"))]
