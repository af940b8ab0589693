"""The predictor's fit script on a tiny synthetic results table: it fits, scores with the product's code, writes."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.mergeability.fit import (
    ALPHA,
    CANDIDATES,
    WITH_BASE,
    Choice,
    _quantile,
    _retentions,
    _setting_figures,
    fit_method,
    fit_model,
    fit_predictor,
    folds,
    held_out_predictions,
    load_rows,
    main,
    select_difference,
    select_features,
    select_level,
)
from mergelens_mcp.analysis.predict import Predictor, load_predictor

METHODS = ("linear", "ties")


def synthetic_results(path: Path, seed: int) -> Path:
    """4 tasks x 2 fine-tunes; retention falls with how far each fine-tune moved, plus a little noise."""
    rng = random.Random(seed)
    finetunes = {f"t{t}-lr{k}": {"task": f"t{t}", "drift": rng.uniform(0.02, 0.2)} for t in range(4) for k in (1, 2)}
    pairs = []
    for a, b in itertools.combinations(sorted(finetunes), 2):
        fa, fb = finetunes[a], finetunes[b]
        if fa["task"] == fb["task"]:
            continue
        da, db = fa["drift"], fb["drift"]
        layers = [{"layer_name": f"layers.{i}", "n_params": 100 * (i + 1), "metrics": {
            "task_drift": (da + db) / 2, "magnitude_ratio": min(da, db) / max(da, db),
            "task_cosine": rng.uniform(0.0, 0.2), "sign_disagreement_top": rng.uniform(0.3, 0.5),
            "tsv_interference": rng.uniform(0.1, 0.3),
            "l2_distance": (da + db) / 4 + rng.uniform(0, 0.01), "cosine_similarity": 1 - (da + db) / 10,
            "spectral_overlap": rng.uniform(0.7, 0.9)}} for i in range(3)]
        base = 1.0 - 2.5 * (da + db)
        merged = {m: {"normalized": min(1.0, max(0.0, base - 0.1 * j + rng.gauss(0, 0.02)))}
                  for j, m in enumerate(METHODS)}
        pairs.append({"pair": f"{a}|{b}", "a": a, "b": b, "task_a": fa["task"], "task_b": fb["task"],
                      "merged": merged, "tv": {"norm_a": da, "norm_b": db}, "mci": 50.0 - 100 * (da + db),
                      "recommended": "linear", "score": {
                          "layers": layers, "task_cosine": rng.uniform(0.0, 0.2),
                          "moved": [[d, {f"layers.{i}": d for i in range(3)}] for d in (da, db)]}})
    path.write_text(json.dumps({"settings": {"seed": seed}, "git_commit": "abc", "methods": {m: {} for m in METHODS},
                                "pairs": pairs}))
    return path


def test_the_fit_recovers_that_far_moved_fine_tunes_merge_worse(tmp_path: Path) -> None:
    _, rows = load_rows(synthetic_results(tmp_path / "r.json", seed=0))
    predictor = fit_predictor(rows, METHODS, {"source": "test"})
    model = predictor.with_base["linear"]
    assert model.features == WITH_BASE
    # both features grow with how far the fine-tunes moved (collinear here): together they push retention down
    assert sum(model.coef) < 0
    assert model.residual_low <= 0 <= model.residual_high
    assert predictor.nearest_distance == pytest.approx(min(r["distance"] for r in rows))


def test_the_fit_script_scores_an_unseen_run_with_the_products_predictor_and_writes_a_loadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit_on = synthetic_results(tmp_path / "fit.json", seed=0)
    unseen = synthetic_results(tmp_path / "unseen.json", seed=1)
    target = tmp_path / "predictor.json"
    report = main(["--fit", str(fit_on), "--score", str(unseen), "--write", str(target),
                   "--out", str(tmp_path / "report.json")])
    scored = report["runs"][str(unseen)]
    assert scored["n_pairs"] == 24
    assert scored["methods"]["linear"]["spearman"] > 0.8
    assert 0 <= scored["recommendation"]["predicted_best_hit_rate"] <= 1
    assert scored["recommendation"]["fixed_rules"]["always linear"] == 1.0  # linear is best by construction
    assert report["runs"]["loto"]["n_pairs"] == 24
    loaded = load_predictor.__wrapped__(target)
    assert isinstance(loaded, Predictor)
    assert loaded.provenance["settings"] == {"seed": 0} and loaded.provenance["n_pairs"] == 24
    assert "Spearman" in capsys.readouterr().out


def test_feature_selection_ranks_every_candidate_subset_by_held_out_task_spearman(tmp_path: Path) -> None:
    _, rows = load_rows(synthetic_results(tmp_path / "r.json", seed=0))
    ranked = select_features(rows, METHODS, max_size=2)
    n = len(CANDIDATES)
    assert len(ranked) == n + n * (n - 1) // 2
    rhos = [rho for rho, _ in ranked]
    assert rhos == sorted(rhos, reverse=True)
    # retention falls with the summed drift by construction: the best set ranks held-out pairs almost perfectly
    assert rhos[0] > 0.8
    assert set(WITH_BASE) <= set(CANDIDATES)


def test_a_large_difference_alpha_keeps_every_method_parallel_to_the_reference(tmp_path: Path) -> None:
    _, rows = load_rows(synthetic_results(tmp_path / "r.json", seed=0))
    features = ("moved_sum", "first_averaging_gap")
    free = fit_method(rows, "ties", features)
    ref = fit_method(rows, "linear", features)
    parallel = fit_method(rows, "ties", features, alpha_diff=1e9)
    assert parallel.coef == pytest.approx(ref.coef, abs=1e-6)
    gap = sum(r["y"]["ties"] - r["y"]["linear"] for r in rows) / len(rows)
    assert parallel.intercept == pytest.approx(ref.intercept + gap)
    assert free.coef != pytest.approx(ref.coef, abs=1e-6)  # fitted on its own, ties has its own slopes
    # at the reference's own alpha it is the method's own fit (ridge is linear in the outcomes)
    same = fit_method(rows, "ties", features, alpha_diff=ALPHA)
    assert same.coef == pytest.approx(free.coef) and same.intercept == pytest.approx(free.intercept)


def _settings_rows(tmp_path: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    rows = []
    for seed in seeds:
        rows += load_rows(synthetic_results(tmp_path / f"s{seed}.json", seed=seed))[1]
    return rows


def test_a_difference_on_its_own_features_is_one_linear_model_over_both_lists(tmp_path: Path) -> None:
    _, rows = load_rows(synthetic_results(tmp_path / "r.json", seed=0))
    ref = fit_method(rows, "linear", ("moved_sum",))
    combined = fit_method(rows, "ties", ("moved_sum",), alpha_diff=1.0, diff_features=("balance", "moved_sum"))
    assert combined.features == ("moved_sum", "balance")
    diff = fit_model([r["features"] for r in rows], [r["y"]["ties"] - r["y"]["linear"] for r in rows],
                     ("balance", "moved_sum"), alpha=1.0)
    for r in rows:  # the sum of the two models, pair by pair
        assert combined.raw(r["features"]) == pytest.approx(ref.raw(r["features"]) + diff.raw(r["features"]))


def test_held_out_setting_folds_hold_out_each_run_in_turn_and_refuse_a_single_run(tmp_path: Path) -> None:
    rows = _settings_rows(tmp_path)
    found = folds(rows, "setting")
    assert len(found) == 3
    for train, test in found:
        held = {rows[i]["setting"] for i in test}
        assert len(held) == 1 and len(test) == 24
        assert held.isdisjoint({r["setting"] for r in train}) and len(train) == 48
    with pytest.raises(ValueError, match="at least two fit runs"):
        folds(rows[:24], "setting")
    with pytest.raises(ValueError, match="'task' or 'setting'"):
        folds(rows, "seed")


def test_held_out_setting_residuals_come_from_fits_that_never_saw_the_run(tmp_path: Path) -> None:
    rows = _settings_rows(tmp_path)
    choice = Choice(("moved_sum",))
    held = held_out_predictions(rows, "linear", choice, by="setting")
    for name in {r["setting"] for r in rows}:
        model = choice.fit([r for r in rows if r["setting"] != name], "linear")
        for r, p in zip(rows, held, strict=True):
            if r["setting"] == name:
                assert p == pytest.approx(min(1.0, max(0.0, model.raw(r["features"]))))
    predictor = fit_predictor(rows, METHODS, {}, choice=choice, residuals="setting")
    residuals = [r["y"]["linear"] - p for r, p in zip(rows, held, strict=True)]
    assert predictor.with_base["linear"].residual_low == pytest.approx(_quantile(residuals, 0.1))
    assert predictor.with_base["linear"].residual_high == pytest.approx(_quantile(residuals, 0.9))
    by_task = fit_predictor(rows, METHODS, {}, choice=choice, residuals="task")
    assert by_task.with_base["linear"].residual_low != pytest.approx(_quantile(residuals, 0.1))


def test_the_selection_fast_path_gives_the_products_retentions(tmp_path: Path) -> None:
    rows = _settings_rows(tmp_path)
    choice = Choice(("moved_sum", "balance"), 10.0, 1.0, ("balance",))
    models = {m: choice.fit(rows, m) for m in METHODS}
    predictor = Predictor(models, {}, 0.0, {})
    # the fitted pairs, and pairs far outside them on both sides (predictions clipped at 0 and at 1)
    inputs = [r["features"] for r in rows] + [{**rows[0]["features"], "moved_sum": v} for v in (-30.0, 30.0)]
    for x in inputs:
        fast = _retentions(models, x)
        slow = predictor.predict(x)
        assert {m: p.retention for m, p in fast.items()} == {m: p.retention for m, p in slow.items()}
    assert {p.retention for x in inputs[-2:] for p in _retentions(models, x).values()} == {0.0, 1.0}


def test_choose_ranks_by_held_out_settings_and_scores_each_run_by_a_model_chosen_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _settings_rows(tmp_path)
    pool = ("moved_sum", "balance", "task_cosine")
    ranked = select_level(rows, METHODS, pool, alphas=(1.0, 100.0), max_size=2)
    assert len(ranked) == (3 + 3) * 2
    assert [s for s, _ in ranked] == sorted((s for s, _ in ranked), reverse=True)
    # retention falls with the summed drift by construction: moved_sum is in the best set, noise is not alone
    assert "moved_sum" in ranked[0][1].features and ranked[0][0] > 0.8
    level = ranked[0][1]
    diffs = select_difference(rows, METHODS, level, pool, alphas=(1.0, 1e-3))
    assert [s for s, _ in diffs] == sorted((s for s, _ in diffs), reverse=True)
    tried = [replace(level, alpha_diff=a, diff_features=(f,)) for f in pool for a in (1.0, 1e-3)]
    kept = [c for c in tried if _setting_figures(rows, METHODS, c)[0] >= _setting_figures(rows, METHODS, level)[0]]
    assert 0 < len(kept) < len(tried)  # some differences lower the held-out Spearman: those are left out
    assert {c for _, c in diffs} == {level, *kept}
    # linear is best by construction (ties lose 0.1): every candidate recommends it for every pair
    assert diffs[0][0] == 1.0 and diffs[0][1] == ranked[0][1]
    paths = [str(tmp_path / f"s{seed}.json") for seed in (0, 1, 2)]
    report = main([a for p in paths for a in ("--fit", p)] + ["--choose", "--max-size", "1",
                                                              "--write", str(tmp_path / "p.json")])
    nested = report["held_out_settings"]
    assert set(nested) == set(paths)
    for found in nested.values():
        assert found["with_base"]["n_pairs"] == 24
        assert found["with_base"]["methods"]["linear"]["spearman"] > 0.8
    written = load_predictor.__wrapped__(tmp_path / "p.json")
    assert written.provenance["residuals"] == "each fit run predicted by a pooled fit on the others"
    assert len(written.provenance["settings"]) == 3 and written.provenance["selection"]["how"]
    with pytest.raises(ValueError, match="at least three --fit runs"):
        main(["--fit", paths[0], "--fit", paths[1], "--choose"])
    assert "held-out setting" in capsys.readouterr().out
