"""mergelens-mcp: should I merge these models, and how? Answered before the merge runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import errors
from ._version import VERSION as __version__  # noqa: F401 (a module attribute, not part of __all__)
from .errors import MergeLensError
from .models import MCI, CompareResult, ConfigDiagnosis, ConflictZone, LayerMetrics, Strategy, Verdict

__all__ = [
    "CompareResult", "ConflictZone", "LayerMetrics", "MCI", "MergeLensError", "Strategy", "Verdict",
    "compare_models", "errors", "generate_report",
    "ConfigDiagnosis", "diagnose_config",
]


def compare_models(
    models: Sequence[str], base: str | None = None, *, device: str = "auto", activations: bool = False
) -> CompareResult:
    """Compare two or more checkpoints (folders, .safetensors files or Hub ids), optionally with their base.

    `activations=True` adds per-layer activation CKA on a shipped probe set (needs the `activations` extra).

    >>> result = compare_models(["ft_a/", "ft_b/"], base="base/")
    >>> result.mci.score, result.mci.verdict.value, result.conflict_zones
    """
    from .service import compare

    models = models if isinstance(models, str) else list(models)  # a lone string is refused, not split
    return compare(models, base, device=device, activations=activations)


def diagnose_config(config: str) -> ConfigDiagnosis:
    """Check a mergekit YAML (a .yaml path or the YAML text) before merging; simulate it on readable models.

    >>> d = diagnose_config("merge.yaml")
    >>> d.valid, [(f.level.value, f.path, f.message) for f in d.findings], d.overall_interference
    """
    from .service import diagnose

    return diagnose(config)


def generate_report(
    models: Sequence[str], output: str | Path, base: str | None = None, *, device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Compare the checkpoints and write the interactive HTML report to `output`; return its path.

    >>> generate_report(["ft_a/", "ft_b/"], "report.html", base="base/")
    """
    from .service import generate_report as generate
    from .settings import Settings

    target = Path(output).expanduser().resolve()
    models = models if isinstance(models, str) else list(models)
    path, _ = generate(models, base, target, settings=Settings(device=device), overwrite=overwrite)
    return path
