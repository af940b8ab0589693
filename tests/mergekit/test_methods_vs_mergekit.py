"""Our merge methods against mergekit 0.1.5 itself: the same config through `mergekit-yaml` on generated
Llama-shaped checkpoints gives the same merged tensors.

mergekit runs from its own virtualenv (`.bench/mergekit-venv`, built by `make mergekit-venv`, torch pinned
first); without it these tests skip and say so. Each method is one `mergekit-yaml` run over the whole model
(its entry point, all runs in one process). Deterministic methods: every element within one bfloat16 ulp
(float32 output: one float32 ulp; near zero, float32 rounding at the tensor's scale). Random methods
(dare_*, della): with mergekit's `--random-seed` stream replayed (one generator, tensors in name order) the
same tensors; with another seed the same statistics (share of changed entries, mean |change|).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.checkpoints import Family
from mergelens_mcp.mergekit.methods import METHODS, SLERP_LINEAR_FALLBACK, merge_tensors, seeded_stream

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_YAML = ROOT / ".bench" / "mergekit-venv" / "bin" / "mergekit-yaml"
SEED = 7

# method -> (models in config order, per-model parameters, shared parameters, out_dtype); "base" is the base.
CASES: dict[str, tuple[list[str], list[dict], dict, str]] = {
    "linear": (["finetune_a", "finetune_b"], [{"weight": 0.7}, {"weight": 0.4}], {}, "bfloat16"),
    "task_arithmetic": (
        ["finetune_a", "finetune_b"], [{"weight": 0.6}, {"weight": 0.9}], {"lambda": 0.8}, "bfloat16",
    ),
    "task_arithmetic_float32": (
        ["finetune_a", "finetune_b"], [{"weight": 0.6}, {"weight": 0.9}], {"normalize": True}, "float32",
    ),
    "ties": (
        ["finetune_a", "finetune_b", "flipped"],
        [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}, {"weight": 0.8, "density": 0.5}],
        {"lambda": 0.9, "int8_mask": True}, "bfloat16",
    ),
    "dare_ties": (
        ["finetune_a", "finetune_b", "flipped"],
        [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}, {"weight": 0.8, "density": 0.5}],
        {}, "bfloat16",
    ),
    "dare_linear": (
        ["finetune_a", "finetune_b"], [{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.6}],
        {"rescale": True}, "bfloat16",
    ),
    "slerp": (["finetune_b"], [{}], {"t": 0.35}, "bfloat16"),
    "model_stock": (["finetune_a", "finetune_b", "flipped"], [{}, {}, {}], {}, "bfloat16"),
    "breadcrumbs": (
        ["finetune_a", "finetune_b"],
        [{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.6, "density": 0.6, "gamma": 0.02}],
        {}, "bfloat16",
    ),
    "della": (
        ["finetune_a", "finetune_b"],
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 0.7, "density": 0.6, "epsilon": 0.1}],
        {"lambda": 1.1}, "bfloat16",
    ),
    "passthrough": (["finetune_a"], [{"scale": 0.5}], {}, "bfloat16"),
}
RANDOM = [name for name in CASES if METHODS[name.split("_float32")[0]].random]


def method_of(case: str) -> str:
    return case.removesuffix("_float32")


def config(case: str, family: Family) -> dict:
    models, per_model, shared, out_dtype = CASES[case]
    method = method_of(case)
    doc: dict = {
        "merge_method": method,
        "models": [
            {"model": str(getattr(family, m)), **({"parameters": p} if p else {})}
            for m, p in zip(models, per_model, strict=True)
        ],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    if METHODS[method].needs_base:
        doc["base_model"] = str(family.base)
    if shared:
        doc["parameters"] = shared
    return doc


def run_mergekit(family: Family, root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every case through mergekit-yaml's entry point, one run per case, all in one process of its venv (one
    import of mergekit instead of one per case: the same runs, a third of the time)."""
    jobs = []
    for case in CASES:
        (root / case).mkdir()
        path = root / case / "merge.yaml"
        path.write_text(json.dumps(config(case, family)))  # JSON is YAML
        jobs.append([case, str(path), str(root / case / "out")])
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    python = MERGEKIT_YAML.parent / "python"
    done = subprocess.run([str(python), "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, f"mergekit-yaml failed:\n{done.stdout[-500:]}\n{done.stderr[-3000:]}"
    outputs = {}
    for case in CASES:
        merged: dict[str, torch.Tensor] = {}
        for file in sorted((root / case / "out").glob("*.safetensors")):
            merged.update(load_file(file))
        outputs[case] = merged
    return outputs


# What `mergekit-yaml CONFIG OUT --random-seed 7 ...` runs, once per case.
DRIVER = f"""
import json, sys
from mergekit.scripts.run_yaml import main
for case, config, out in json.loads(sys.argv[1]):
    print("case", case, flush=True)
    main.main(args=[config, out, "--random-seed", "{SEED}", "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if not MERGEKIT_YAML.exists():
        pytest.skip(f"mergekit 0.1.5 is not installed at {MERGEKIT_YAML.parent.parent}: build it with "
                    "`make mergekit-venv`")
    return run_mergekit(family, tmp_path_factory.mktemp("mergekit"))


def load_inputs(family: Family) -> dict[str, dict[str, torch.Tensor]]:
    return {m: load_file(getattr(family, m) / "model.safetensors")
            for m in ("base", "finetune_a", "finetune_b", "flipped")}


def ours(case: str, inputs: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The whole model merged by our methods, tensors in name order (the order mergekit draws them in)."""
    models, per_model, shared, out_dtype = CASES[case]
    method = method_of(case)
    names = sorted({p for m in per_model for p in m})
    parameters = {p: [m[p] for m in per_model] for p in names} | shared
    merged = {}
    for name in sorted(inputs["base"]):
        merged[name] = merge_tensors(
            method, [inputs[m][name] for m in models], base=inputs["base"][name], parameters=parameters,
            generator=generator, out_dtype=getattr(torch, out_dtype),
        )
    return merged


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value in x's dtype: eps * 2**floor(log2 |x|)."""
    info = torch.finfo(x.dtype)
    _, exponent = torch.frexp(x.float().abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full(x.shape, info.eps), exponent - 1)


def assert_same_tensors(case: str, got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), case
    for name, theirs in want.items():
        mine = got[name]
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (case, name)
        diff = (mine.float() - theirs.float()).abs()
        # near zero a float32 rounding difference of the computation outweighs the values' own ulp
        floor = torch.finfo(torch.float32).eps * float(theirs.float().abs().max())
        tolerance = torch.maximum(ulp(mine), ulp(theirs)).clamp_min(floor)
        worst = float((diff - tolerance).max())
        assert worst <= 0, f"{case} {name}: max |diff| {float(diff.max()):.3g} beyond one ulp"


@pytest.mark.parametrize("case", list(CASES))
def test_our_merge_gives_mergekits_tensors_within_one_ulp(case, family, mergekit_outputs):
    generator = seeded_stream(SEED) if case in RANDOM else None
    assert_same_tensors(case, ours(case, load_inputs(family), generator), mergekit_outputs[case])


@pytest.mark.parametrize("case", RANDOM)
def test_a_random_method_with_another_seed_keeps_mergekits_statistics(case, family, mergekit_outputs):
    inputs = load_inputs(family)
    mine = ours(case, inputs, seeded_stream(SEED + 1000))
    theirs = mergekit_outputs[case]
    assert any(not torch.equal(mine[n], theirs[n]) for n in theirs), "another seed should draw other masks"
    deltas = {"ours": [], "mergekit": []}
    for name in sorted(theirs):
        base = inputs["base"][name].float()
        deltas["ours"].append((mine[name].float() - base).flatten())
        deltas["mergekit"].append((theirs[name].float() - base).flatten())
    a, b = torch.cat(deltas["ours"]), torch.cat(deltas["mergekit"])
    changed_a, changed_b = float((a != 0).float().mean()), float((b != 0).float().mean())
    assert abs(changed_a - changed_b) < 0.01, (case, changed_a, changed_b)
    mass_a, mass_b = float(a.abs().mean()), float(b.abs().mean())
    assert abs(mass_a - mass_b) <= 0.03 * mass_b, (case, mass_a, mass_b)

def test_every_registered_method_of_the_brief_is_checked_against_mergekit():
    checked = {method_of(case) for case in CASES}
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock",
            "breadcrumbs", "della", "passthrough"} <= checked


def test_the_slerp_case_takes_both_the_spherical_and_the_linear_branch(family):
    inputs = load_inputs(family)
    cosines = [float(torch.nn.functional.cosine_similarity(
        inputs["base"][n].float().flatten(), inputs["finetune_b"][n].float().flatten(), dim=0)) for n in inputs["base"]]
    assert any(abs(c) > SLERP_LINEAR_FALLBACK for c in cosines)
    assert any(abs(c) <= SLERP_LINEAR_FALLBACK for c in cosines)
