"""Synchronous use-cases shared by the CLI, the Python API and the MCP tools."""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .analysis.activations import Probe, activation_cka, hf_probe
from .analysis.engine import Cancelled, Progress, analyze
from .analysis.loading import Checkpoint, load_checkpoint
from .errors import IncompatibleModelsError, InputError
from .models import CompareResult, ConfigDiagnosis, Strategy
from .security.paths import PathGuard
from .security.redact import redact_model
from .settings import Settings


def model_labels(count: int) -> list[str]:
    return [f"model_{string.ascii_lowercase[i]}" if i < 26 else f"model_{i}" for i in range(count)]


def open_checkpoints(
    models: Sequence[str], base: str | None, settings: Settings, guard: PathGuard | None, stack: ExitStack
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Resolve and read the headers of every checkpoint; check the request's total size."""
    if isinstance(models, str) or len(models) < 2:
        raise InputError("compare needs at least two models (a list of paths or Hub ids)")
    limits = settings.limits()
    opened = [
        stack.enter_context(load_checkpoint(str(src), label, guard=guard, limits=limits))
        for src, label in zip(models, model_labels(len(models)), strict=True)
    ]
    base_ckpt = stack.enter_context(load_checkpoint(str(base), "base", guard=guard, limits=limits)) if base else None
    limits.check_request(sum(c.nbytes for c in [*opened, *([base_ckpt] if base_ckpt else [])]))
    return opened, base_ckpt


def compare(
    models: Sequence[str],
    base: str | None = None,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    activations: bool | Probe = False,
) -> CompareResult:
    """Compare two or more checkpoints, optionally against their common base.

    `activations=True` also runs each model on the shipped probe texts (Hugging Face checkpoints, needs
    transformers) and adds per-layer activation CKA to the metrics and the MCI; a `Probe` callable supplies
    representations for other models.
    """
    settings = settings or Settings()
    with ExitStack() as stack:
        opened, base_ckpt = open_checkpoints(models, base, settings, guard, stack)
        cka = None
        if activations:
            probe = hf_probe() if activations is True else activations
            cka = activation_cka([c.root for c in opened], probe)
        result = analyze(opened, base_ckpt, settings.analysis_options(device), progress, cancelled, cka)
    from .analysis.predict import with_predictions

    return redact_model(with_predictions(with_strategy(result)))


def suggest_strategy(
    models: Sequence[str],
    base: str | None = None,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> Strategy:
    """The recommended merge method, its settings and mergekit YAML for these checkpoints."""
    result = compare(
        models, base, settings=settings, guard=guard, device=device, progress=progress, cancelled=cancelled
    )
    if result.strategy is None:
        raise IncompatibleModelsError(
            "no merge strategy: the models cannot be compared (" + "; ".join(result.mci.reasons[:2]) + ")"
        )
    return result.strategy


def with_strategy(result: CompareResult) -> CompareResult:
    """The result with its recommended merge strategy, when the models could be compared at all."""
    from .analysis.strategy import recommend_strategy

    if result.mci.score is None or result.strategy is not None:
        return result
    return result.model_copy(update={"strategy": recommend_strategy(result)})


def diagnose(
    config: str,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> ConfigDiagnosis:
    """Diagnose a mergekit YAML (a .yaml/.yml path or the YAML text); simulate it on the readable models."""
    from .analysis.config import diagnose as diagnose_config

    settings = settings or Settings()
    return redact_model(diagnose_config(
        config, guard=guard, limits=settings.limits(), progress=progress, cancelled=cancelled
    ))


def fingerprint(
    models: Sequence[str],
    base: str | None = None,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    device: str | None = None,
) -> tuple[object, ...]:
    """What a comparison depends on: each checkpoint's resolved files with their sizes and mtimes, the
    options, and the order of the models. Reads headers only; equal fingerprints give equal results."""
    settings = settings or Settings()
    with ExitStack() as stack:
        opened, base_ckpt = open_checkpoints(models, base, settings, guard, stack)
        return (
            tuple(_files_state(c) for c in opened),
            _files_state(base_ckpt) if base_ckpt else None,
            settings.analysis_options(device),
            settings.limits(),
        )


def _files_state(ckpt: Checkpoint) -> tuple[tuple[str, int, int], ...]:
    paths = [*ckpt.files, *(p for p in (ckpt.root / "config.json",) if p.is_file())]
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)


def generate_report(
    models: Sequence[str],
    base: str | None = None,
    output: str | Path | None = None,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> tuple[Path, CompareResult]:
    """Compare the checkpoints and write the interactive HTML report; return its path and the result.

    A relative `output` is taken inside `settings.reports_dir`; none gives `mergelens-report.html` there.
    With a guard, the output must resolve under an allowed root. It is checked before any tensor is read.
    """
    from .report import check_output, write_report

    settings = settings or Settings()
    target = Path(output).expanduser() if output is not None else Path("mergelens-report.html")
    if not target.is_absolute():
        target = settings.reports_dir / target
    target = (guard or PathGuard([Path(os.sep)])).check_output(target, "report output")
    check_output(target, overwrite=overwrite)
    result = compare(models, base, settings=settings, guard=guard, progress=progress, cancelled=cancelled)
    return write_report(result, target, overwrite=overwrite), result
