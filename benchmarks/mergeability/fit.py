"""Fit the product's merge-outcome predictor on benchmark runs and score it on others.

    python -m benchmarks.mergeability.fit --fit .bench/seed0/results.json --fit .bench/seed2/results.json \\
        --fit .bench/seed3/results.json --choose --score .bench/h96l3/results.json \\
        --write mergelens_mcp/data/predictor.json --out .bench/fit.json

`--choose` (three or more --fit runs, pooled): the with-base model's features (1-3 of the depth-free pool) and
ridge alpha are those with the best mean held-out-setting Spearman (each run predicted by a pooled fit on the
others, every run in turn), then each method's difference from linear (its own features and alpha, or none) the
one with the best mean held-out-setting hit rate that keeps that Spearman. Nested: each run is also scored by a
model chosen and fitted on the other runs alone. The interval adds the 10th/90th percentiles of the held-out-setting
residuals. Without --choose, `--features` / `--alpha` / `--alpha-diff` / `--diff-features` fix the model, and
`--select` ranks every subset of 1-3 CANDIDATES by leave-one-task-out Spearman on the --fit run alone (how
WITH_BASE was chosen). Every score is computed by the product's own `Predictor.predict`, beside the baselines:
`norms_only` (-(|tau_a| + |tau_b|)), the MCI, the product's current recommender and each fixed rule ("always
linear", ...).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from mergelens_mcp.analysis.predict import (
    FEATURES,
    INTERVAL,
    MethodModel,
    Motion,
    Predictor,
    best_method,
    pair_features,
    raw_distance,
)

from .stats import hit_rate, mean, spearman, within_group_spearman

# chosen on the fit run's leave-one-task-out figures only, before any unseen setting was scored (README): the
# subset of 1-3 features with the best mean held-out-task Spearman over the six methods, among the first eight
# CANDIDATES (the merge-mechanism features: what averaging, adding and sign election take from each fine-tune;
# and drift). With the whole-model motion features added, --select on seed 0 picks first_far, moved_far,
# first_moved_sum, which scores 0.61 at seed 2 against 0.73 for WITH_BASE: not shipped (README, third attempt)
CANDIDATES = ("averaging_gap", "first_averaging_gap", "summed_energy", "first_summed_energy", "sign_energy",
              "averaging_shrink", "drift", "first_far",
              # how far each model moved over the whole model (compare's ModelInfo.moved) and what the merges
              # take from each there (with PairScore.task_cosine)
              "moved_sum", "moved_product", "moved_far", "moved_near", "first_moved_sum", "whole_averaging_gap",
              "whole_summed_energy", "whole_averaging_shrink")
WITH_BASE = ("first_averaging_gap", "first_far")
WITHOUT_BASE = ("distance", "direction", "subspace")
ALPHA = 1.0
NO_BASE_WIDENING = 1.25  # a choice, not fitted: the no-base interval is both residual ranges' union x this
TOLERANCE = 0.02
REFERENCE = "linear"  # the method the others' differences are fitted against (`fit_method`)
# the pool of the held-out-setting selection (`choose`): every with-base feature that means the same at any depth
# (whole-model and parameter-weighted means over all layers); the first-block features are left out, since the
# first of 2 blocks is not the first of 3 (README, "Held-out settings")
DEPTH_FREE = tuple(name for name, feature in FEATURES.items() if feature.needs_base and not name.startswith("first_"))
POOLS = {"depth-free": DEPTH_FREE, "all": tuple(name for name, feature in FEATURES.items() if feature.needs_base)}
ALPHAS = (1.0, 10.0, 100.0)


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    """The run's results and one row per pair: features, outcomes, tasks, norms, MCI and recommendation."""
    results = json.loads(Path(path).read_text())
    rows = []
    for r in results["pairs"]:
        layers = [(layer["layer_name"], layer["n_params"], layer["metrics"])
                  for layer in r["score"].get("layers", [])]
        rows.append({
            "pair": r["pair"], "a": r["a"], "b": r["b"], "tasks": (r["task_a"], r["task_b"]),
            "features": pair_features(layers, motion_of(r["score"])), "distance": raw_distance(layers),
            "y": {m: v["normalized"] for m, v in r["merged"].items()},
            "norms_only": -(r["tv"]["norm_a"] + r["tv"]["norm_b"]), "mci": r.get("mci"),
            "recommended": r.get("recommended"), "setting": str(path),
        })
    return results, rows


def motion_of(score: dict) -> Motion | None:
    """How far the pair's two models moved (and the cosine of their moves), as run.score_pair kept it."""
    moved = score.get("moved")
    if not moved:
        return None
    (a, by_a), (b, by_b) = moved
    return Motion((a, b), (by_a, by_b), score.get("task_cosine"))


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fit_model(xs: list[dict], y: list[float], features: Sequence[str], alpha: float = ALPHA) -> MethodModel:
    """Ridge on standardized features (no residual interval yet: residual_low = residual_high = 0)."""
    import torch

    x = torch.tensor([[row[f] for f in features] for row in xs], dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0, correction=0).clamp_min(1e-12)
    z = (x - mu) / sd
    w = torch.linalg.solve(z.T @ z + alpha * torch.eye(len(features), dtype=torch.float64), z.T @ (t - t.mean()))
    return MethodModel(tuple(features), tuple(mu.tolist()), tuple(sd.tolist()), tuple(w.tolist()),
                       float(t.mean()), 0.0, 0.0)


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def fit_method(rows: list[dict], method: str, features: Sequence[str], alpha_diff: float | None = None,
               alpha: float = ALPHA, diff_features: Sequence[str] | None = None) -> MethodModel:
    """One method's model: ridge (alpha `alpha`) on `features`. With `alpha_diff`, fitted as REFERENCE's model plus
    a ridge fit (alpha `alpha_diff`) of the method's difference from REFERENCE, on `diff_features` (default:
    `features`): a large alpha_diff keeps every method parallel to the reference (a shape constraint on the
    differences between methods, which decide the recommendation). The sum is one linear model over the union of
    both feature lists (both standardized on the same rows)."""
    xs = [r["features"] for r in rows]
    y = [r["y"][method] for r in rows]
    if alpha_diff is None or method == REFERENCE:
        return fit_model(xs, y, features, alpha)
    ref_y = [r["y"][REFERENCE] for r in rows]
    ref = fit_model(xs, ref_y, features, alpha)
    diff = fit_model(xs, [a - b for a, b in zip(y, ref_y, strict=True)], diff_features or features,
                     alpha=alpha_diff)
    names = list(ref.features) + [f for f in diff.features if f not in ref.features]
    stats = {f: (m, sd) for model in (diff, ref) for f, m, sd in zip(model.features, model.mean, model.scale,
                                                                       strict=True)}
    coef = dict.fromkeys(names, 0.0)
    for model in (ref, diff):
        for f, c in zip(model.features, model.coef, strict=True):
            coef[f] += c
    return MethodModel(tuple(names), tuple(stats[f][0] for f in names), tuple(stats[f][1] for f in names),
                       tuple(coef[f] for f in names), ref.intercept + diff.intercept, 0.0, 0.0)


@dataclass(frozen=True)
class Choice:
    """What each method's with-base model is: ridge (alpha) on `features`; with `alpha_diff`, REFERENCE's model
    plus a ridge fit of the method's difference from it on `diff_features` (see `fit_method`)."""

    features: tuple[str, ...] = WITH_BASE
    alpha: float = ALPHA
    alpha_diff: float | None = None
    diff_features: tuple[str, ...] | None = None

    def fit(self, rows: list[dict], method: str) -> MethodModel:
        return fit_method(rows, method, self.features, self.alpha_diff, self.alpha, self.diff_features)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "alpha": self.alpha, "alpha_diff": self.alpha_diff,
                "diff_features": None if self.diff_features is None else list(self.diff_features)}


def folds(rows: list[dict], by: str) -> list[tuple[list[dict], list[int]]]:
    """(training rows, indices of the held-out rows) for each fold: `task`, every pair whose first task is held
    out, predicted by a fit on the pairs without that task; `setting`, each fit run predicted by a fit on the
    others (every run in turn)."""
    if by == "task":
        names = sorted({t for r in rows for t in r["tasks"]})
        return [([r for r in rows if name not in r["tasks"]], [i for i, r in enumerate(rows) if r["tasks"][0] == name])
                for name in names]
    if by == "setting":
        names = sorted({r["setting"] for r in rows})
        if len(names) < 2:
            raise ValueError(f"held-out settings need rows of at least two fit runs, got {names}: pass --fit twice")
        return [([r for r in rows if r["setting"] != name], [i for i, r in enumerate(rows) if r["setting"] == name])
                for name in names]
    raise ValueError(f"held-out folds are by 'task' or 'setting', not {by!r}")


def held_out_predictions(rows: list[dict], method: str, choice: Choice, by: str = "task") -> list[float | None]:
    """Each row predicted (clipped to 0..1) by a fit that never saw its fold (`folds`); None where the fold's
    training rows are too few."""
    out: list[float | None] = [None] * len(rows)
    for train, test in folds(rows, by):
        if len(train) < len(choice.features) + 2 or not test:
            continue
        model = choice.fit(train, method)
        for i in test:
            out[i] = _clip(model.raw(rows[i]["features"]))
    return out


def loto_predictions(rows: list[dict], method: str, features: Sequence[str], alpha_diff: float | None = None
                     ) -> list[float | None]:
    """Each pair predicted by a fit that never saw its first task (clipped to 0..1)."""
    return held_out_predictions(rows, method, Choice(tuple(features), ALPHA, alpha_diff))


def select_features(rows: list[dict], methods: Sequence[str], candidates: Sequence[str] = CANDIDATES,
                    max_size: int = 3) -> list[tuple[float, tuple[str, ...]]]:
    """Every subset of 1..max_size candidates by its mean leave-one-task-out Spearman over the methods, best
    first (how WITH_BASE was chosen: on the fit run alone)."""
    scored = []
    for size in range(1, max_size + 1):
        for features in itertools.combinations(candidates, size):
            if any(f not in r["features"] for r in rows for f in features):
                continue
            rhos = []
            for method in methods:
                held_out = loto_predictions(rows, method, features)
                kept = [(p, r["y"][method]) for p, r in zip(held_out, rows, strict=True) if p is not None]
                rhos.append(spearman([p for p, _ in kept], [t for _, t in kept]))
            scored.append((mean(rhos), features))
    return sorted(scored, key=lambda s: -s[0])


class _Retention(NamedTuple):
    retention: float  # all `best_method` reads of a MethodPrediction


def _retentions(models: dict[str, MethodModel], x: dict[str, float]) -> dict[str, _Retention]:
    """The retentions `Predictor.predict` gives with a base and no distance (clipped, rounded alike), without its
    intervals and contributions: the selection's fast path (a test holds the two equal)."""
    return {m: _Retention(round(_clip(model.raw(x)), 4)) for m, model in models.items()}


def _setting_figures(rows: list[dict], methods: Sequence[str], choice: Choice) -> tuple[float, float]:
    """(mean Spearman, mean hit rate) over the held-out settings: each fit run predicted by a pooled fit on the
    others, Spearman averaged over the methods, then over the runs; the hit rate is the best predicted method's
    (`best_method`, the product's tie rule) within TOLERANCE of the pair's best."""
    rhos, hits = [], []
    for train, test in folds(rows, "setting"):
        models = {m: choice.fit(train, m) for m in methods}
        preds = [_retentions(models, rows[i]["features"]) for i in test]
        rhos.append(mean([spearman([p[m].retention for p in preds], [rows[i]["y"][m] for i in test])
                          for m in methods]))
        outcomes = [{m: rows[i]["y"][m] for m in methods} for i in test]
        chosen = [best_method(p) for p in preds]  # type: ignore[arg-type]
        hits.append(hit_rate(chosen, outcomes, TOLERANCE)[0])
    return mean(rhos) or 0.0, mean(hits) or 0.0


def select_level(rows: list[dict], methods: Sequence[str], pool: Sequence[str] = DEPTH_FREE,
                 alphas: Sequence[float] = ALPHAS, max_size: int = 3) -> list[tuple[float, Choice]]:
    """Every subset of 1..max_size pool features x ridge alpha, ranked by mean held-out-setting Spearman (each
    fit run predicted by a pooled fit on the others), best first; earlier candidates (fewer features, smaller
    alpha) win ties."""
    scored = []
    for size in range(1, max_size + 1):
        for features in itertools.combinations(pool, size):
            if any(f not in r["features"] for r in rows for f in features):
                continue
            for alpha in alphas:
                choice = Choice(features, alpha)
                scored.append((_setting_figures(rows, methods, choice)[0], choice))
    return sorted(scored, key=lambda s: -s[0])


def select_difference(rows: list[dict], methods: Sequence[str], level: Choice, pool: Sequence[str] = DEPTH_FREE,
                      alphas: Sequence[float] = ALPHAS, max_size: int = 1) -> list[tuple[float, Choice]]:
    """`level` as it is (each method its own fit) and `level` with each method's difference from REFERENCE fitted
    on every subset of 1..max_size pool features x alpha, ranked by mean held-out-setting hit rate of the best
    predicted method, best first; `level` as it is wins ties. A candidate whose mean held-out-setting Spearman
    falls below `level`'s is left out: the differences may change which method is recommended, not trade away
    how well each method's retention is ranked (a difference on other features changes every method but the
    reference)."""
    level_rho, level_hit = _setting_figures(rows, methods, level)
    scored = [(level_hit, level)]
    for size in range(1, max_size + 1):
        for features in itertools.combinations(pool, size):
            if any(f not in r["features"] for r in rows for f in features):
                continue
            for alpha in alphas:
                candidate = replace(level, alpha_diff=alpha, diff_features=features)
                rho, hit = _setting_figures(rows, methods, candidate)
                if rho >= level_rho:
                    scored.append((hit, candidate))
    return sorted(scored, key=lambda s: -s[0])


def choose(rows: list[dict], methods: Sequence[str], pool: Sequence[str] = DEPTH_FREE, max_size: int = 3,
           diff_size: int = 1) -> tuple[Choice, dict]:
    """The with-base model chosen on these rows' settings alone: the features and alpha with the best mean
    held-out-setting Spearman, then how the methods differ (`select_difference`) by the best mean hit rate."""
    level_score, level = select_level(rows, methods, pool, max_size=max_size)[0]
    hit, choice = select_difference(rows, methods, level, pool, max_size=diff_size)[0]
    return choice, {"held_out_setting_spearman": level_score, "held_out_setting_hit_rate": hit}


def fit_predictor(rows: list[dict], methods: Sequence[str], provenance: dict,
                  with_base: Sequence[str] | None = None, alpha_diff: float | None = None,
                  choice: Choice | None = None, residuals: str = "task") -> Predictor:
    """Per method, a with-base model (`choice`, default WITH_BASE with `alpha_diff`) and a without-base model;
    intervals from held-out residuals (`residuals`: "task", leave one task out; "setting", each fit run predicted
    by a fit on the others), without a base the union of both models' ranges, widened by NO_BASE_WIDENING."""
    choice = choice or Choice(tuple(with_base or WITH_BASE), ALPHA, alpha_diff)
    models: dict[str, dict[str, MethodModel]] = {"with_base": {}, "without_base": {}}
    for kind, kind_choice in (("with_base", choice), ("without_base", Choice(WITHOUT_BASE))):
        for method in methods:
            y = [r["y"][method] for r in rows]
            model = kind_choice.fit(rows, method)
            held_out = held_out_predictions(rows, method, kind_choice, residuals)
            found = [t - p for t, p in zip(y, held_out, strict=True) if p is not None]
            lo, hi = (_quantile(found, q) for q in INTERVAL) if found else (0.0, 0.0)
            models[kind][method] = MethodModel(model.features, model.mean, model.scale, model.coef,
                                               model.intercept, lo, hi)
    for method, model in models["without_base"].items():
        # without a base the pair may not share one as the fit's pairs did: never narrower than with a base
        ref = models["with_base"][method]
        lo = min(model.residual_low, ref.residual_low) * NO_BASE_WIDENING
        hi = max(model.residual_high, ref.residual_high) * NO_BASE_WIDENING
        models["without_base"][method] = MethodModel(model.features, model.mean, model.scale, model.coef,
                                                     model.intercept, lo, hi)
    nearest = min(r["distance"] for r in rows if r["distance"] is not None)
    return Predictor(models["with_base"], models["without_base"], nearest, provenance)


def predict_rows(predictor: Predictor, rows: list[dict], with_base: bool = True) -> list[dict]:
    """The product's own predictions (Predictor.predict) of every row."""
    return [predictor.predict(r["features"], r["distance"], with_base=with_base) for r in rows]


def evaluate(preds: list[dict], rows: list[dict], methods: Sequence[str], with_base: bool = True) -> dict:
    """Every figure of the issue's targets on these rows, given each row's predictions."""
    groups = [r["tasks"] for r in rows]
    out: dict = {"n_pairs": len(rows), "with_base": with_base, "methods": {}}
    for method in methods:
        y = [r["y"][method] for r in rows]
        p = [pr[method].retention for pr in preds]
        inside = [pr[method].low <= t <= pr[method].high for pr, t in zip(preds, y, strict=True)]
        out["methods"][method] = {
            "spearman": spearman(p, y),
            "norms_only_spearman": spearman([r["norms_only"] for r in rows], y),
            "mci_spearman": spearman([r["mci"] for r in rows], y) if all(r["mci"] is not None for r in rows)
            else None,
            "within_task_spearman": within_group_spearman(groups, p, y)[0],
            "norms_only_within_task": within_group_spearman(groups, [r["norms_only"] for r in rows], y)[0],
            "mae": mean([abs(a - b) for a, b in zip(p, y, strict=True)]),
            "interval_coverage": sum(inside) / len(inside),
            "mean_interval_width": mean([pr[method].high - pr[method].low for pr in preds]),
            "mean_outcome": mean(y), "mean_prediction": mean(p),
        }
    per = out["methods"].values()
    out["mean_spearman"] = mean([m["spearman"] for m in per])
    out["mean_norms_only_spearman"] = mean([m["norms_only_spearman"] for m in per])
    out["min_margin_over_norms_only"] = min(m["spearman"] - m["norms_only_spearman"] for m in per)
    out["mean_within_task_spearman"] = mean([m["within_task_spearman"] for m in per])
    out["mean_mae"] = mean([m["mae"] for m in per])
    out["mean_interval_coverage"] = mean([m["interval_coverage"] for m in per])
    outcomes = [{m: r["y"][m] for m in methods} for r in rows]
    chosen = [best_method({m: pr[m] for m in methods if m in pr}) for pr in preds]
    rules = {f"always {m}": hit_rate([m] * len(rows), outcomes, TOLERANCE)[0] for m in methods}
    out["recommendation"] = {
        "predicted_best_hit_rate": hit_rate(chosen, outcomes, TOLERANCE)[0],
        "current_recommender_hit_rate": hit_rate([r["recommended"] for r in rows], outcomes, TOLERANCE)[0],
        "fixed_rules": rules,
        "best_fixed_rule": max(rules.items(), key=lambda kv: kv[1] or 0.0),
        "chosen_counts": {m: chosen.count(m) for m in sorted({str(c) for c in chosen})},
        "mean_outcome_of_choice": mean([o[c] for o, c in zip(outcomes, chosen, strict=True) if c in o]),
        "mean_outcome_of_best": mean([max(o.values()) for o in outcomes]),
    }
    return out


def evaluate_loto(rows: list[dict], methods: Sequence[str], provenance: dict, with_base: bool = True,
                  fit: Callable[..., Predictor] = fit_predictor) -> dict:
    """The fit run's own pairs, each scored by a predictor fitted (by `fit`) without its first task."""
    scored, preds = [], []
    for task in sorted({t for r in rows for t in r["tasks"]}):
        train = [r for r in rows if task not in r["tasks"]]
        test = [r for r in rows if r["tasks"][0] == task]
        if test:
            scored += test
            preds += predict_rows(fit(train, methods, provenance), test, with_base)
    return evaluate(preds, scored, methods, with_base)


def git_head() -> str | None:
    """HEAD, `+dirty` when the predictor's code or the benchmark has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "mergelens_mcp/analysis"],
                           capture_output=True, text=True, check=False)
    commit = head.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) if commit else None


def _f(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:+.2f}"


def render(name: str, e: dict) -> str:
    lines = [f"### {name} ({e['n_pairs']} pairs, {'with' if e['with_base'] else 'without'} base)", "",
             "| method | Spearman | norms_only | MCI | within-task | norms_only within-task | MAE "
             "| 80% interval coverage | mean width |", "|---|---|---|---|---|---|---|---|---|"]
    for m, v in e["methods"].items():
        lines.append(f"| {m} | {_f(v['spearman'])} | {_f(v['norms_only_spearman'])} | {_f(v['mci_spearman'])} "
                     f"| {_f(v['within_task_spearman'])} | {_f(v['norms_only_within_task'])} | {v['mae']:.3f} "
                     f"| {v['interval_coverage']:.0%} | {v['mean_interval_width']:.2f} |")
    rec = e["recommendation"]
    rule, rate = rec["best_fixed_rule"]
    lines += [
        "",
        f"Mean Spearman {_f(e['mean_spearman'])} (norms_only {_f(e['mean_norms_only_spearman'])}); "
        f"smallest margin over norms_only {_f(e['min_margin_over_norms_only'])}; "
        f"mean within-task {_f(e['mean_within_task_spearman'])}; "
        f"mean MAE {e['mean_mae']:.3f}; mean coverage {e['mean_interval_coverage']:.0%}.",
        f"Recommendation (best predicted, ties to the simpler) within 2 points of the best: "
        f"{_f(rec['predicted_best_hit_rate'], True)}; "
        f"current recommender {_f(rec['current_recommender_hit_rate'], True)}; "
        f"best fixed rule {rule} {_f(rate, True)}; chosen {rec['chosen_counts']}; mean outcome of the choice "
        f"{rec['mean_outcome_of_choice']:.3f} (best possible {rec['mean_outcome_of_best']:.3f}).",
        "Fixed rules: " + ", ".join(f"{k} {_f(v, True)}" for k, v in rec["fixed_rules"].items()), "",
    ]
    return "\n".join(lines)


def held_out_settings(rows: list[dict], methods: Sequence[str], provenance: dict, max_size: int = 3,
                      diff_size: int = 1, pool: Sequence[str] = DEPTH_FREE) -> dict:
    """Each fit run scored by a predictor chosen (`choose`) and fitted (intervals from held-out-setting residuals)
    on the other runs alone: nested, so no figure of a run had a say in the model that scores it. Needs at least
    three runs (the choice on the others holds each of them out in turn)."""
    settings = sorted({r["setting"] for r in rows})
    if len(settings) < 3:
        raise ValueError(f"--choose needs at least three --fit runs (got {len(settings)}): the model scored on each "
                         "run is chosen by holding out each of the others in turn")
    out = {}
    for setting in settings:
        others = [r for r in rows if r["setting"] != setting]
        held = [r for r in rows if r["setting"] == setting]
        choice, inner = choose(others, methods, pool, max_size=max_size, diff_size=diff_size)
        predictor = fit_predictor(others, methods, provenance, choice=choice, residuals="setting")
        out[setting] = {"choice": choice.to_dict(), "inner": inner, **{
            ("with_base" if with_base else "without_base"): evaluate(predict_rows(predictor, held, with_base), held,
                                                                     methods, with_base)
            for with_base in (True, False)}}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mergeability.fit", description=__doc__)
    parser.add_argument("--fit", type=Path, action="append", required=True,
                        help="results.json of a run to fit on (repeat to pool several settings)")
    parser.add_argument("--score", type=Path, action="append", default=[], help="results.json of a run to score")
    parser.add_argument("--write", type=Path, help="write the fitted predictor here (the product's data file)")
    parser.add_argument("--out", type=Path, help="write every figure here as JSON")
    parser.add_argument("--features", help=f"comma-separated with-base features (default {','.join(WITH_BASE)})")
    parser.add_argument("--alpha", type=float, default=ALPHA, help=f"ridge alpha of the features (default {ALPHA})")
    parser.add_argument("--alpha-diff", type=float, help="ridge alpha of each method's difference from "
                        f"{REFERENCE} (default: none, each method fitted on its own)")
    parser.add_argument("--diff-features", help="comma-separated features of the differences from "
                        f"{REFERENCE} (with --alpha-diff; default: --features)")
    parser.add_argument("--choose", action="store_true",
                        help="choose the features, alpha and differences by held-out-setting figures over the --fit "
                        "runs (3 or more), score each run by a model chosen and fitted without it, then fit on all")
    parser.add_argument("--max-size", type=int, default=3, help="with --choose: at most this many features")
    parser.add_argument("--pool", choices=sorted(POOLS), default="depth-free",
                        help="with --choose: the candidate features (default depth-free: no first-block features)")
    parser.add_argument("--residuals", choices=("task", "setting"),
                        help="the interval's held-out residuals: leave one task out, or each --fit run predicted by "
                        "a fit on the others (default: setting with several --fit runs, else task)")
    parser.add_argument("--select", action="store_true",
                        help="rank the candidate feature sets by leave-one-task-out Spearman on --fit, then stop")
    args = parser.parse_args(argv)
    fits = [load_rows(path) for path in args.fit]
    rows = [row for _, fit_rows in fits for row in fit_rows]
    methods = [m for m in fits[0][0]["methods"] if all(m in results["methods"] for results, _ in fits)]
    if args.select:
        ranked = select_features(rows, methods)
        for rho, features in ranked[:10]:
            print(f"{rho:+.3f}  {', '.join(features)}")
        return {"selection": [[rho, list(features)] for rho, features in ranked]}
    residuals = args.residuals or ("setting" if len(fits) > 1 else "task")
    settings = [results["settings"] for results, _ in fits]
    provenance = {
        "benchmark": "benchmarks/mergeability", "fit_on": [str(p) for p in args.fit],
        "settings": settings[0] if len(settings) == 1 else settings,
        "results_commit": [results.get("git_commit") for results, _ in fits] if len(fits) > 1
        else fits[0][0].get("git_commit"),
        "fit_commit": git_head(), "date": datetime.date.today().isoformat(), "n_pairs": len(rows),
        "interval": list(INTERVAL), "reference": REFERENCE,
        "residuals": {"task": "leave-one-task-out on the fit runs",
                      "setting": "each fit run predicted by a pooled fit on the others"}[residuals],
        "scope": "synthetic tasks on tiny Llama-style models; pairs of fine-tunes of one base",
    }
    report: dict = {"provenance": provenance, "runs": {}}
    text = []
    if args.choose:
        pool = POOLS[args.pool]
        nested = held_out_settings(rows, methods, provenance, max_size=args.max_size, pool=pool)
        report["held_out_settings"] = nested
        for setting, found in nested.items():
            for kind in ("with_base", "without_base"):
                text.append(render(f"held-out setting {setting}, chosen ({found['choice']}) and fitted on the "
                                   "other runs", found[kind]))
        choice, selection = choose(rows, methods, pool, max_size=args.max_size)
        provenance["selection"] = {"how": f"features (1-{args.max_size} of the {args.pool} pool) and alpha by mean "
                                   f"held-out-setting Spearman, then the methods' differences from {REFERENCE} by "
                                   "mean held-out-setting hit rate, over the fit runs", **selection}
    else:
        features = tuple(args.features.split(",")) if args.features else WITH_BASE
        diff = tuple(args.diff_features.split(",")) if args.diff_features else None
        choice = Choice(features, args.alpha, args.alpha_diff, diff)
    provenance.update({"alpha": choice.alpha, "alpha_diff": choice.alpha_diff, "features": list(choice.features),
                       "diff_features": choice.to_dict()["diff_features"]})
    fit = functools.partial(fit_predictor, choice=choice, residuals=residuals)
    predictor = fit(rows, methods, provenance)
    for with_base in (True, False):
        label = f"fit runs, leave one task out ({len(fits)} setting(s), {len(rows)} pairs)"
        e = evaluate_loto(rows, methods, provenance, with_base, functools.partial(fit_predictor, choice=choice))
        report["runs"][f"loto{'' if with_base else '_no_base'}"] = e
        text.append(render(label, e))
    if len(fits) > 1 and not args.choose:  # each fit run scored by a predictor fitted on the others alone
        for k, (path, (results, held)) in enumerate(zip(args.fit, fits, strict=True)):
            others = [row for i, (_, r) in enumerate(fits) if i != k for row in r]
            e = evaluate(predict_rows(fit(others, methods, provenance), held), held, methods)
            report["runs"][f"held-out setting {path}"] = e
            text.append(render(f"held-out setting {path} ({results['settings']}), fitted on the other runs", e))
    for path in args.score:
        results, score_rows = load_rows(path)
        for with_base in (True, False):
            e = evaluate(predict_rows(predictor, score_rows, with_base), score_rows,
                         [m for m in methods if m in results["methods"]], with_base)
            report["runs"][f"{path}{'' if with_base else ' no_base'}"] = e
            text.append(render(f"{path} ({results['settings']})", e))
    print("\n".join(text))
    if args.write:
        args.write.write_text(json.dumps(predictor.to_dict(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
