"""Short, unique names for the models of a comparison, from what the caller gave: the folder name
(`/ckpt/finetune_a` -> `finetune_a`), a file's stem, a Hub id's name (`org/llama-ft@v2` -> `llama-ft@v2`). Names
that collide get the parent folder (`run1/ckpt`, `run2/ckpt`) where that tells them apart, else a number
(`ckpt`, `ckpt-2`); `base` is the base model's."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath

RESERVED = ("base",)
MAX_NAME = 40
UNSAFE = re.compile(r"[^\w.@+=-]+")


def model_names(sources: Sequence[str]) -> list[str]:
    """One short name per source, unique among them and never 'base'."""
    parts = [_parts(str(s)) for s in sources]
    names = [p[-1] if p else f"model_{i + 1}" for i, p in enumerate(parts)]
    clashing = {n for n in names if names.count(n) > 1 or n in RESERVED}
    longer = ["/".join(p[-2:]) if n in clashing and len(p) > 1 else n for n, p in zip(names, parts, strict=True)]
    names = [long if longer.count(long) == 1 or short in RESERVED else short
             for short, long in zip(names, longer, strict=True)]
    taken: set[str] = set(RESERVED)
    unique = []
    for name in names:
        candidate, k = name, 2
        while candidate in taken:
            candidate, k = f"{name}-{k}", k + 1
        taken.add(candidate)
        unique.append(candidate)
    return unique


def _parts(source: str) -> list[str]:
    """The path's meaningful parts, last one a file's stem; each cut to something safe and short."""
    path = PurePath(source.strip().rstrip("/\\"))
    names = [p for p in path.parts if p not in ("/", "\\", ".", "..", "~") and p]
    if names and names[-1].endswith(".safetensors"):
        names[-1] = names[-1].removesuffix(".safetensors")
    cleaned = [UNSAFE.sub("_", n)[:MAX_NAME].strip("_") for n in names]
    return [c for c in cleaned if c]
