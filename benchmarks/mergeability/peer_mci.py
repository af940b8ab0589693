"""mergelens 2.0.3's MCI of benchmark pairs; runs in the peer venv, NOT in ours (it imports only `mergelens`).

    .bench/peer-venv/bin/python benchmarks/mergeability/peer_mci.py < jobs.json

stdin: {"base": PATH, "pairs": [[KEY, PATH_A, PATH_B], ...]}. stdout: JSON lines, first {"version": ...},
then one {"key", "peer_mci", "risk_tier", "seconds"} per pair, from `compare_models([A, B], base_model=C)`
in this one process: what `mergelens compare A B --base C --json` writes as `mci.score` and `mci.risk_tier`.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    from mergelens import __version__, compare_models

    jobs = json.load(sys.stdin)
    print(json.dumps({"version": __version__}), flush=True)
    for n, (key, a, b) in enumerate(jobs["pairs"]):
        started = time.perf_counter()
        result = compare_models(model_paths=[a, b], base_model=jobs["base"], device="cpu", show_progress=False)
        print(json.dumps({"key": key, "peer_mci": result.mci.score, "risk_tier": result.mci.risk_tier,
                          "seconds": round(time.perf_counter() - started, 2)}), flush=True)
        if (n + 1) % 20 == 0:
            print(f"peer scored {n + 1}/{len(jobs['pairs'])} pairs", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
