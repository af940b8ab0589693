"""Leave-one-task-out evaluation of the MCI's fitted constants.

The MCI's distance and drift constants (`mergelens_mcp.analysis.score`: DISTANCE_SCALE, DRIFT_SCALE and the
weights of the `distance` and `drift` components) were chosen on this benchmark. Their honest figure is the
one where the task being predicted took no part in the choice: for each task, the grid point with the best
mean Spearman over merge methods is selected on the pairs without that task, and that point's MCI is scored
on the pairs with it.

The MCI is recomputed from the per-layer metrics saved in `results.json`, through the product's own
`components`, `layer_score` and `overall_score` given a tuned copy of the product's catalogue
(`Constants.catalogue()`), so the formula cannot drift from the product's and nothing of the product is
patched; `recompute_mci` with the product's own catalogue must give back `r.mci.composite` (the weight-space
composite; the headline `r.mci.score` of a pair is the predicted retention of its recommended method).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .stats import mean, spearman

if TYPE_CHECKING:
    from mergelens_mcp.analysis.score import Catalogue


@dataclass(frozen=True)
class Constants:
    distance_scale: float
    distance_weight: float
    drift_scale: float
    drift_weight: float

    def label(self) -> str:
        return (f"distance exp(-l2/{self.distance_scale:g}) x{self.distance_weight:g}, "
                f"drift scale {self.drift_scale:g} x{self.drift_weight:g}")

    def catalogue(self) -> Catalogue:
        """The product's component catalogue with these constants in its `distance` and `drift` entries."""
        from mergelens_mcp.analysis.score import CATALOGUE

        return CATALOGUE.replace("distance", scale=self.distance_scale, weight=self.distance_weight).replace(
            "drift", scale=self.drift_scale, weight=self.drift_weight
        )


def current_constants() -> Constants:
    from mergelens_mcp.analysis.score import CATALOGUE

    distance, drift = CATALOGUE["distance"], CATALOGUE["drift"]
    assert distance.scale is not None and drift.scale is not None
    return Constants(distance.scale, distance.weight, drift.scale, drift.weight)


GRID = [
    Constants(*point)
    for point in itertools.product(
        (0.05, 0.1, 0.2, 0.3, 0.5), (0.2, 0.4, 0.8, 1.2), (0.1, 0.3, 0.5, 1.0), (0.2, 0.4, 0.8)
    )
]


def recompute_mci(layers: Sequence[dict], catalogue: Catalogue | None = None) -> float:
    """The MCI of one pair from its saved layers (`metrics`, `n_params`), as the engine computes it, with
    `catalogue` (default: the product's own)."""
    from mergelens_mcp.analysis import score

    catalogue = score.CATALOGUE if catalogue is None else catalogue
    layer_scores = []
    for layer in layers:
        parts = {k: round(v, 6) for k, v in score.components(layer["metrics"], catalogue).items()}
        layer_scores.append(round(100 * score.layer_score(parts, catalogue), 2) / 100)
    return score.overall_score(layer_scores, [layer["n_params"] for layer in layers])


def grid_scores(pairs: Sequence[dict], grid: Sequence[Constants] = GRID) -> dict[Constants, list[float]]:
    """The MCI of every pair at every grid point."""
    out = {}
    for constants in grid:
        catalogue = constants.catalogue()
        out[constants] = [recompute_mci(p["score"]["layers"], catalogue) for p in pairs]
    return out


def select(
    scores: dict[Constants, list[float]], outcomes: dict[str, list[float]], rows: Sequence[int]
) -> Constants:
    """The grid point with the best mean Spearman over methods on `rows`."""

    def quality(constants: Constants) -> float:
        x = [scores[constants][i] for i in rows]
        return mean([spearman(x, [y[i] for i in rows]) for y in outcomes.values()]) or -1.0

    return max(scores, key=quality)


def leave_one_task_out(
    pairs: Sequence[dict],
    outcomes: dict[str, list[float]],
    scores: dict[Constants, list[float]],
    baselines: dict[str, list[float]] | None = None,
) -> dict:
    """Per held-out task: the grid point chosen without it and the Spearman it reaches on its pairs.

    `baselines` (unfitted predictors) are scored on the same held-out pairs, for comparison.
    """
    baselines = baselines or {}
    tasks = sorted({t for p in pairs for t in (p["task_a"], p["task_b"])})
    folds = {}
    for task in tasks:
        train = [i for i, p in enumerate(pairs) if task not in (p["task_a"], p["task_b"])]
        test = [i for i, p in enumerate(pairs) if task in (p["task_a"], p["task_b"])]
        chosen = select(scores, outcomes, train)
        x = [scores[chosen][i] for i in test]
        folds[task] = {
            "chosen": chosen.label(),
            "held_out_spearman": {m: spearman(x, [y[i] for i in test]) for m, y in outcomes.items()},
            "baselines": {
                name: {m: spearman([b[i] for i in test], [y[i] for i in test]) for m, y in outcomes.items()}
                for name, b in baselines.items()
            },
        }
    per_method = {m: mean([f["held_out_spearman"][m] for f in folds.values()]) for m in outcomes}
    baseline_means = {
        name: {m: mean([f["baselines"][name][m] for f in folds.values()]) for m in outcomes}
        for name in baselines
    }
    # pooled: each pair scored at the point chosen on the pairs that share neither of its tasks
    pooled: list[float] = []
    chosen_for: dict[frozenset[str], Constants] = {}
    for k, p in enumerate(pairs):
        own = frozenset((p["task_a"], p["task_b"]))
        if own not in chosen_for:
            train = [i for i, q in enumerate(pairs) if not own & {q["task_a"], q["task_b"]}]
            chosen_for[own] = select(scores, outcomes, train)
        pooled.append(scores[chosen_for[own]][k])
    in_sample = select(scores, outcomes, range(len(pairs)))
    return {
        "grid_points": len(scores),
        "in_sample_choice": in_sample.label(),
        "in_sample_spearman": {m: spearman(scores[in_sample], y) for m, y in outcomes.items()},
        "folds": folds,
        "held_out_spearman_mean_over_tasks": per_method,
        "held_out_spearman_mean": mean(list(per_method.values())),
        "baselines_on_held_out_pairs": baseline_means,
        "pooled_leave_both_tasks_out_spearman": {m: spearman(pooled, y) for m, y in outcomes.items()},
    }
