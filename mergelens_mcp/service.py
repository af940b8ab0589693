"""Synchronous use-cases shared by the CLI, the Python API and the MCP tools."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .analysis.activations import Probe, activation_cka, hf_probe
from .analysis.adapters import AdapterCheckpoint, shared_base
from .analysis.engine import analyze
from .analysis.loading import Checkpoint, load_checkpoint
from .analysis.types import AnalysisOptions, Cancelled, Device, Progress
from .errors import CheckpointFormatError, IncompatibleModelsError, InputError, LimitExceededError
from .models import CompareResult, ConfigDiagnosis, Strategy
from .naming import model_names
from .security.paths import PathGuard
from .security.redact import redact_model
from .settings import Settings


def labelled(models: Sequence[str], base: str | None) -> dict[str, str]:
    """Each model under the name its messages use (its folder's name, made unique; `base`)."""
    named = dict(zip(model_names([str(m) for m in models]), map(str, models), strict=True))
    return named | ({"base": str(base)} if base else {})


def check_request(models: Sequence[str], base: str | None, settings: Settings) -> None:
    """Refuse, before anything is read, a request naming too few or too many models."""
    if isinstance(models, str) or len(models) < 2:
        raise InputError("compare needs at least two models (a list of paths or Hub ids)")
    count = len(models) + (1 if base else 0)
    if count > settings.max_models:
        raise LimitExceededError(
            f"this request names {count:,} models (base included), over the cap of {settings.max_models}; "
            "compare fewer at once or raise MERGELENS_MAX_MODELS"
        )


def open_checkpoints(
    models: Sequence[str], base: str | None, settings: Settings, guard: PathGuard | None, stack: ExitStack
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Check the request's caps, then resolve and read the headers of every checkpoint, one at a time, with
    the request's byte cap checked after each. A model listed twice is read once (its repeat shares the
    header table under its own label)."""
    check_request(models, base, settings)
    limits = settings.limits()
    base_ckpt = stack.enter_context(load_checkpoint(str(base), "base", guard=guard, limits=limits)) if base else None
    total = base_ckpt.nbytes if base_ckpt is not None else 0
    limits.check_request(total)
    opened: list[Checkpoint] = []
    parsed: dict[str, Checkpoint] = {}
    for label, source in zip(model_names([str(m) for m in models]), models, strict=True):
        key = os.path.normpath(source) if isinstance(source, str) else ""
        first = parsed.get(key) if key else None
        if first is None:  # a LoRA adapter is opened over the base given, else over the one its config names
            ckpt = stack.enter_context(load_checkpoint(str(source), label, guard=guard, limits=limits, base=base_ckpt))
            parsed[key] = ckpt
        else:  # the same model listed again: its header is not read twice
            ckpt = stack.enter_context(first.reopened(label, base=base_ckpt))
        total += ckpt.nbytes
        limits.check_request(total)
        opened.append(ckpt)
    if base_ckpt is None:
        base_ckpt = shared_base(opened)
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
    read_base: bool = False,
) -> CompareResult:
    """Compare two or more checkpoints, optionally against their common base.

    `activations=True` also runs each model on the shipped probe texts (Hugging Face checkpoints, needs
    transformers) and adds per-layer activation CKA to the metrics and the MCI; a `Probe` callable supplies
    representations for other models. LoRA adapters of one base are measured from their factors and a seeded
    sample of the base's rows (the weights' cosine, distance and KL and task_drift estimated; their spectra not
    measured); `read_base=True` reads the whole base for those. The device is checked before any file is opened.
    """
    settings = settings or Settings()
    options = settings.analysis_options(device, read_base)
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
    if activations is True and any(isinstance(m, AdapterCheckpoint) for m in models):  # hf_probe loads full models
        raise InputError(
            "activation similarity runs full models: it is not available for LoRA adapters; compare without "
            "activations, or merge each adapter into its base first (PeftModel.merge_and_unload)"
        )
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
    """A comparison's draft completed before it is built: the predicted retention per merge method, the
    findings no metric shows, its recommended strategy when one makes sense (the best prediction, for two
    models), the MCI in those units, and the decision (`merge_advised`, `answer`)."""
    from .analysis.predict import with_predictions
    from .mergekit.advice import advise

    return advise(with_predictions(draft))


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


def compare_keyed(
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    options: AnalysisOptions,
    settings: Settings,
    key: tuple[object, ...],
    *,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> CompareResult:
    """`compare_checkpoints` on checkpoints whose headers the caller read and keyed (`fingerprint`), possibly
    in another process: each is reopened from its header table (no header is read twice), and the files must
    still be as the key says, so a file replaced in between is refused rather than read with a stale table."""
    with ExitStack() as stack:
        base_copy = stack.enter_context(base.reopened()) if base is not None else None
        copies = [stack.enter_context(m.reopened(base=base_copy if _over(m, base) else None)) for m in models]
        if fingerprint(copies, base_copy, options, settings) != key:
            raise CheckpointFormatError(
                "a checkpoint file changed after its header was read (rewritten, replaced or touched); "
                "run the request again once the files are complete"
            )
        return compare_checkpoints(copies, base_copy, options, progress=progress, cancelled=cancelled)


def _over(model: Checkpoint, base: Checkpoint | None) -> bool:
    """Whether `model` is an adapter read over `base` itself (its copy then reads over the base's copy)."""
    return base is not None and isinstance(model, AdapterCheckpoint) and model.base_checkpoint is base


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
    read_base: bool = False,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> tuple[Path, CompareResult]:
    """Compare the checkpoints and write the interactive HTML report; return its path and the result.

    A relative `output` is taken inside `settings.reports_dir`; none gives `mergelens-report.html` there.
    With a guard, the output must resolve under an allowed root. It is checked before any tensor is read.
    `read_base`: as in `compare`.
    """
    from .report import check_output, write_report

    settings = settings or Settings()
    target = Path(output).expanduser() if output is not None else Path("mergelens-report.html")
    if not target.is_absolute():
        target = settings.reports_dir / target
    target = (guard or PathGuard([Path(os.sep)])).check_output(target, "report output")
    check_output(target, overwrite=overwrite)
    result = compare(models, base, settings=settings, guard=guard, progress=progress, cancelled=cancelled,
                     read_base=read_base)
    return write_report(result, target, overwrite=overwrite), result
