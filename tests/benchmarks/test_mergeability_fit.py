"""The predictor's fit script on a tiny synthetic results table: it fits, scores with the product's code, writes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from benchmarks.mergeability.fit import (
    ALPHA,
    CANDIDATES,
    WITH_BASE,
    fit_method,
    fit_predictor,
    load_rows,
    main,
    select_features,
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
