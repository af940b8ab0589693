"""mergelens-mcp: should I merge these models, and how? Answered before the merge runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import errors
from ._version import VERSION as __version__  # noqa: F401 (a module attribute, not part of __all__)
from .errors import MergeLensError
from .models import (
    MCI,
    CompareResult,
    ConfigDiagnosis,
    ConflictZone,
    LayerMetrics,
    PreviewResult,
    Strategy,
    Verdict,
    VerifyResult,
    ZooResult,
)

__all__ = [
    "CompareResult", "ConflictZone", "LayerMetrics", "MCI", "MergeLensError", "Strategy", "Verdict",
    "compare_models", "errors", "generate_report",
    "ConfigDiagnosis", "diagnose_config",
    "PreviewResult", "VerifyResult", "preview_merge", "verify_merge", "ZooResult", "compare_zoo",
]


def compare_models(
    models: Sequence[str], base: str | None = None, *, device: str = "auto", activations: bool = False,
    read_base: bool = False,
) -> CompareResult:
    """Compare two or more checkpoints (folders, .safetensors files, Hub ids, PEFT LoRA adapters or mergekit's
    `base+adapter`), optionally with their base (an adapter's defaults to the one its config names).

    `activations=True` adds per-layer activation CKA on a shipped probe set (needs the `activations` extra).
    LoRA adapters of one base are compared from their factors and a seeded sample of the base's rows (the
    weights' cosine, distance, KL and task_drift estimated from it); `read_base=True` reads the whole base for
    exact values and the weights' spectral metrics.

    >>> result = compare_models(["ft_a/", "ft_b/"], base="base/")
    >>> result.mci.score, result.mci.verdict.value, result.conflict_zones
    """
    from .service import compare

    models = models if isinstance(models, str) else list(models)  # a lone string is refused, not split
    return compare(models, base, device=device, activations=activations, read_base=read_base)


def diagnose_config(config: str) -> ConfigDiagnosis:
    """Check a mergekit YAML (a .yaml path or the YAML text) before merging; simulate it on readable models.

    >>> d = diagnose_config("merge.yaml")
    >>> d.valid, [(f.level.value, f.path, f.message) for f in d.findings], d.overall_interference
    """
    from .service import diagnose

    return diagnose(config)


def generate_report(
    models: Sequence[str] | None = None, output: str | Path | None = None, base: str | None = None, *,
    compare_result: CompareResult | None = None, output_path: str | Path | None = None, device: str = "auto",
    overwrite: bool = False, read_base: bool = False,
) -> Path:
    """Write the interactive HTML report to `output` (or `output_path`); return its path.

    From checkpoints (compared first) or from a result already computed, without reading the weights again:

    >>> generate_report(["ft_a/", "ft_b/"], "report.html", base="base/")
    >>> result = compare_models(["ft_a/", "ft_b/"], base="base/")
    >>> generate_report(compare_result=result, output_path="dashboard.html")

    `read_base`: LoRA adapters of one base are compared on the base's row sample unless this reads it whole
    (as in `compare_models`).
    """
    if (output is None) == (output_path is None):
        raise TypeError("generate_report needs the report's file name once: pass `output` or `output_path`")
    target = Path(str(output if output is not None else output_path)).expanduser().resolve()
    if compare_result is not None:
        if models is not None or base is not None or read_base:
            raise TypeError(
                "generate_report takes either `models` (and `base`, `read_base`) to compare, or `compare_result` "
                "already computed, not both: drop `models`/`base`/`read_base`, or drop `compare_result`"
            )
        if not isinstance(compare_result, CompareResult):
            raise TypeError(
                f"compare_result must be the CompareResult of compare_models(), not "
                f"{type(compare_result).__name__} (for JSON, pass CompareResult.model_validate_json(text))"
            )
        from .report import write_report

        return write_report(compare_result, target, overwrite=overwrite)
    if models is None:
        raise TypeError("generate_report needs `models` to compare, or `compare_result` already computed")
    from .service import generate_report as generate
    from .settings import Settings

    models = models if isinstance(models, str) else list(models)
    path, _ = generate(models, base, target, settings=Settings(device=device), overwrite=overwrite,
                       read_base=read_base)
    return path


def preview_merge(
    models: Sequence[str], base: str | None = None, *, methods: Sequence[str] | None = None,
    configs: Sequence[str] | None = None, probe: str | None = None, device: str = "auto", random_seed: int = 0,
) -> PreviewResult:
    """Merge candidates in memory and measure each on probe inputs against every source (needs the
    `activations` extra). Candidates: `configs` (your mergekit YAMLs, paths or text) and `methods` (the
    recommended parameters for each); neither: the recommended method, its runner-up and linear. DARE and
    della draw their masks as `mergekit-yaml --random-seed random_seed` will.

    >>> preview = preview_merge(["ft_a/", "ft_b/"], base="base/", probe="my_prompts.jsonl")
    >>> [(m.method, m.retention) for m in preview.methods]
    """
    from .probe import preview_merge as preview

    models = models if isinstance(models, str) else list(models)
    configs = [configs] if isinstance(configs, str) else list(configs) if configs else None
    return preview(models, base, methods=methods, configs=configs, probe=probe, device=device,
                   random_seed=random_seed)


def verify_merge(
    merged: str, sources: Sequence[str], base: str | None = None, *, config: str | None = None,
    probe: str | None = None, device: str = "auto", random_seed: int = 0,
) -> VerifyResult:
    """Check a written merge against its sources (per-layer task-vector coefficients, NaN/Inf, shapes), its
    mergekit config (every tensor merged again, random methods with `random_seed` as `mergekit-yaml
    --random-seed` drew them) and, where transformers can build it, on probe inputs.

    >>> check = verify_merge("merged/", ["ft_a/", "ft_b/"], base="base/", config="merge.yaml")
    >>> check.verdict, check.reasons
    """
    from .probe import verify_merge as verify

    sources = sources if isinstance(sources, str) else list(sources)
    return verify(merged, sources, base, config=config, probe=probe, device=device, random_seed=random_seed)


def compare_zoo(
    models: Sequence[str], base: str | None = None, *, target: str | None = None, top: int = 5, set_size: int = 3,
    exact_top: int = 0, ray: str | None = None, cache_dir: str | Path | None = None,
) -> ZooResult:
    """Which of these models to merge: each read once into a cached sketch; every pair's MCI (with its bound),
    near-duplicates, conflicts and the best sets. `models` may be one folder of model folders.

    >>> zoo = compare_zoo(["zoo/"], base="base/", target="zoo/ft_a")
    >>> [(s.models, s.mci) for s in zoo.best_sets]
    """
    from .zoo import compare_zoo as run

    return run(models, base, target=target, top=top, set_size=set_size, exact_top=exact_top, ray=ray,
               cache_dir=cache_dir)
