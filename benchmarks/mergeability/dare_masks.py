"""For a run whose seed is not 0: the outcome of the DARE merges the preview merged (masks drawn from seed 0, as
`mergekit-yaml` draws them by default; a config cannot name a seed) against the run's (masks from the run's
seed), and the preview's Spearman and best-method hits with each.

    python -m benchmarks.mergeability.dare_masks /work/bench/seed2 .bench/preview-seed2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .merge import METHODS, merge_states
from .model import build_model, load_config, load_state
from .run import TOLERANCE
from .stats import spearman
from .tasks import accuracy, make_test_set

DARE = ("dare_ties", "dare_linear")


def seed0_outcomes(run: Path, out: Path, keys: list[str]) -> dict[str, dict[str, float]]:
    """Normalized accuracy of each pair's DARE merges with the masks drawn from seed 0."""
    manifest = json.loads((run / "checkpoints.json").read_text())
    ft, settings = manifest["finetunes"], manifest["settings"]
    checkpoints = out / "checkpoints"
    base, config = load_state(checkpoints / "base"), load_config(checkpoints / "base")
    tests: dict = {}
    result = {}
    for key in keys:
        a, b = key.split("|")
        ta, tb = ft[a]["task"], ft[b]["task"]
        for task in (ta, tb):
            tests.setdefault(task, make_test_set(task, settings["seed"], settings["test_size"]))
        sa, sb = load_state(checkpoints / a), load_state(checkpoints / b)
        result[key] = {}
        for method in DARE:
            model = build_model(config, merge_states(METHODS[method], base, sa, sb, seed=0))
            result[key][method] = (accuracy(model, tests[ta]) / ft[a]["accuracy"][ta]
                                   + accuracy(model, tests[tb]) / ft[b]["accuracy"][tb]) / 2
    return result


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    run, out = Path(argv[0]), Path(argv[1])
    summary = json.loads((out / "summary.json").read_text())
    previews = json.loads((out / "preview.json").read_text())
    cached = json.loads((run / "outcomes.json").read_text())["pairs"]
    keys = sorted({r["pair"] for r in summary["verify"]} | {k for k in previews if k in cached})
    keys = [k for k in keys if k in previews and k in cached and k in _kept(run)]
    mine = seed0_outcomes(run, out, keys)
    (out / "dare_seed0_outcomes.json").write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
    print(f"{len(keys)} pairs")
    for method in DARE:
        for probe_set in ("task", "generic"):
            retention = [previews[k][probe_set]["methods"][method]["retention"] for k in keys]
            theirs = [cached[k]["merged"][method]["normalized"] for k in keys]
            ours = [mine[k][method] for k in keys]
            print(f"{method}, {probe_set} probes: Spearman with the run's merges {spearman(retention, theirs):+.3f}, "
                  f"with the merges previewed (seed-0 masks) {spearman(retention, ours):+.3f}")
    for probe_set in ("task", "generic"):
        hits = 0
        for k in keys:
            outcomes = {m: cached[k]["merged"][m]["normalized"] for m in METHODS} | mine[k]
            hits += outcomes[previews[k][probe_set]["best"]] >= max(outcomes.values()) - TOLERANCE
        print(f"{probe_set} probes: best method within {TOLERANCE * 100:.0f} points, DARE outcomes of the merges "
              f"previewed: {hits}/{len(keys)}")


def _kept(run: Path) -> set[str]:
    from .run import cross_task_pairs, kept_finetunes

    manifest = json.loads((run / "checkpoints.json").read_text())
    return {f"{a}|{b}" for a, b in cross_task_pairs(manifest, kept_finetunes(manifest, 0.9))}


if __name__ == "__main__":
    main(sys.argv[1:])
