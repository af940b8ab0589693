"""`mergelens compare | diagnose | preview | verify | report | serve`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .analysis.predict import mci_source
from .errors import InputError, MergeLensError
from .models import CompareResult, ConfigDiagnosis, SourceRetention, Verdict, VerifyResult
from .security import redact

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
VERDICT_STYLE = {
    Verdict.HIGHLY_COMPATIBLE: "bold green", Verdict.COMPATIBLE: "green",
    Verdict.RISKY: "yellow", Verdict.INCOMPATIBLE: "bold red",
}

Command = Callable[[argparse.Namespace, Console], int]
T = TypeVar("T")


READ_BASE_HELP = ("LoRA adapters of one base: read the whole base, for exact weight-space metrics, their spectra and "
                  "task_drift (by default: the factors and a seeded sample of its rows)")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergelens", description="Should I merge these models, and how? Answered before the merge runs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare", help="compare two or more checkpoints, optionally against their base")
    compare.add_argument("models", nargs="+", help="checkpoint folders, .safetensors files or Hub ids (2 or more)")
    compare.add_argument("--base", help="the base model the candidates were fine-tuned from")
    compare.add_argument("--json", type=Path, help="write the full result as JSON here")
    compare.add_argument("--report", type=Path, help="write the interactive HTML report here")
    compare.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    compare.add_argument("--layers", type=int, default=40, help="rows of the per-layer table (0: none)")
    compare.add_argument("--activations", action="store_true",
                         help="also run the models on a probe set and add activation CKA (needs transformers)")
    compare.add_argument("--read-base", action="store_true", help=READ_BASE_HELP)
    compare.add_argument("--overwrite", action="store_true",
                         help="replace a --report file even if it is not a mergelens report")
    compare.set_defaults(run=run_compare)

    serve = sub.add_parser("serve", help="run the MCP server (stdio for Claude Code / Cursor, or HTTP / SSE)")
    serve.add_argument("--transport", choices=("stdio", "http", "sse"), default="stdio",
                       help="stdio (default), streamable HTTP at /mcp, or SSE at /sse")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind for http / sse")
    serve.add_argument("--port", type=int, default=8000, help="port for http / sse")
    serve.add_argument("--allow-dir", action="append", type=Path, metavar="DIR",
                       help="a folder the server may read models from (repeatable; default: cwd)")
    serve.add_argument("--output-dir", type=Path, metavar="DIR",
                       help="where generate_report writes HTML (default: the first allowed folder)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"),
                       help="where the tools measure tensors (default: MERGELENS_DEVICE, else auto)")
    serve.add_argument("--auth-token-file", type=Path, metavar="FILE",
                       help="a file holding the bearer token HTTP clients must send (or set "
                            "MERGELENS_AUTH_TOKEN); required to bind anything but 127.0.0.1")
    serve.set_defaults(run=run_serve)

    diagnose = sub.add_parser("diagnose", help="check a mergekit YAML before merging, and simulate it")
    diagnose.add_argument("--config", required=True, help="the mergekit .yaml file")
    diagnose.add_argument("--json", type=Path, help="write the full diagnosis as JSON here")
    diagnose.add_argument("--base", help="the models' common base, when the YAML names none (linear, slerp): "
                                         "then the simulation sees whether the fine-tunes' changes cancel")
    diagnose.set_defaults(run=run_diagnose)

    preview = sub.add_parser("preview", help="merge candidates in memory and measure them on probe inputs")
    preview.add_argument("models", nargs="+", help="the models to merge (2 or more)")
    preview.add_argument("--base", help="the base model they were fine-tuned from")
    preview.add_argument("--methods", nargs="+", metavar="METHOD",
                         help="merge methods to preview (default: the recommended one, its runner-up and linear)")
    preview.add_argument("--config", nargs="+", metavar="YAML", dest="configs",
                         help="your candidate mergekit configs of these models, previewed as written (with only "
                              "--config the weights are not compared first)")
    preview.add_argument("--probe", help="probe file: text lines, or JSONL {text} / {prompt, completion} records "
                                         "with an optional source (default: the shipped generic probes)")
    preview.add_argument("--random-seed", type=int, default=0, metavar="S",
                         help="draw DARE/della masks as `mergekit-yaml --random-seed S` will (default 0)")
    preview.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    preview.add_argument("--json", type=Path, help="write the full result as JSON here")
    preview.add_argument("--report", type=Path, help="write the HTML report (comparison + preview) here")
    preview.add_argument("--overwrite", action="store_true",
                         help="replace a --report file even if it is not a mergelens report")
    preview.set_defaults(run=run_preview)

    verify = sub.add_parser("verify", help="check a written merge against its sources, its config and on probes")
    verify.add_argument("merged", help="the merged model")
    verify.add_argument("--sources", nargs="+", required=True, help="the models that were merged")
    verify.add_argument("--base", help="the base model of the task vectors")
    verify.add_argument("--config", help="the mergekit .yaml the merge was made with")
    verify.add_argument("--probe", help="probe file (as for preview)")
    verify.add_argument("--weights-only", action="store_true", help="skip the probe comparison")
    verify.add_argument("--random-seed", type=int, default=0, metavar="S",
                        help="the `mergekit-yaml --random-seed` the merge was made with (default 0)")
    verify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    verify.add_argument("--json", type=Path, help="write the full result as JSON here")
    verify.set_defaults(run=run_verify)

    report = sub.add_parser("report", help="compare checkpoints and write the interactive HTML report")
    report.add_argument("models", nargs="+", help="checkpoint folders, .safetensors files or Hub ids (2+)")
    report.add_argument("--base", help="the base model the candidates were fine-tuned from")
    report.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    report.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    report.add_argument("--read-base", action="store_true", help=READ_BASE_HELP)
    report.add_argument("--overwrite", action="store_true",
                        help="replace the output file even if it is not a mergelens report")
    report.set_defaults(run=run_report)

    zoo = sub.add_parser("zoo", help="which of these N models to merge: every model read once into a sketch")
    zoo.add_argument("models", nargs="+", help="model folders, .safetensors files or Hub ids, or one folder of them")
    zoo.add_argument("--base", help="the base model they were fine-tuned from")
    zoo.add_argument("--target", help="rank the best partners of this model (its path or name)")
    zoo.add_argument("--top", type=int, default=5, help="best sets to list (default 5)")
    zoo.add_argument("--set-size", type=int, default=3, help="the largest set of models to consider (default 3)")
    zoo.add_argument("--exact-top", type=int, default=0,
                     help="recompute the best N pairs exactly with compare, and the top set's YAML")
    zoo.add_argument("--ray", metavar="auto|ADDRESS", help="draw the sketches on a Ray cluster (extra [distributed])")
    zoo.add_argument("--workers", type=int, help="local sketching processes (default: up to 2)")
    zoo.add_argument("--cache-dir", type=Path, help="the sketch cache (default ~/.cache/mergelens/sketches)")
    zoo.add_argument("--json", type=Path, help="write the full result as JSON here")
    zoo.add_argument("--report", type=Path, help="write the HTML zoo view (pair matrix, best sets) here")
    zoo.add_argument("--overwrite", action="store_true", help="replace a --report file that is not a report")
    zoo.set_defaults(run=run_zoo)
    return parser


def run_zoo(args: argparse.Namespace, console: Console) -> int:
    from .zoo import compare_zoo

    _check_report(args)
    result = _with_progress(console, "sketching", lambda progress: compare_zoo(
        args.models, args.base, target=args.target, top=args.top, set_size=args.set_size,
        exact_top=args.exact_top, ray=args.ray, workers=args.workers, cache_dir=args.cache_dir, progress=progress,
    ))
    out = Console()
    table = Table(title="Best sets" + (f" with {result.target}" if result.target else ""))
    for col in ("models", "MCI (weakest pair)", "bound", "verdict"):
        table.add_column(col)
    for s in result.best_sets:
        table.add_row(", ".join(s.models), f"{s.mci:.1f}", f">= {s.mci_low:.1f}", s.verdict.value)
    out.print(table)
    pairs = Table(title="Pairs (estimated from sketches)")
    for col in ("model", "model", "MCI", "range", "cosine", "verdict"):
        pairs.add_column(col)
    for p in result.pairs[:20]:
        pairs.add_row(p.model_a, p.model_b, f"{p.mci:.1f}", f"{p.mci_low:.1f}-{p.mci_high:.1f}",
                      f"{p.cosine:.4f}+-{p.cosine_bound:.4f}", p.verdict.value)
    out.print(pairs)
    for title, groups in (("near-duplicates", result.near_duplicates), ("compatible groups", result.clusters)):
        for g in groups:
            out.print(f"{title}: {', '.join(g)}", markup=False, highlight=False)
    if result.strategy is not None:
        out.print(result.strategy.mergekit_yaml, markup=False, highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False, style="dim")
    _write_json(args, result, console)
    if args.report:
        from .report import write_zoo_report

        write_zoo_report(result, args.report, overwrite=args.overwrite)
        console.print(f"report written to {args.report}")
    return EXIT_OK


def run_diagnose(args: argparse.Namespace, console: Console) -> int:
    """Exit 0 when no error-level finding, 1 when there is one, 2 on unreadable input."""
    from .service import diagnose

    path = Path(args.config)
    if not path.is_file():
        raise InputError(f"--config {args.config!r} is not a file; pass the YAML you give mergekit-yaml")
    result = _with_progress(console, "simulating", lambda progress: isolated(diagnose, str(path), progress=progress,
                                                                          base=args.base))
    out = Console()
    status = "[bold green]valid[/]" if result.valid else "[bold red]will fail[/]"
    out.print(f"\n[bold]mergekit config:[/] {path}  merge_method: {result.merge_method or '?'}  {status}")
    for f in result.findings:
        where = f" at {f.path}" if f.path else ""
        out.print(f"[{f.level.value}]{where}: {f.message}" + (f"\n    fix: {f.fix}" if f.fix else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if not result.findings:
        out.print("No findings.")
    if result.overall_interference is not None:
        out.print(f"[bold]Simulated interference:[/] {result.overall_interference:.3f} (0 = nothing lost)")
        _interference_table(result, out)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False, style="dim")
    _write_json(args, result, console)
    return EXIT_OK if result.valid else EXIT_FAILED


def run_preview(args: argparse.Namespace, console: Console) -> int:
    from .probe import preview_with_comparison

    if len(args.models) < 2:
        raise InputError("preview needs at least two models to merge")
    _check_report(args)
    if args.report and args.configs and not args.methods:
        raise InputError("--report shows the weight comparison, which --config alone skips: add --methods "
                         "(e.g. --methods linear) or leave --report out")
    result, comparison = _with_progress(console, "previewing", lambda progress: isolated(
        preview_with_comparison, args.models, args.base, methods=args.methods, configs=args.configs,
        probe=args.probe, device=args.device, progress=progress, random_seed=args.random_seed))
    out = Console()
    out.print(f"\n[bold]Preview[/] on {result.probes} probes ({result.probe_set}), {result.kind}: "
              f"best [bold]{result.best}[/]")
    table = Table("rank", "method", "retention", *(s.source for s in result.methods[0].sources)
                  if result.methods else ())
    for m in result.methods:
        table.add_row(str(m.rank), m.method, f"{m.retention:.4f}", *(_retention_cell(s) for s in m.sources))
    out.print(table)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False, style="dim")
    _write_json(args, result, console)
    if args.report and comparison is not None:
        from .report import write_report

        write_report(comparison, args.report, overwrite=args.overwrite, preview=result)
        console.print(f"report written to {args.report}")
    return EXIT_OK


def run_verify(args: argparse.Namespace, console: Console) -> int:
    """Exit 0 for ok or warning, 1 for a failed merge, 2 on unreadable input."""
    from .probe import verify_merge

    result: VerifyResult = _with_progress(console, "verifying", lambda progress: isolated(
        verify_merge, args.merged, args.sources, args.base, config=args.config, probe=args.probe,
        behaviour=False if args.weights_only else None, device=args.device, progress=progress,
        random_seed=args.random_seed))
    out = Console()
    style = {"ok": "bold green", "warning": "yellow", "failed": "bold red"}[result.verdict]
    out.print(f"\n[bold]Verdict:[/] [{style}]{result.verdict}[/]")
    for reason in result.reasons:
        out.print(f"  - {reason}", markup=False, highlight=False, soft_wrap=True)
    for step in result.next_steps:
        out.print(f"  try: {step}", markup=False, highlight=False, soft_wrap=True)
    table = Table("layer", *result.layers[0].coefficients if result.layers else (), "residual", "matches",
                  "vs config")
    for lm in result.layers:
        table.add_row(lm.layer_name, *(f"{c:.3f}" for c in lm.coefficients.values()), f"{lm.residual:.3f}",
                      lm.matches, "-" if lm.config_error is None else f"{lm.config_error:.3f}")
    out.print(table)
    if result.behaviour:
        probes = Table("source", "retention", "merged ppl", "source ppl", "KL", "agreement")
        for s in result.behaviour:
            probes.add_row(s.source, f"{s.retention:.4f}", _num(s.perplexity), _num(s.source_perplexity),
                           _num(s.kl), _num(s.agreement))
        out.print(probes)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False, style="dim")
    _write_json(args, result, console)
    return EXIT_FAILED if result.verdict == "failed" else EXIT_OK


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _retention_cell(s: SourceRetention) -> str:
    return f"{s.retention:.4f}" + (f" (ppl {s.perplexity:.3g})" if s.perplexity is not None else "")


def run_compare(args: argparse.Namespace, console: Console) -> int:
    from .service import compare, labelled

    if len(args.models) < 2:
        raise InputError("compare needs at least two models")
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"--json {args.json}: the folder {args.json.parent} does not exist; create it first")
    _check_report(args)
    result = _with_progress(
        console, "reading tensors",
        lambda progress: isolated(compare, args.models, args.base, device=args.device, progress=progress,
                                  activations=args.activations, read_base=args.read_base,
                                  about=labelled(args.models, args.base)),
    )
    print_result(result, Console(), max_layers=args.layers)
    _write_json(args, result, console)
    if args.report:
        from .report import write_report

        write_report(result, args.report, overwrite=args.overwrite)
        console.print(f"report written to {args.report}")
    return EXIT_OK


def run_serve(args: argparse.Namespace, console: Console) -> int:
    from .analysis.types import Device
    from .server import endpoint, run
    from .settings import Settings

    overrides: dict[str, object] = {}
    if args.allow_dir:
        overrides["allowed_roots"] = args.allow_dir
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.device:
        overrides["device"] = args.device
    settings = Settings(**overrides)  # type: ignore[arg-type]
    Device.parse(settings.device)  # refused at start-up, not at the first tool call: cuda needs a GPU
    token = read_token_file(args.auth_token_file) if args.auth_token_file else None
    if args.transport != "stdio":
        url = endpoint(args.transport, args.host, args.port)
        roots = ", ".join(str(r) for r in settings.roots)
        console.print(redact.redact(f"mergelens MCP server ({args.transport}) on {url}; models under {roots}"),
                      markup=False, highlight=False)
    run(args.transport, args.host, args.port, settings, auth_token=token)
    if args.transport == "stdio" and args.process_exit:  # the client closed stdin: be gone at once, not after
        logging.shutdown()  # a second or more of torch's teardown (every worker is already stopped, nothing
        sys.stdout.flush()  # is left to save). Only as the `mergelens` process: a caller of main() gets a code.
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _check_report(args: argparse.Namespace) -> None:
    """Refuse a `--report` target that cannot be written before any tensor is read."""
    if args.report:
        from .report import check_output

        check_output(args.report, overwrite=args.overwrite)


def _write_json(args: argparse.Namespace, result: BaseModel, console: Console) -> None:
    """The result as indented JSON where `--json` asks for it."""
    if args.json:
        args.json.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        console.print(f"JSON written to {args.json}")


def read_token_file(path: Path) -> str:
    """The bearer token in `path` (surrounding whitespace ignored)."""
    try:
        token = path.expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--auth-token-file {str(path)!r} cannot be read ({type(exc).__name__})") from None
    if not token:
        raise InputError(f"--auth-token-file {str(path)!r} is empty")
    return token


def run_report(args: argparse.Namespace, console: Console) -> int:
    from .service import generate_report, labelled
    from .settings import Settings

    if len(args.models) < 2:
        raise InputError("report needs at least two models")
    path, result = _with_progress(
        console, "reading tensors",
        lambda progress: isolated(
            generate_report, args.models, args.base, args.output.expanduser().resolve(),
            settings=Settings(device=args.device), overwrite=args.overwrite, read_base=args.read_base,
            progress=progress,
            about=labelled(args.models, args.base),
        ),
    )
    print_result(result, Console(), max_layers=0)
    console.print(f"report written to {path}")
    return EXIT_OK


def isolated(fn: Callable[..., T], *args: object, progress: Callable[[int, int, str], None],
             about: dict[str, str] | None = None, **kwargs: object) -> T:
    """`fn(*args, **kwargs)` in one worker process (see workers.py): a checkpoint truncated or replaced while
    it is read (SIGBUS), or a native crash, ends that worker and becomes a clear error here (exit 2), where
    in this process it would kill the CLI with exit 135. MERGELENS_WORKER_PROCESSES=0 runs it in-process."""
    from .settings import Settings
    from .workers import run_isolated, worker_pool

    pool = worker_pool(Settings(), size=1)
    with pool or contextlib.nullcontext():
        return run_isolated(pool, fn, *args, progress=progress, about=about, **kwargs)


def _interference_table(result: ConfigDiagnosis, console: Console) -> None:
    models = list(dict.fromkeys(m for layer in result.layers for m in layer.survival))
    table = Table(title="Per layer")
    table.add_column("layer")
    table.add_column("interference", justify="right")
    optional = {"sign conflict": "sign_conflict", "SLERP linear share": "slerp_linear_share"}
    shown = {title: key for title, key in optional.items()
             if any(getattr(layer, key) is not None for layer in result.layers)}
    for title in shown:
        table.add_column(title, justify="right")
    for m in models:
        table.add_column(f"kept: {Path(m).name or m}", justify="right")
    for layer in result.layers:
        cells = [layer.layer_name, f"{layer.interference:.3f}"]
        for key in shown.values():
            value = getattr(layer, key)
            cells.append("-" if value is None else f"{value:.3f}")
        cells.extend(f"{layer.survival[m]:.0%}" if m in layer.survival else "-" for m in models)
        table.add_row(*cells)
    console.print(table)


def _with_progress(console: Console, label: str, job: Callable[[Callable[[int, int, str], None]], object]):  # type: ignore[no-untyped-def]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int, message: str) -> None:
            shown = redact.redact(message)[-60:]  # tensor names come from untrusted headers
            bar.update(task, completed=done, total=total, description=f"{label}: {shown}")

        return job(progress)


def print_result(result: CompareResult, console: Console, max_layers: int = 40) -> None:
    mci = result.mci
    score = "n/a" if mci.score is None else f"{mci.score:.1f}/100"
    style = VERDICT_STYLE[mci.verdict]
    if result.answer:
        console.print(f"\n{result.answer}", markup=False, highlight=False, style="bold", soft_wrap=True)
    console.print(f"\n[bold]Merge Compatibility Index:[/] [{style}]{score}  {mci.verdict.value.replace('_', ' ')}[/]"
                  f"  (confidence: {mci.confidence})")
    source = mci_source(result)
    if source is not None and mci.composite is not None:
        composite = "" if mci.score == mci.composite else \
            f"; the weight-space composite (the layer scores' scale) is {mci.composite:.1f}"
        console.print(f"  = {source}{composite}", markup=False, highlight=False)
    for reason in mci.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)
    if result.predictions:
        console.print("[bold]Predicted retention[/] (merged accuracy / each model's own, 80% interval): " + ", ".join(
            f"{m} {p.retention:.2f} ({p.low:.2f}-{p.high:.2f})"
            for m, p in sorted(result.predictions.items(), key=lambda kv: -kv[1].retention)), highlight=False)
    if len(result.pairwise) > 1:
        table = Table(title="Pairs")
        for col in ("model", "model", "MCI", "verdict"):
            table.add_column(col)
        for pair in result.pairwise:
            table.add_row(pair.model_a, pair.model_b, "n/a" if pair.score is None else f"{pair.score:.1f}",
                          pair.verdict.value)
        console.print(table)
    for f in result.findings:
        console.print(f"[{f.level.value}] {f.message}" + (f"\n    fix: {f.fix}" if f.fix else ""),
                      markup=False, highlight=False)
    if max_layers and result.layer_metrics:
        _layer_table(result, console, max_layers)
    if result.conflict_zones:
        console.print("[bold]Conflict zones[/]")
        for z in result.conflict_zones:
            console.print(f"  [{z.severity.value}] {z.model_a} + {z.model_b}: {z.recommendation}",
                          markup=False, highlight=False)
    else:
        console.print("No conflict zones.")
    if result.strategy is not None:
        s = result.strategy
        runner_up = f", runner-up {s.runner_up.value}" if s.runner_up else ""
        console.print(f"[bold]Recommended merge:[/] {s.method.value} "
                      f"(confidence {s.confidence:.2f}{runner_up})")
        for line in [*s.rationale, *(f"warning: {w}" for w in s.warnings)]:
            console.print(f"  - {line}", markup=False, highlight=False)
        console.print(s.mergekit_yaml, markup=False, highlight=False, soft_wrap=True)
        if s.peft_snippet:
            console.print("[bold]Or merge the adapters with PEFT:[/]")
            console.print(s.peft_snippet, markup=False, highlight=False, soft_wrap=True)  # code: never wrapped
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False, style="dim")


def _layer_table(result: CompareResult, console: Console, max_layers: int) -> None:
    columns = {"cosine_similarity": "cos", "l2_distance": "L2", "spectral_overlap": "subspace",
               "task_cosine": "task cos", "sign_disagreement": "sign conflict", "tsv_interference": "TSV"}
    present = [c for c in columns if any(c in lm.metrics for lm in result.layer_metrics)]
    table = Table(title="Per layer (first pair)" if len(result.pairwise) > 1 else "Per layer")
    table.add_column("layer")
    for c in present:
        table.add_column(columns[c], justify="right")
    table.add_column("score", justify="right")
    first = result.pairwise[0]
    rows = [lm for lm in result.layer_metrics if (lm.model_a, lm.model_b) == (first.model_a, first.model_b)]
    for lm in rows[:max_layers]:
        table.add_row(lm.layer_name, *(f"{lm.metrics[c]:.3f}" if c in lm.metrics else "-" for c in present),
                      f"{lm.score:.1f}")
    console.print(table)
    if len(rows) > max_layers:
        console.print(f"... {len(rows) - max_layers} more layers (see --json or --report)")


def run() -> None:
    """The `mergelens` command (and `python -m mergelens_mcp`): `main` as the whole process."""
    raise SystemExit(main(process_exit=True))


def main(argv: Sequence[str] | None = None, *, process_exit: bool = False) -> int:
    """The CLI; returns its exit code. `process_exit`: this call is the whole process, so a stdio server may
    end it at once when the client closes stdin."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.process_exit = process_exit
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    redact.install()
    err = Console(stderr=True)
    try:
        return args.run(args, err)
    except (InputError, MergeLensError) as exc:
        err.print(f"error: {redact.redact(str(exc))}", markup=False, highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # the CLI's top level: report, never a bare traceback
        logging.getLogger("mergelens").debug("unexpected failure", exc_info=True)
        message = redact.redact(str(exc))
        err.print(f"error: unexpected {type(exc).__name__}: {message} (run with -v for details)",
                  markup=False, highlight=False)
        return EXIT_FAILED
