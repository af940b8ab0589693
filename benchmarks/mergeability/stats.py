"""Correlations and summaries of the benchmark, in plain Python (no scipy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r; None when fewer than 3 points or either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values and y {len(y)}: pass paired samples")
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rho: Pearson r of the average ranks (ties handled)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values and y {len(y)}: pass paired samples")
    return pearson(average_ranks(x), average_ranks(y))


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def within_group_spearman(
    groups: Sequence[str | tuple[str, ...]], x: Sequence[float], y: Sequence[float]
) -> tuple[float | None, dict[str, float | None]]:
    """For each group name, Spearman of x vs y over the rows that name belongs to; and their mean.

    A row's group may be a tuple (a pair belongs to both of its tasks).
    """
    names: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        for name in (g,) if isinstance(g, str) else g:
            names.setdefault(name, []).append(i)
    per = {
        name: spearman([x[i] for i in rows], [y[i] for i in rows]) for name, rows in sorted(names.items())
    }
    return mean(list(per.values())), per


def leave_one_group_out(
    groups: Sequence[tuple[str, ...]],
    features: Sequence[Sequence[float]],
    y: Sequence[float],
    fit: Callable[[list[Sequence[float]], list[float]], Callable[[Sequence[float]], float]],
) -> list[float | None]:
    """Out-of-group predictions: each row is predicted by a model fitted on rows sharing none of its groups.

    For a row belonging to groups (a, b), the predictor is fitted once per held-out group on the rows outside
    it; the row's prediction comes from the fold of its first group. Rows with no training data get None.
    """
    names = sorted({g for gs in groups for g in gs})
    predictions: list[float | None] = [None] * len(y)
    for name in names:
        train = [i for i, gs in enumerate(groups) if name not in gs]
        test = [i for i, gs in enumerate(groups) if gs[0] == name]
        if not train or not test:
            continue
        predictor = fit([features[i] for i in train], [y[i] for i in train])
        for i in test:
            predictions[i] = predictor(features[i])
    return predictions


def fit_ridge(
    rows: list[Sequence[float]], y: list[float], alpha: float = 1.0
) -> Callable[[Sequence[float]], float]:
    """Ridge regression on standardized features; returns the predictor."""
    import torch

    x = torch.tensor([list(r) for r in rows], dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-12)
    z = (x - mu) / sd
    ym = t.mean()
    a = z.T @ z + alpha * torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, z.T @ (t - ym))

    def predict(row: Sequence[float]) -> float:
        r = (torch.tensor(list(row), dtype=torch.float64) - mu) / sd
        return float(r @ w + ym)

    return predict


def hit_rate(
    recommended: Sequence[str | None], outcomes: Sequence[dict[str, float]], tolerance: float
) -> tuple[float | None, int, int]:
    """Share of rows whose recommended method scores within `tolerance` of the row's best method.

    A recommendation of a method that was not evaluated counts as a miss. Returns (rate, hits, rows), over
    the rows that have a recommendation.
    """
    hits = rows = 0
    for method, scores in zip(recommended, outcomes, strict=True):
        if method is None:
            continue
        rows += 1
        best = max(scores.values())
        if method in scores and scores[method] >= best - tolerance:
            hits += 1
    return (hits / rows if rows else None), hits, rows


def additive_residuals(pairs: Sequence[tuple[str, str]], y: Sequence[float]) -> list[float]:
    """What is left of y after the best fit y_ab ~ mu + e_a + e_b (one effect per model, least squares).

    A predictor that only knows each model alone (e.g. its task-vector norm) explains the additive part; its
    correlation with these residuals measures what it knows about the pair itself.
    """
    import torch

    names = sorted({n for p in pairs for n in p})
    index = {n: i for i, n in enumerate(names)}
    design = torch.zeros(len(pairs), len(names) + 1, dtype=torch.float64)
    design[:, -1] = 1.0
    for row, (a, b) in enumerate(pairs):
        design[row, index[a]] += 1.0
        design[row, index[b]] += 1.0
    target = torch.tensor(list(y), dtype=torch.float64)[:, None]
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
    return (target - design @ solution).flatten().tolist()
