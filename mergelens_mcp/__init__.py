"""mergelens-mcp: should I merge these models, and how? Answered before the merge runs."""

from __future__ import annotations

from collections.abc import Sequence

from . import errors
from .errors import MergeLensError
from .models import CompareResult, ConflictZone, LayerMetrics, MCI, Strategy, Verdict

__all__ = [
    "CompareResult", "ConflictZone", "LayerMetrics", "MCI", "MergeLensError", "Strategy", "Verdict",
    "compare_models", "errors",
]
__version__ = "0.1.0"


def compare_models(models: Sequence[str], base: str | None = None, *, device: str = "auto") -> CompareResult:
    """Compare two or more checkpoints (folders, .safetensors files or Hub ids), optionally with their base.

    >>> result = compare_models(["ft_a/", "ft_b/"], base="base/")
    >>> result.mci.score, result.mci.verdict.value, result.conflict_zones
    """
    from .service import compare

    return compare(list(models), base, device=device)
