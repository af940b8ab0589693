"""Preview and verify on the benchmark's merges: does the product's preview rank merges as their accuracy
does, and does verify's verdict agree with the accuracy a written merge lost?

    python -m benchmarks.mergeability.preview --run /work/bench/seed0 --out .bench/preview-seed0

`--run` is a finished run of `benchmarks.mergeability.run` (its checkpoints and `outcomes.json`; only read).
Its checkpoints are copied into `--out` with a tokenizer (`write_tokenizer`: the benchmark's token ids under
readable names), so a probe file of prompts and completions reaches the models as the tasks' own tokens.

- Probes (`probe_records`): per task, 16 prompts drawn from a seed stream of their own ("probe/<task>/<seed>"),
  disjoint from the run's held-out test prompts (asserted), with their correct answers as completions; a pair's
  probe file holds its two tasks' records, each naming the fine-tune of that task as its `source`.
- Preview: for every pair, `mergelens_mcp.preview_merge` (the public API) with the six merges of the run as
  mergekit configs (`merge_config`: the run's parameters, so the previewed merge is the merge measured), once
  with the pair's probe file and once with the shipped generic probes.
- Verify: per method, `--verify-per-method` pairs spread over that method's outcomes are merged, written as
  checkpoints with their config, and checked by `mergelens_mcp.verify_merge` with the pair's probe file.

Results are cached per pair in `--out/preview.json` and `--out/verify.json`; `summary.json` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import yaml

from .merge import METHODS, merge_states
from .model import build_model, load_config, load_state, save_checkpoint
from .run import TOLERANCE, cross_task_pairs, kept_finetunes, log, read_json, write_json
from .stats import spearman
from .tasks import (
    DIGIT0,
    EOS,
    PAD,
    PLUS,
    SEP,
    TASK0,
    TASKS,
    VOCAB_SIZE,
    encode_answer,
    encode_prompt,
    make_test_set,
    sample,
)

PROBES_PER_TASK = 16
UNK = 22  # the first id no task uses: text the tasks never show (the generic probes' words) reads as it

# the benchmark's token ids under readable names; the tokenizer splits on spaces
TOKENS: dict[str, int] = {
    "<pad>": PAD, "<sep>": SEP, "<eos>": EOS, "+": PLUS, "<unk>": UNK,
    **{str(d): DIGIT0 + d for d in range(10)},
    **{f"<{task}>": TASK0 + i for i, task in enumerate(TASKS)},
}
NAMES = {i: name for name, i in TOKENS.items()}

# verify's verdicts against the accuracy a merge lost: drop = 1 - normalized accuracy (mean over the pair of
# merged / fine-tuned accuracy on each task)
DROP_BINS = (("ok", 0.10), ("warning", 0.50), ("failed", 1.01))


def drop_bin(normalized: float) -> str:
    """'ok' when the merge lost at most 10 points of its sources' accuracy, 'warning' up to 50, else 'failed'."""
    drop = 1.0 - normalized
    return next(name for name, limit in DROP_BINS if drop <= limit)


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (tokenizer.json + tokenizer_config.json) mapping the names of `TOKENS` to the
    benchmark's ids: `<copy> 1 2 3 <sep>` is exactly the prompt `encode_prompt` makes."""
    vocab = {**{f"<unused{i}>": i for i in range(VOCAB_SIZE) if i not in NAMES}, **TOKENS}
    special = ["<pad>", "<sep>", "<eos>", "<unk>", *(f"<{t}>" for t in TASKS)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": TOKENS[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t in special],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<eos>",
        "unk_token": "<unk>", "model_max_length": 64,
    }, indent=1) + "\n")


def text_of(ids: list[int]) -> str:
    return " ".join(NAMES[i] for i in ids)


def probe_records(task: str, seed: int, source: str, test_size: int, n: int = PROBES_PER_TASK) -> list[dict]:
    """`n` distinct prompts of `task` with their correct answers, none of them a held-out test prompt of the
    run (`test_size` prompts from `make_test_set(task, seed)`); depends only on the arguments."""
    held_out = {tuple(p) for p in make_test_set(task, seed, test_size).prompts}
    rng = random.Random(f"probe/{task}/{seed}")
    seen: dict[tuple[int, ...], list[int]] = {}
    for _ in range(n * 200):
        if len(seen) == n:
            break
        x, y = sample(task, rng)
        prompt = tuple(encode_prompt(task, x))
        if prompt not in held_out:
            seen.setdefault(prompt, encode_answer(y))
    if len(seen) < n:
        raise ValueError(f"{task}: only {len(seen)} prompts outside the {test_size} held-out ones; ask fewer")
    assert not held_out & set(seen), f"{task}: a probe prompt is a held-out test prompt"
    return [{"prompt": text_of(list(p)), "completion": " " + text_of(a), "source": source}
            for p, a in seen.items()]


def write_probe_file(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def merge_config(method: str, a: Path, b: Path, base: Path) -> str:
    """The run's merge of `a` and `b` by `method` (`merge.METHODS`' parameters) as a mergekit YAML."""
    from mergelens_mcp.mergekit.methods import METHODS as REGISTRY

    spec = METHODS[method]
    params = spec.describe()
    config: dict = {"merge_method": method}
    if method == "slerp":
        config |= {"base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                   "parameters": {"t": params["t"]}}
    else:
        per_model = {p.name for p in REGISTRY[method].parameters if p.per_model}
        models = []
        for i, path in enumerate((a, b)):
            own = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items() if k in per_model}
            models.append({"model": str(path), "parameters": own})
        config["models"] = models
        shared = {k: v for k, v in params.items() if k not in per_model}
        if shared:
            config["parameters"] = shared
        if method != "linear":
            config["base_model"] = str(base)
    config["dtype"] = "float32"
    return yaml.safe_dump(config, sort_keys=False)


def copy_checkpoints(run: Path, out: Path, names: list[str]) -> dict[str, Path]:
    """The run's base and fine-tunes copied into out/checkpoints (weights, config) with the tokenizer."""
    folders = {}
    for name in ["base", *names]:
        src, dst = run / "checkpoints" / name, out / "checkpoints" / name
        dst.mkdir(parents=True, exist_ok=True)
        for file in ("model.safetensors", "config.json"):
            if not (dst / file).exists() or (dst / file).stat().st_size != (src / file).stat().st_size:
                shutil.copyfile(src / file, dst / file)
        write_tokenizer(dst)
        folders[name] = dst.resolve()
    return folders


def preview_row(preview: object) -> dict:
    """A PreviewResult's figures per method: overall retention, and per source retention, agreement, KL."""
    return {
        "best": preview.best,
        "seconds": preview.elapsed_s,
        "methods": {m.method: {
            "retention": m.retention,
            "sources": {s.source: {"retention": s.retention, "agreement": s.agreement, "kl": s.kl,
                                   "perplexity": s.perplexity} for s in m.sources},
        } for m in preview.methods},
    }


def run_previews(pairs: list[tuple[str, str]], folders: dict[str, Path], probes: dict[tuple[str, str], Path],
                 out: Path, methods: list[str], seed: int) -> dict[str, dict]:
    """Every pair previewed with the run's merges as configs, on its probe file and on the shipped probes; the
    random methods' masks drawn from the run's seed, as the run drew them (`random_seed`)."""
    from mergelens_mcp import preview_merge

    cache_path = out / "preview.json"
    cache = read_json(cache_path) or {}
    started = time.perf_counter()
    for i, (a, b) in enumerate(pairs):
        key = f"{a}|{b}"
        if (set(cache.get(key, {}).get("task", {}).get("methods", {})) == set(methods) and "generic" in cache[key]
                and cache[key].get("random_seed") == seed):
            continue
        configs = [merge_config(m, folders[a], folders[b], folders["base"]) for m in methods]
        models, base = [str(folders[a]), str(folders[b])], str(folders["base"])
        cache[key] = {
            "task": preview_row(preview_merge(models, base, configs=configs, probe=str(probes[(a, b)]),
                                              device="cpu", random_seed=seed)),
            "generic": preview_row(preview_merge(models, base, configs=configs, device="cpu", random_seed=seed)),
            "random_seed": seed,
        }
        if (i + 1) % 8 == 0 or i + 1 == len(pairs):
            write_json(cache_path, cache)
            log(f"previewed {i + 1}/{len(pairs)} pairs ({time.perf_counter() - started:.0f}s)")
    write_json(cache_path, cache)
    return {f"{a}|{b}": cache[f"{a}|{b}"] for a, b in pairs}


def spread(values: dict[str, float], k: int) -> list[str]:
    """`k` keys whose values are evenly spaced over the sorted values (lowest and highest included)."""
    order = sorted(values, key=lambda key: (values[key], key))
    if k >= len(order):
        return order
    return list(dict.fromkeys(order[round(i * (len(order) - 1) / (k - 1))] for i in range(k))) if k > 1 \
        else order[:1]


def run_verifies(pairs: list[tuple[str, str]], folders: dict[str, Path], probes: dict[tuple[str, str], Path],
                 outcomes: dict[str, dict], out: Path, methods: list[str], per_method: int, seed: int,
                 own: dict[str, float]) -> list[dict]:
    """Per method, `per_method` pairs spread over its outcomes merged as the run merged them, written with their
    config, and verified with the pair's probe file; `own`: each fine-tune's accuracy on its task."""
    from mergelens_mcp import verify_merge

    cache_path = out / "verify.json"
    cache = read_json(cache_path) or {}
    base_state = load_state(folders["base"])
    rows = []
    for method in methods:
        chosen = spread({f"{a}|{b}": outcomes[f"{a}|{b}"][method]["normalized"] for a, b in pairs}, per_method)
        for key in chosen:
            label = f"{method}/{key}"
            if cache.get(label, {}).get("random_seed") != seed:
                a, b = key.split("|")
                folder = out / "merged" / method / key.replace("|", "__")
                merged = merge_states(METHODS[method], base_state, load_state(folders[a]), load_state(folders[b]),
                                      seed=seed)
                save_checkpoint(build_model(load_config(folders[a]), merged), folder)
                write_tokenizer(folder)
                config = folder / "merge.yaml"
                config.write_text(merge_config(method, folders[a], folders[b], folders["base"]))
                result = verify_merge(str(folder), [str(folders[a]), str(folders[b])], str(folders["base"]),
                                      config=str(config), probe=str(probes[(a, b)]), device="cpu",
                                      random_seed=seed)
                cache[label] = {
                    "method": method, "pair": key, "verdict": result.verdict, "reasons": result.reasons,
                    "codes": sorted({f.code for f in result.findings if f.level.value != "info"}),
                    "behaviour": {s.source: {"perplexity": s.perplexity, "best": s.best_source_perplexity,
                                             "agreement": s.agreement} for s in result.behaviour},
                    "seconds": result.elapsed_s, "random_seed": seed,
                }
                write_json(cache_path, cache)
                shutil.rmtree(folder)
            merged = outcomes[key][method]
            a, b = key.split("|")
            worst = min(merged["acc_a"] / own[a] if own[a] else 0.0, merged["acc_b"] / own[b] if own[b] else 0.0)
            rows.append({**cache[label], "normalized": merged["normalized"], "actual": drop_bin(merged["normalized"]),
                         "worst_source": worst, "actual_worst": drop_bin(worst)})
    log(f"verified {len(rows)} merges")
    return rows


def hits(best: list[str], outcomes: list[dict[str, float]]) -> int:
    return sum(o[m] >= max(o.values()) - TOLERANCE for m, o in zip(best, outcomes, strict=True))


def summarize(pairs: list[tuple[str, str]], previews: dict[str, dict], outcomes: dict[str, dict],
              methods: list[str], verifies: list[dict]) -> dict:
    """Spearman per method of each preview figure with the outcome; the best-method hit rate; verify's
    confusion table."""
    keys = [f"{a}|{b}" for a, b in pairs]
    actual = [{m: outcomes[k][m]["normalized"] for m in methods} for k in keys]

    def figure(k: str, probe_set: str, method: str, name: str) -> float:
        m = previews[k][probe_set]["methods"][method]
        if name == "retention":
            return m["retention"]
        values = [s[name] for s in m["sources"].values()]
        return sum(v or 0.0 for v in values) / len(values)

    out: dict = {"n_pairs": len(keys), "tolerance": TOLERANCE, "probe_sets": {}}
    for probe_set in ("task", "generic"):
        per_method = {}
        for method in methods:
            y = [a[method] for a in actual]
            per_method[method] = {name: spearman([figure(k, probe_set, method, name) for k in keys], y)
                                  for name in ("retention", "agreement")}
        chosen = {name: [max(methods, key=lambda m, k=k: figure(k, probe_set, m, name)) for k in keys]
                  for name in ("retention", "agreement")}
        out["probe_sets"][probe_set] = {
            "spearman": per_method,
            "best_within_tolerance": {name: hits(best, actual) for name, best in chosen.items()},
            "best_counts": {name: {m: best.count(m) for m in methods if best.count(m)}
                            for name, best in chosen.items()},
            "seconds_per_pair": sum(previews[k][probe_set]["seconds"] for k in keys) / len(keys),
        }
    out["actual_best_counts"] = {m: sum(max(a, key=a.get) == m for a in actual) for m in methods}
    tables = {}
    for column in ("actual", "actual_worst"):
        table = {v: {b: 0 for b, _ in DROP_BINS} for v in ("ok", "warning", "failed")}
        for row in verifies:
            table[row["verdict"]][row[column]] += 1
        tables[column] = table
    out["verify"] = {"n": len(verifies), "confusion": tables["actual"], "bins": {b: limit for b, limit in DROP_BINS},
                     "agree": sum(r["verdict"] == r["actual"] for r in verifies),
                     "confusion_worst_source": tables["actual_worst"],
                     "agree_worst_source": sum(r["verdict"] == r["actual_worst"] for r in verifies)}
    return out


def preview_early(args: argparse.Namespace) -> dict:
    """The previews of every cross-task pair of the fine-tunes written so far (a config.json is written
    after the weights); the full evaluation reuses them."""
    names = sorted(p.parent.name for p in (args.run / "checkpoints").glob("*/config.json") if p.parent.name != "base")
    task = {n: n.rsplit("-lr", 1)[0] for n in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if task[a] != task[b]]
    folders = copy_checkpoints(args.run, args.out, names)
    probes = {(a, b): write_probe_file(
        args.out / "probes" / f"{a}__{b}.jsonl",
        [*probe_records(task[a], args.seed, a, args.test_size),
         *probe_records(task[b], args.seed, b, args.test_size)]) for a, b in pairs}
    log(f"early: {len(names)} fine-tunes written, {len(pairs)} pairs")
    return run_previews(pairs, folders, probes, args.out, list(METHODS), args.seed)


def render_markdown(summary: dict, methods: list[str]) -> str:
    """The figures as README tables: Spearman per method and probe set, best-method hits, verify's table."""
    n = summary["n_pairs"]
    sets = summary["probe_sets"]
    lines = [
        f"Spearman(preview figure, normalized accuracy) over {n} pairs, per method:", "",
        "| method | task probes: retention | task probes: agreement | generic: retention | generic: agreement |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        cells = [sets[p]["spearman"][m][f] for p in ("task", "generic") for f in ("retention", "agreement")]
        lines.append(f"| {m} | " + " | ".join("n/a" if c is None else f"{c:+.2f}" for c in cells) + " |")
    lines += ["", "Preview's best method within 2 points of the pair's actual best:", ""]
    for p in ("task", "generic"):
        for f in ("retention", "agreement"):
            hit = sets[p]["best_within_tolerance"][f]
            lines.append(f"- {p} probes, best by {f}: {hit}/{n} ({hit / n:.1%}); chosen {sets[p]['best_counts'][f]}")
    lines.append(f"- actual best: {summary['actual_best_counts']}")
    v = summary["verify"]
    bins = [b for b, _ in DROP_BINS]
    lines += ["", f"Verify's verdict (rows) against the accuracy lost (columns), {v['n']} written merges:", "",
              "| verdict | " + " | ".join(f"actual {b}" for b in bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for verdict in ("ok", "warning", "failed"):
        row = v["confusion"][verdict]
        lines.append(f"| {verdict} | " + " | ".join(str(row[b]) for b in bins) + " |")
    lines.append(f"\nAgreeing: {v['agree']}/{v['n']}.")
    lines += ["", "The same against the worse of the two sources' accuracy lost:", "",
              "| verdict | " + " | ".join(f"actual {b}" for b in bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for verdict in ("ok", "warning", "failed"):
        row = v["confusion_worst_source"][verdict]
        lines.append(f"| {verdict} | " + " | ".join(str(row[b]) for b in bins) + " |")
    lines.append(f"\nAgreeing: {v['agree_worst_source']}/{v['n']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.mergeability.preview", description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a run folder of benchmarks.mergeability.run")
    parser.add_argument("--out", type=Path, required=True, help="folder for copies, probe files and results")
    parser.add_argument("--min-acc", type=float, default=0.9, help="as the run: fine-tunes below it are dropped")
    parser.add_argument("--verify-per-method", type=int, default=6, help="merges written and verified per method")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs (a quick look)")
    parser.add_argument("--early", action="store_true",
                        help="preview the pairs of the fine-tunes already written while the run still trains "
                             "(cached for the full evaluation; needs --seed and --test-size as the run's)")
    parser.add_argument("--seed", type=int, default=0, help="with --early: the run's seed")
    parser.add_argument("--test-size", type=int, default=200, help="with --early: the run's test size")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.early:
        return preview_early(args)
    manifest = read_json(args.run / "checkpoints.json")
    cached = read_json(args.run / "outcomes.json")
    if manifest is None or cached is None:
        raise SystemExit(f"{args.run}: no checkpoints.json or outcomes.json; run benchmarks.mergeability.run first")
    settings = manifest["settings"]
    names = kept_finetunes(manifest, args.min_acc)
    pairs = [p for p in cross_task_pairs(manifest, names) if f"{p[0]}|{p[1]}" in cached["pairs"]]
    methods = [m for m in METHODS if all(cached["pairs"][f"{a}|{b}"]["merged"].get(m, {}).get("spec")
                                         == METHODS[m].describe() for a, b in pairs)]
    pairs = pairs[:args.limit] if args.limit else pairs
    log(f"{len(pairs)} pairs, methods {methods}")
    outcomes = {f"{a}|{b}": cached["pairs"][f"{a}|{b}"]["merged"] for a, b in pairs}
    folders = copy_checkpoints(args.run, args.out, names)
    ft = manifest["finetunes"]
    probes = {(a, b): write_probe_file(
        args.out / "probes" / f"{a}__{b}.jsonl",
        [*probe_records(ft[a]["task"], settings["seed"], a, settings["test_size"]),
         *probe_records(ft[b]["task"], settings["seed"], b, settings["test_size"])]) for a, b in pairs}
    previews = run_previews(pairs, folders, probes, args.out, methods, settings["seed"])
    own = {n: f["accuracy"][f["task"]] for n, f in ft.items()}
    verifies = run_verifies(pairs, folders, probes, outcomes, args.out, methods, args.verify_per_method,
                            settings["seed"], own)
    summary = summarize(pairs, previews, outcomes, methods, verifies)
    results = {"run": str(args.run), "settings": settings, "methods": methods, "summary": summary,
               "verify": verifies}
    write_json(args.out / "summary.json", results)
    (args.out / "summary.md").write_text(render_markdown(summary, methods))
    log(json.dumps(summary["probe_sets"], indent=1))
    log(json.dumps(summary["verify"]))
    return results


if __name__ == "__main__":
    main()
