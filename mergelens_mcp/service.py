"""Synchronous use-cases shared by the CLI, the Python API and the MCP tools."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .analysis.activations import Probe, activation_cka, hf_probe
from .analysis.engine import analyze
from .analysis.loading import Checkpoint, load_checkpoint
from .analysis.types import AnalysisOptions, Cancelled, Device, Progress
from .errors import IncompatibleModelsError, InputError
from .models import CompareResult, ConfigDiagnosis, Strategy
from .naming import model_names
from .security.paths import PathGuard
from .security.redact import redact_model
from .settings import Settings


def open_checkpoints(
    models: Sequence[str], base: str | None, settings: Settings, guard: PathGuard | None, stack: ExitStack
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Resolve and read the headers of every checkpoint; check the request's total size."""
    if isinstance(models, str) or len(models) < 2:
        raise InputError("compare needs at least two models (a list of paths or Hub ids)")
    limits = settings.limits()
    opened = [
        stack.enter_context(load_checkpoint(str(src), label, guard=guard, limits=limits))
        for src, label in zip(models, model_names([str(m) for m in models]), strict=True)
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
    device: Device | str | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    activations: bool | Probe = False,
) -> CompareResult:
    """Compare two or more checkpoints, optionally against their common base.

    `activations=True` also runs each model on the shipped probe texts (Hugging Face checkpoints, needs
    transformers) and adds per-layer activation CKA to the metrics and the MCI; a `Probe` callable supplies
    representations for other models. The device is checked before any file is opened.
    """
    settings = settings or Settings()
    options = settings.analysis_options(device)
    with ExitStack() as stack:
        opened, base_ckpt = open_checkpoints(models, base, settings, guard, stack)
        return compare_checkpoints(
            opened, base_ckpt, options, progress=progress, cancelled=cancelled, activations=activations
        )


def compare_checkpoints(
    models: list[Checkpoint],
    base: Checkpoint | None,
    options: AnalysisOptions,
    *,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    activations: bool | Probe = False,
) -> CompareResult:
    """The comparison of checkpoints already opened (their headers read once, by `open_checkpoints`),
    with its recommended strategy; the result is built once, redacted."""
    cka = None
    if activations:
        probe = hf_probe() if activations is True else activations
        cka = activation_cka(models, probe)
    return analyze(models, base, options, progress, cancelled, cka, finish=finish)


def suggest_strategy(
    models: Sequence[str],
    base: str | None = None,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    device: Device | str | None = None,
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


def finish(draft: CompareResult) -> CompareResult:
    """A comparison's draft completed before it is built: the findings no metric shows, its recommended
    strategy when one makes sense, and the decision (`merge_advised`, `answer`)."""
    from .mergekit.advice import advise

    return advise(draft)


def diagnose(
    config: str,
    *,
    settings: Settings | None = None,
    guard: PathGuard | None = None,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    base: str | None = None,
) -> ConfigDiagnosis:
    """Diagnose a mergekit YAML (a .yaml/.yml path or the YAML text); simulate it on the readable models
    (`base`: the models' common base, for a config that names none)."""
    from .mergekit.diagnose import diagnose as diagnose_config

    settings = settings or Settings()
    return redact_model(diagnose_config(
        config, guard=guard, limits=settings.limits(), progress=progress, cancelled=cancelled, base=base
    ))


def fingerprint(
    models: Sequence[Checkpoint], base: Checkpoint | None, options: AnalysisOptions, settings: Settings
) -> tuple[object, ...]:
    """What a comparison of these opened checkpoints depends on: each one's resolved files with their
    device, inode, size, mtime and ctime (a rewrite that keeps the size and restores the mtime still changes
    the inode or the ctime), the options, the limits and the order of the models. Equal fingerprints give
    equal results. Reads no header: the caller compares the checkpoints it opened for this."""
    return (
        tuple(_files_state(c) for c in models),
        _files_state(base) if base else None,
        options,
        settings.limits(),
    )


def _files_state(ckpt: Checkpoint) -> tuple[tuple[str, int, int, int, int, int], ...]:
    paths = [*ckpt.files, *(p for p in (ckpt.root / "config.json",) if p.is_file())]
    return tuple(
        (str(p), (st := p.stat()).st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for p in paths
    )


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
