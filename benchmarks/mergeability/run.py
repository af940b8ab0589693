"""Run the mergeability benchmark: train, merge every cross-task pair, score it, correlate.

    python -m benchmarks.mergeability.run --out .bench/mergeability
    python -m benchmarks.mergeability.run --tasks copy,add --steps 60,40 --lrs 2e-3 --out /tmp/smoke

Checkpoints, merge outcomes and MCI scores are cached in --out; rerunning with the same settings only redoes
what is missing or was made with other merge parameters (`--rescore` recomputes the MCI after a change to
mergelens; delete outcomes.json after a change to merge.py that keeps the parameters).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from .lora import is_adapter, merged_state, save_adapter
from .merge import METHODS, MergeSpec, merge_states, spec_from_strategy
from .model import build_model, load_checkpoint, load_config, load_state, save_checkpoint
from .stats import (
    additive_residuals,
    fit_ridge,
    hit_rate,
    leave_one_group_out,
    mean,
    pearson,
    spearman,
    within_group_spearman,
)
from .tasks import PRETRAIN_TASKS, TASKS, TestSet, accuracy, make_test_set
from .train import finetune, finetune_lora, pretrain

PEER_PYTHON = Path(".bench/peer-venv/bin/python")
FULL_LRS = "1e-3,2e-3"
LORA_LRS = "3e-3,5e-3"  # rank 8: add (the hardest new skill) reached 1.00 / 0.985 at these, 0.00 at 1e-2
LORA_RANK = 8
TOLERANCE = 0.02  # "within 2 points" of the best method, on the 0-1 normalized-accuracy scale


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mergeability.run", description=__doc__)
    parser.add_argument("--tasks", default=",".join(TASKS), help="tasks to fine-tune on (comma-separated)")
    parser.add_argument("--pretrain-tasks", default=",".join(PRETRAIN_TASKS), help="tasks of the base model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="1800,1000", help="PRETRAIN,FINETUNE optimizer steps")
    parser.add_argument("--lrs", default=None,
                        help=f"fine-tuning learning rates (comma-separated; default {FULL_LRS} for full fine-tunes, "
                             f"{LORA_LRS} for LoRA)")
    parser.add_argument("--finetune", choices=("full", "lora"), default="full",
                        help="full fine-tunes, or LoRA adapters (PEFT files) on every decoder linear module")
    parser.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank r (with --finetune lora)")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA alpha (scale = alpha / r; default 2 r, with --finetune lora)")
    parser.add_argument("--methods", default=",".join(METHODS), help="merge methods (comma-separated)")
    parser.add_argument("--hidden", type=int, default=64, help="model width (MLP width scales with it)")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fine-tunes trained and pairs merged at once, one process and one thread each (same "
                             "results as --jobs 1)")
    parser.add_argument("--test-size", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--min-acc", type=float, default=0.9, help="drop fine-tunes below this on their task")
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, cache and results")
    parser.add_argument("--rescore", action="store_true", help="recompute the MCI of every pair")
    parser.add_argument("--no-score", action="store_true", help="skip the MCI (train, merge, baselines)")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON,
                        help="python of a venv with mergelens 2.0.3 (`make bench-peer`); with --rescore, its MCI "
                             "of every pair is added as `peer_mci`")
    args = parser.parse_args(argv)
    args.tasks = _names(args.tasks, TASKS, "--tasks")
    args.pretrain_tasks = _names(args.pretrain_tasks, TASKS, "--pretrain-tasks")
    args.methods = _names(args.methods, tuple(METHODS), "--methods")
    pre, _, ft = args.steps.partition(",")
    args.pretrain_steps, args.finetune_steps = int(pre), int(ft or pre)
    lrs = args.lrs or (LORA_LRS if args.finetune == "lora" else FULL_LRS)
    args.lrs = [float(v) for v in lrs.split(",") if v]
    if args.jobs <= 0:
        raise SystemExit(f"--jobs must be a positive integer, got {args.jobs}")
    if args.lora_rank <= 0:
        raise SystemExit(f"--lora-rank must be a positive integer, got {args.lora_rank}")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    return args


def _names(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown or missing {unknown or text!r}; choose from {', '.join(known)}")
    return names


def settings_of(args: argparse.Namespace) -> dict:
    """What the checkpoints depend on; a cache made with other settings is not reused."""
    settings = {
        "tasks": args.tasks,
        "pretrain_tasks": args.pretrain_tasks,
        "seed": args.seed,
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "lrs": args.lrs,
        "test_size": args.test_size,
    }
    # the model's size is named only when it is not the default, so caches made before the flags stay valid
    if (args.hidden, args.layers) != (64, 2):
        settings |= {"hidden": args.hidden, "layers": args.layers}
    if args.finetune == "lora":  # likewise: named only for LoRA runs
        settings |= {"finetune": "lora", "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    return settings


def base_settings(settings: dict) -> dict:
    """The part of a run's settings the base model depends on (every task's test set is held out of training)."""
    return {
        "pretrain_tasks": settings["pretrain_tasks"],
        "held_out_tasks": sorted(set(settings["tasks"]) | set(settings["pretrain_tasks"])),
        "seed": settings["seed"],
        "pretrain_steps": settings["pretrain_steps"],
        "test_size": settings["test_size"],
        "hidden": settings.get("hidden", 64),
        "layers": settings.get("layers", 2),
    }


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def relative(merged: float, finetuned: float) -> float:
    """Merged accuracy as a share of the fine-tune's own (0 when the fine-tune never learned its task)."""
    return merged / finetuned if finetuned > 0 else 0.0


def finetune_name(task: str, lr: float) -> str:
    return f"{task}-lr{lr:g}"


def train_checkpoints(args: argparse.Namespace, tests: dict[str, TestSet]) -> dict:
    """Train (or reuse) the base and every fine-tune; returns the manifest with paths and accuracies.

    The manifest is written after each checkpoint, so an interrupted run resumes where it stopped; a base
    made with the same base settings (`base_settings`) is reused even when the fine-tunes' settings differ
    (a LoRA run next to a full run's checkpoints, or copied from one).
    """
    manifest_path = args.out / "checkpoints.json"
    settings = settings_of(args)
    old = read_json(manifest_path) or {}
    folder = args.out / "checkpoints"
    held_out = list(tests.values())
    names = [finetune_name(task, lr) for task in args.tasks for lr in args.lrs]
    same = old.get("settings") == settings
    if same and all(n in old["finetunes"] for n in names):
        log(f"reusing {len(old['finetunes'])} fine-tunes from {manifest_path}")
        return old
    if old.get("settings") and base_settings(old["settings"]) == base_settings(settings) \
            and (folder / "base" / "model.safetensors").exists():
        log(f"reusing the base of {manifest_path} (same base settings)")
        base_entry = old["base"] | {"path": str(folder / "base")}
    else:
        started = time.perf_counter()
        base = pretrain(args.pretrain_tasks, args.seed, args.pretrain_steps, held_out, hidden=args.hidden,
                        layers=args.layers)
        base_seconds = time.perf_counter() - started
        save_checkpoint(base, folder / "base")
        base_entry = {"path": str(folder / "base"), "accuracy": {t: accuracy(base, tests[t]) for t in tests},
                      "seconds": round(base_seconds, 1)}
        log(f"base: {base_seconds:.0f}s, accuracy {base_entry['accuracy']}")
        same = False
    manifest = {"settings": settings, "base": base_entry, "finetunes": dict(old["finetunes"]) if same else {}}
    write_json(manifest_path, manifest)
    jobs = [{"name": name, "task": task, "lr": lr, "kind": args.finetune, "base": base_entry["path"],
             "folder": str(folder / name), "steps": args.finetune_steps, "seed": args.seed,
             "rank": args.lora_rank, "alpha": args.lora_alpha, "tests": tests}
            for task in args.tasks for lr in args.lrs
            if (name := finetune_name(task, lr)) not in manifest["finetunes"]]
    for entry in run_jobs(train_finetune, jobs, args.jobs):
        _record(manifest, manifest_path, entry)
    return manifest


def train_finetune(job: dict) -> dict:
    """Train one fine-tune of the base in `job["base"]` (full, or LoRA saved as a PEFT adapter) and measure it."""
    torch.set_num_threads(1)
    base_folder = Path(job["base"])
    base = load_checkpoint(base_folder)
    tests = job["tests"]
    held_out = list(tests.values())
    started = time.perf_counter()
    if job["kind"] == "lora":
        tuned = finetune_lora(base, job["task"], job["lr"], job["steps"], job["seed"], held_out, job["rank"],
                              job["alpha"])
        seconds = time.perf_counter() - started
        path = save_adapter(tuned, Path(job["folder"]), base_folder, job["rank"], job["alpha"])
        model = build_model(base.config, merged_state(load_state(base_folder), path))  # what a merge reads
    else:
        model = finetune(base, job["task"], job["lr"], job["steps"], job["seed"], held_out)
        seconds = time.perf_counter() - started
        path = save_checkpoint(model, Path(job["folder"]))
    return {"name": job["name"], "task": job["task"], "lr": job["lr"], "path": str(path),
            "accuracy": {t: accuracy(model, tests[t]) for t in tests}, "seconds": round(seconds, 1)}


def _record(manifest: dict, path: Path, entry: dict) -> None:
    name = entry.pop("name")
    manifest["finetunes"][name] = entry
    write_json(path, manifest)
    log(f"{name}: {entry['seconds']:.0f}s, own-task accuracy {entry['accuracy'][entry['task']]:.3f}")


def finetune_state(path: Path, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fine-tune's full state dict: its checkpoint, or base + (B @ A) * scale for a LoRA adapter folder."""
    return merged_state(base_state, path) if is_adapter(path) else load_state(path)


def kept_finetunes(manifest: dict, min_acc: float) -> list[str]:
    return sorted(n for n, f in manifest["finetunes"].items() if f["accuracy"][f["task"]] >= min_acc)


def cross_task_pairs(manifest: dict, names: list[str]) -> list[tuple[str, str]]:
    ft = manifest["finetunes"]
    return [(a, b) for a, b in itertools.combinations(names, 2) if ft[a]["task"] != ft[b]["task"]]


def task_vector_stats(base: dict, a: dict, b: dict) -> dict[str, float]:
    """L2 norms of both task vectors, their distance and cosine, over all tensors."""
    ta = torch.cat([(a[k] - base[k]).flatten() for k in base])
    tb = torch.cat([(b[k] - base[k]).flatten() for k in base])
    na, nb = float(ta.norm()), float(tb.norm())
    return {
        "norm_a": na,
        "norm_b": nb,
        "distance": float((ta - tb).norm()),
        "cosine": float(ta @ tb) / max(na * nb, 1e-12),
    }


def evaluate_pairs(args: argparse.Namespace, manifest: dict, pairs: list[tuple[str, str]],
                   tests: dict[str, TestSet]) -> dict[str, dict]:
    """Merge each pair with each method and measure both tasks; cached per pair and method (`--jobs` pairs at
    once, one process each)."""
    cache_path = args.out / "outcomes.json"
    cache = read_json(cache_path) or {}
    if cache.get("settings") != settings_of(args):
        cache = {"settings": settings_of(args), "pairs": {}}
    jobs = []
    for a, b in pairs:
        entry = cache["pairs"].setdefault(f"{a}|{b}", {"merged": {}})
        todo = [m for m in args.methods if entry["merged"].get(m, {}).get("spec") != METHODS[m].describe()]
        jobs.append(pair_job(manifest, tests, a, b, {m: METHODS[m] for m in todo}, args.seed))
    started = time.perf_counter()
    for i, done in enumerate(run_jobs(evaluate_pair, jobs, args.jobs)):
        entry = cache["pairs"][done["key"]]
        entry["tv"] = done["tv"]
        entry["merged"].update({m: {"spec": METHODS[m].describe(), **v} for m, v in done["merged"].items()})
        if (i + 1) % 10 == 0 or i + 1 == len(pairs):
            write_json(cache_path, cache)
            log(f"merged {i + 1}/{len(pairs)} pairs ({time.perf_counter() - started:.0f}s)")
    write_json(cache_path, cache)
    return {f"{a}|{b}": cache["pairs"][f"{a}|{b}"] for a, b in pairs}


def pair_job(manifest: dict, tests: dict[str, TestSet], a: str, b: str, merges: dict[str, MergeSpec],
             seed: int) -> dict:
    """What `evaluate_pair` needs to merge fine-tunes `a` and `b` by each of `merges` ({label: spec})."""
    ft = manifest["finetunes"]
    return {"key": f"{a}|{b}", "base": manifest["base"]["path"], "a": ft[a], "b": ft[b], "merges": merges,
            "seed": seed, "tests": {t: tests[t] for t in (ft[a]["task"], ft[b]["task"])}}


def evaluate_pair(job: dict) -> dict:
    """One pair's task-vector statistics and its merges by `job["merges"]`, each measured on both tasks."""
    torch.set_num_threads(1)
    base_folder = Path(job["base"])
    base_state, config = load_state(base_folder), load_config(base_folder)
    fa, fb = job["a"], job["b"]
    state_a, state_b = finetune_state(Path(fa["path"]), base_state), finetune_state(Path(fb["path"]), base_state)
    ta, tb = fa["task"], fb["task"]
    out: dict = {"key": job["key"], "tv": task_vector_stats(base_state, state_a, state_b), "merged": {}}
    for label, spec in job["merges"].items():
        merged = merge_states(spec, base_state, state_a, state_b, seed=job["seed"])
        model = build_model(config, merged)
        acc_a, acc_b = accuracy(model, job["tests"][ta]), accuracy(model, job["tests"][tb])
        out["merged"][label] = {
            "acc_a": acc_a,
            "acc_b": acc_b,
            "normalized": (relative(acc_a, fa["accuracy"][ta]) + relative(acc_b, fb["accuracy"][tb])) / 2,
        }
    return out


def run_jobs(function: Callable[[dict], dict], jobs: list[dict], processes: int) -> Iterator[dict]:
    """`function` of each job, in this process or in `processes` spawned ones (results in completion order).

    Every job is seeded on its own and runs one torch thread, so its result does not depend on where it ran.
    """
    if processes <= 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(function, job) for job in jobs]):
            yield future.result()


def evaluate_recommended(args: argparse.Namespace, manifest: dict, scores: dict[str, dict],
                         tests: dict[str, TestSet]) -> dict[str, dict]:
    """Merge each pair exactly as its recommendation says (method and parameters) and measure it; cached."""
    cache_path = args.out / "outcomes.json"
    cache = read_json(cache_path)
    labels, jobs = {}, []
    for key, score in scores.items():
        spec = spec_from_strategy(score.get("recommended") or "", score.get("strategy_parameters", {}))
        if spec is None:
            continue
        labels[key] = label = json.dumps({"method": spec.name, **spec.describe()}, sort_keys=True)
        if label not in cache["pairs"][key].setdefault("recommended", {}):
            a, b = key.split("|")
            jobs.append(pair_job(manifest, tests, a, b, {label: spec}, args.seed))
    for done in run_jobs(evaluate_pair, jobs, args.jobs):
        cache["pairs"][done["key"]]["recommended"].update(done["merged"])
    write_json(cache_path, cache)
    return {key: {"spec": label, **cache["pairs"][key]["recommended"][label]} for key, label in labels.items()}


def score_pair(path_a: str, path_b: str, path_base: str) -> dict:
    """The MCI, recommendation and per-layer metrics of a pair, from the public API as a user gets them."""
    from mergelens_mcp import compare_models
    from mergelens_mcp.analysis.predict import best_method

    started = time.perf_counter()
    r = compare_models([str(path_a), str(path_b)], base=str(path_base))
    strategy = r.strategy
    return {
        "version": r.version,
        "mci": r.mci.score,  # 100 x the predicted retention of the recommended method (`mci_method`), or
        "mci_method": r.mci.method,  # None: the weight-space composite
        "composite": r.mci.composite,  # the hand-weighted weight-space composite (the MCI before predictions)
        "verdict": r.mci.verdict.value,
        "confidence": r.mci.confidence,
        "components": dict(r.mci.components),
        "recommended": strategy.method.value if strategy is not None else None,
        "runner_up": strategy.runner_up.value if strategy is not None and strategy.runner_up else None,
        "strategy_parameters": dict(strategy.parameters) if strategy is not None else {},
        "moved": [[m.moved, dict(m.moved_by_layer)] for m in r.models] if all(m.moved is not None for m in r.models)
        else None,
        "task_cosine": r.pairwise[0].task_cosine,
        "layers": [
            {"layer_name": m.layer_name, "n_params": m.n_params, "metrics": dict(m.metrics),
             "components": dict(m.components), "score": m.score}
            for m in r.layer_metrics
        ],
        # the predicted retention per method (compare's `predictions`), and the pick the product derives from it
        "predictions": {m: p.retention for m, p in r.predictions.items()},
        "prediction_intervals": {m: [p.low, p.high] for m, p in r.predictions.items()},
        "predicted_best": best_method(r.predictions),
        "adapters": [m.label for m in r.models if m.adapter is not None],
        "seconds": round(time.perf_counter() - started, 2),
    }


def git_commit() -> str | None:
    """The commit of the code at the start of the run, `+dirty` when benchmarks/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks"], capture_output=True,
                               text=True, check=False)
    except OSError:
        return None
    commit = head.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) if commit else None


def api_available() -> bool:
    try:
        from mergelens_mcp import compare_models  # noqa: F401
    except ImportError:
        return False
    return True


def score_pairs(args: argparse.Namespace, manifest: dict, pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """MCI of every pair, cached in scores.json next to the checkpoints."""
    cache_path = args.out / "scores.json"
    cache = read_json(cache_path) or {}
    if args.rescore or cache.get("settings") != settings_of(args):
        cache = {"settings": settings_of(args), "pairs": {}}
    ft = manifest["finetunes"]
    # a pair scored before the MCI followed the predictions (no `composite`) is scored again
    todo = [(a, b) for a, b in pairs if "composite" not in cache["pairs"].get(f"{a}|{b}", {})]
    for i, (a, b) in enumerate(todo):
        cache["pairs"][f"{a}|{b}"] = score_pair(ft[a]["path"], ft[b]["path"], manifest["base"]["path"])
        if (i + 1) % 10 == 0 or i + 1 == len(todo):
            write_json(cache_path, cache)
            log(f"scored {i + 1}/{len(todo)} pairs")
    return {f"{a}|{b}": cache["pairs"][f"{a}|{b}"] for a, b in pairs}


def parse_peer_output(text: str) -> dict:
    """The JSON lines of peer_mci.py as {"version", "scores": {pair: MCI or None}, "risk_tiers": {pair: tier}}."""
    out: dict = {"version": None, "scores": {}, "risk_tiers": {}}
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "version" in row:
            out["version"] = row["version"]
            continue
        score = row["peer_mci"]
        out["scores"][row["key"]] = None if score is None else float(score)
        out["risk_tiers"][row["key"]] = row.get("risk_tier")
    return out


def peer_scores(args: argparse.Namespace, manifest: dict, pairs: list[tuple[str, str]]) -> dict:
    """mergelens 2.0.3's MCI of every pair (parse_peer_output's dict), cached in peer_scores.json.

    Computed only with --rescore (else the cache, if any, answers); empty when --peer-python does not exist.
    """
    cache_path = args.out / "peer_scores.json"
    cache = read_json(cache_path)
    keys = [f"{a}|{b}" for a, b in pairs]
    if not args.rescore:
        return cache or {}
    if not args.peer_python.exists():
        log(f"peer MCI not computed: {args.peer_python} does not exist (`make bench-peer` creates it)")
        return cache or {}
    ft = manifest["finetunes"]
    jobs = {"base": manifest["base"]["path"],
            "pairs": [[f"{a}|{b}", ft[a]["path"], ft[b]["path"]] for a, b in pairs]}
    script = Path(__file__).with_name("peer_mci.py")
    log(f"scoring {len(pairs)} pairs with {args.peer_python} {script.name}")
    started = time.perf_counter()
    done = subprocess.run([str(args.peer_python), str(script)], input=json.dumps(jobs), stdout=subprocess.PIPE,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed ({done.returncode}); its messages are above")
    cache = parse_peer_output(done.stdout)
    missing = [k for k in keys if k not in cache["scores"]]
    if missing:
        raise SystemExit(f"{script.name} gave no score for {len(missing)} pairs, e.g. {missing[0]}")
    cache["seconds"] = round(time.perf_counter() - started, 1)
    write_json(cache_path, cache)
    log(f"peer MCI (mergelens {cache['version']}) of {len(keys)} pairs in {cache['seconds']:.0f}s")
    return cache


def layer_features(score: dict) -> dict[str, float]:
    """Flat `layer/metric` -> value of a pair's per-layer metrics (non-finite values read as 0)."""
    out = {}
    for layer in score.get("layers", []):
        for name, value in layer["metrics"].items():
            out[f"{layer['layer_name']}/{name}"] = value if math.isfinite(value) else 0.0
    return out


def correlate(
    rows: list[dict], predictor: list[float | None], y: list[float], residual: list[float]
) -> dict:
    """Pearson, Spearman, mean within-task Spearman and pairwise Spearman of a predictor against an outcome.

    `residual` is the outcome less its best per-model additive fit (`additive_residuals`); the pairwise
    Spearman is the predictor's rank correlation with it.
    """
    keep = [i for i, p in enumerate(predictor) if p is not None]
    x = [predictor[i] for i in keep]
    yy = [y[i] for i in keep]
    groups = [(rows[i]["task_a"], rows[i]["task_b"]) for i in keep]
    within, per_task = within_group_spearman(groups, x, yy)
    return {"n": len(keep), "pearson": pearson(x, yy), "spearman": spearman(x, yy),
            "within_task_spearman": within, "per_task_spearman": per_task,
            "pairwise_spearman": spearman(x, [residual[i] for i in keep])}


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Every correlation of the report, per merge method."""
    groups = [(r["task_a"], r["task_b"]) for r in rows]
    predictors: dict[str, list[float | None]] = {
        "mci": [r["mci"] for r in rows],
        **({"composite": [r.get("composite") for r in rows]} if any(r.get("composite") is not None for r in rows)
           else {}),
        **({"peer_mci": [r.get("peer_mci") for r in rows]} if any(r.get("peer_mci") is not None for r in rows)
           else {}),
        "norms_only": [-(r["tv"]["norm_a"] + r["tv"]["norm_b"]) for r in rows],
        "tv_distance": [-r["tv"]["distance"] for r in rows],
        "tv_cosine": [r["tv"]["cosine"] for r in rows],
    }
    norm_features = [[r["tv"]["norm_a"] + r["tv"]["norm_b"], abs(r["tv"]["norm_a"] - r["tv"]["norm_b"])]
                     for r in rows]
    keys = sorted({k for r in rows for k in r.get("features", {})})
    layer_rows = [[r.get("features", {}).get(k, 0.0) for k in keys] for r in rows]
    out: dict = {"n_pairs": len(rows), "methods": {}}
    for method in methods:
        y = [r["merged"][method]["normalized"] for r in rows]
        residual = additive_residuals([(r["a"], r["b"]) for r in rows], y)
        table = {name: correlate(rows, p, y, residual) for name, p in predictors.items()}
        predicted = [r.get("score", {}).get("predictions", {}).get(method) for r in rows]
        accuracy_of_predictions = {}
        if any(p is not None for p in predicted):  # compare's predicted retention for this method
            table["predicted"] = correlate(rows, predicted, y, residual)
            scored = [(p, t, r["score"].get("prediction_intervals", {}).get(method))
                      for p, t, r in zip(predicted, y, rows, strict=True) if p is not None]
            accuracy_of_predictions = {
                "predicted_mae": mean([abs(p - t) for p, t, _ in scored]),
                "predicted_interval_coverage": mean([float(i[0] <= t <= i[1]) for _, t, i in scored if i]),
            }
        # fitted predictors, evaluated only on tasks they never saw (leave one task out)
        table["loto_ridge_norms"] = correlate(
            rows, leave_one_group_out(groups, norm_features, y, fit_ridge), y, residual)
        if keys:
            ridge = leave_one_group_out(groups, layer_rows, y, lambda f, t: fit_ridge(f, t, alpha=10.0))
            table["loto_ridge_layer_metrics"] = correlate(rows, ridge, y, residual)
        features = {k: spearman([row[j] for row in layer_rows], y) for j, k in enumerate(keys)}
        out["methods"][method] = {
            "mean_normalized": mean(y),
            "min_normalized": min(y),
            "max_normalized": max(y),
            "additive_share": 1.0 - _variance(residual) / max(_variance(y), 1e-12),
            "predictors": table,
            **accuracy_of_predictions,
            # [layer/metric, Spearman] pairs, strongest first (a list: the JSON is written with sorted keys)
            "feature_spearman": sorted(features.items(), key=lambda kv: -abs(kv[1] or 0.0)),
        }
    outcomes = [{m: r["merged"][m]["normalized"] for m in methods} for r in rows]
    recommended = [r.get("recommended") for r in rows]
    rate, hits, n = hit_rate(recommended, outcomes, TOLERANCE)
    # the recommendation merged with its own parameters, against the best of the fixed-parameter merges
    with_params = [(o | {"recommended": r["recommended_merge"]["normalized"]}) if r.get("recommended_merge")
                   else o for o, r in zip(outcomes, rows, strict=True)]
    asked = ["recommended" if r.get("recommended_merge") else r.get("recommended") for r in rows]
    rate_p, hits_p, n_p = hit_rate(asked, with_params, TOLERANCE)
    picked = [r.get("score", {}).get("predicted_best") for r in rows]
    rate_pred, hits_pred, n_pred = hit_rate(picked, outcomes, TOLERANCE)
    out["recommendation"] = {
        "hit_rate": rate, "hits": hits, "pairs_with_recommendation": n, "tolerance": TOLERANCE,
        "predicted_best_hit_rate": rate_pred, "predicted_best_hits": hits_pred,
        "pairs_with_predictions": n_pred, "predicted_best_counts": _counts(picked),
        "hit_rate_with_its_parameters": rate_p, "hits_with_its_parameters": hits_p,
        "mean_normalized_with_its_parameters": mean([r["recommended_merge"]["normalized"] for r in rows
                                                     if r.get("recommended_merge")]),
        "recommended_counts": _counts(recommended),
        "best_counts": _counts([max(o, key=o.get) for o in outcomes]),
        "fixed_method_hit_rates": {m: hit_rate([m] * len(rows), outcomes, TOLERANCE)[0] for m in methods},
    }
    return out


def evaluate_calibration(rows: list[dict], methods: list[str]) -> dict:
    """Leave-one-task-out figures of the MCI's fitted constants (see calibration.py)."""
    from .calibration import current_constants, grid_scores, leave_one_task_out

    outcomes = {m: [r["merged"][m]["normalized"] for r in rows] for m in methods}
    baselines = {"norms_only": [-(r["tv"]["norm_a"] + r["tv"]["norm_b"]) for r in rows]}
    out = leave_one_task_out(rows, outcomes, grid_scores(rows), baselines)
    out["product_constants"] = current_constants().label()
    return out


def _variance(values: list[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def _counts(values: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items()))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def render_markdown(results: dict) -> str:
    """The report's tables."""
    s = results["summary"]
    lines = [
        f"# Mergeability benchmark ({s['n_pairs']} cross-task pairs)",
        "",
        f"Settings: `{json.dumps(results['settings'])}`;",
        f"MCI from the public API: {results['mci_available']}."
        + (f" `peer_mci` = mergelens {results['peer']['version']}'s MCI of the same pairs."
           if results.get("peer", {}).get("version") else ""),
        "",
        "Outcome: normalized accuracy = merged accuracy / fine-tuned accuracy, averaged over both tasks.",
        "Predictors: `mci` (higher = safer), `norms_only` = -(|tau_a| + |tau_b|),",
        "`tv_distance` = -|tau_a - tau_b|, `tv_cosine` = cos(tau_a, tau_b);",
        "`loto_*` = ridge fits scored only on a task left out of their fit.",
        "",
        "`pairwise` = Spearman with the outcome less its best per-model additive fit",
        "(y_ab ~ mu + e_a + e_b);",
        "`additive share` = the outcome variance that per-model effects alone explain.",
        "",
        "| method | mean outcome | additive share | predictor | n | Pearson | Spearman | within-task "
        "| pairwise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in s["methods"].items():
        for name, c in m["predictors"].items():
            lines.append(
                f"| {method} | {m['mean_normalized']:.3f} | {m['additive_share']:.2f} | {name} | {c['n']} "
                f"| {_fmt(c['pearson'])} | {_fmt(c['spearman'])} | {_fmt(c['within_task_spearman'])} "
                f"| {_fmt(c['pairwise_spearman'])} |"
            )
    if any("predicted_mae" in m for m in s["methods"].values()):
        lines += ["", "compare's `predictions` (predicted retention): mean absolute error, share of outcomes in the "
                  "80% interval:", ""]
        for method, m in s["methods"].items():
            coverage = m.get("predicted_interval_coverage")
            lines.append(f"- {method}: MAE {m['predicted_mae']:.3f}, 80% interval holds "
                         + ("n/a" if coverage is None else f"{coverage:.0%}"))
    lines += ["", "Per-layer metrics most rank-correlated with the outcome (Spearman, all pairs):", ""]
    for method, m in s["methods"].items():
        top = m["feature_spearman"][:5]
        lines.append(f"- {method}: " + (", ".join(f"`{k}` {_fmt(v)}" for k, v in top) or "n/a"))
    cal = s.get("mci_calibration")
    if cal:
        lines += [
            "",
            f"MCI constants, leave one task out ({cal['grid_points']} grid points; the product uses "
            f"{cal['product_constants']}; chosen on all pairs: {cal['in_sample_choice']}):",
            "",
            "| method | in-sample Spearman | held-out task Spearman (mean over tasks) "
            "| norms-only on the same pairs | pooled, both tasks held out |",
            "|---|---|---|---|---|",
        ]
        for method in s["methods"]:
            lines.append(
                f"| {method} | {_fmt(cal['in_sample_spearman'][method])} "
                f"| {_fmt(cal['held_out_spearman_mean_over_tasks'][method])} "
                f"| {_fmt(cal['baselines_on_held_out_pairs']['norms_only'][method])} "
                f"| {_fmt(cal['pooled_leave_both_tasks_out_spearman'][method])} |"
            )
        lines.append(f"Mean held-out task Spearman: {_fmt(cal['held_out_spearman_mean'])}.")
    rec = s["recommendation"]
    rate = "n/a" if rec["hit_rate"] is None else f"{rec['hit_rate']:.1%}"
    lines += [
        "",
        f"Recommendation hit rate (within {rec['tolerance'] * 100:.0f} points of the pair's best method): "
        f"{rate} ({rec['hits']}/{rec['pairs_with_recommendation']}) with this benchmark's parameters for the "
        "method; "
        + ("n/a" if rec["hit_rate_with_its_parameters"] is None else
           f"{rec['hit_rate_with_its_parameters']:.1%} ({rec['hits_with_its_parameters']}/"
           f"{rec['pairs_with_recommendation']})")
        + " merged with the recommendation's own parameters (mean outcome "
        + ("n/a" if rec["mean_normalized_with_its_parameters"] is None else
           f"{rec['mean_normalized_with_its_parameters']:.3f}") + ").",
        f"Recommended: {rec['recommended_counts']}; best: {rec['best_counts']}.",
        "Best predicted method (compare's `predictions`, the product's tie rule): "
        + ("n/a" if rec.get("predicted_best_hit_rate") is None else
           f"{rec['predicted_best_hit_rate']:.1%} ({rec['predicted_best_hits']}/{rec['pairs_with_predictions']}); "
           f"picked {rec['predicted_best_counts']}") + ".",
        "Always choosing one method: " + ", ".join(
            f"{m} {'n/a' if v is None else f'{v:.1%}'}" for m, v in rec["fixed_method_hit_rates"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    torch.set_num_threads(1)
    args = parse_args(argv)
    commit = git_commit()
    args.out.mkdir(parents=True, exist_ok=True)
    every_task = sorted(set(args.tasks) | set(args.pretrain_tasks))
    tests = {t: make_test_set(t, args.seed, args.test_size) for t in every_task}
    manifest = train_checkpoints(args, tests)
    names = kept_finetunes(manifest, args.min_acc)
    dropped = sorted(set(manifest["finetunes"]) - set(names))
    pairs = cross_task_pairs(manifest, names)
    log(f"{len(names)} fine-tunes kept, {len(dropped)} dropped {dropped}, {len(pairs)} cross-task pairs")
    outcomes = evaluate_pairs(args, manifest, pairs, tests)
    available = api_available() and not args.no_score
    scores = score_pairs(args, manifest, pairs) if available else {}
    if not available:
        log("MCI not computed: mergelens_mcp.compare_models is not importable (or --no-score)")
    recommended = evaluate_recommended(args, manifest, scores, tests) if available else {}
    peer = peer_scores(args, manifest, pairs) if not args.no_score else {}
    ft = manifest["finetunes"]
    rows = []
    for a, b in pairs:
        key = f"{a}|{b}"
        score = scores.get(key, {})
        rows.append({
            "pair": key, "a": a, "b": b, "task_a": ft[a]["task"], "task_b": ft[b]["task"],
            "lr_a": ft[a]["lr"], "lr_b": ft[b]["lr"],
            "finetuned_acc_a": ft[a]["accuracy"][ft[a]["task"]],
            "finetuned_acc_b": ft[b]["accuracy"][ft[b]["task"]],
            **outcomes[key],
            "mci": score.get("mci"), "composite": score.get("composite"), "peer_mci": peer.get("scores", {}).get(key),
            "recommended": score.get("recommended"), "score": score,
            "recommended_merge": recommended.get(key),
            "features": layer_features(score),
        })
    summary = summarize(rows, args.methods)
    if available and rows:
        summary["mci_calibration"] = evaluate_calibration(rows, args.methods)
    results = {
        "settings": settings_of(args),
        "git_commit": commit,
        "methods": {m: METHODS[m].describe() for m in args.methods},
        "mci_available": available,
        "peer": {k: peer[k] for k in ("version", "seconds") if k in peer},
        "base": manifest["base"],
        "finetunes": manifest["finetunes"],
        "kept": names,
        "dropped": dropped,
        "pairs": rows,
        "summary": summary,
    }
    write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(render_markdown(results))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
