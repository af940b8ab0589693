"""mergelens 2.0.3's MCI of benchmark pairs; runs in the peer venv, NOT in ours (it imports only `mergelens`).

    .bench/peer-venv/bin/python benchmarks/mergeability/peer_mci.py < jobs.json

stdin: {"base": PATH, "pairs": [[KEY, PATH_A, PATH_B], ...], "direct": N}. stdout: JSON lines, first
{"version": ...}, then one {"key", "peer_mci", "risk_tier", "direct_mci"} per pair.

2.0.3 scores `compare A B --base C` as the lowest of its per-candidate assessments (each candidate against the
base alone; its metadata says `aggregate_rule: minimum_pair_score`), so each fine-tune is assessed once, two
per `compare_models` call, and a pair's MCI is the lower of its two; the first `direct` pairs are also
scored with a real `compare_models([A, B], base_model=C)` call, as `direct_mci`, to check that this holds.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from mergelens import __version__, compare_models

    jobs = json.load(sys.stdin)
    base = jobs["base"]
    pairs = jobs["pairs"]
    print(json.dumps({"version": __version__}), flush=True)

    def compare(paths: list[str]):
        return compare_models(model_paths=paths, base_model=base, device="cpu", show_progress=False)

    models = sorted({p for _, a, b in pairs for p in (a, b)})
    assessed: dict[str, tuple[float | None, str]] = {}
    for i in range(0, len(models), 2):
        chunk = models[i:i + 2]
        result = compare(chunk if len(chunk) == 2 else [chunk[0], chunk[0]])
        rule = result.metadata.get("aggregate_rule")
        if rule != "minimum_pair_score":
            raise SystemExit(f"mergelens {__version__} aggregates with {rule!r}, not minimum_pair_score")
        for index, path in enumerate(chunk):
            mci = result.pair_assessments[f"comparison_{index}"]
            assessed[path] = (mci.score, mci.risk_tier)
        print(f"assessed {len(assessed)}/{len(models)} models", file=sys.stderr, flush=True)
    for n, (key, a, b) in enumerate(pairs):
        low = min((assessed[a], assessed[b]), key=lambda s: float(s[0] or 0.0))
        score = None if assessed[a][0] is None or assessed[b][0] is None else low[0]
        row = {"key": key, "peer_mci": score, "risk_tier": low[1] if score is not None else None}
        if n < jobs.get("direct", 0):
            row["direct_mci"] = compare([a, b]).mci.score
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
