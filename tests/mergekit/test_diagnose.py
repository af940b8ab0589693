from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mergelens_mcp
from fixtures.checkpoints import Family, Shape, random_model, save
from fixtures.configs import broken_configs, linear_config, slerp_config, ties_config
from mergelens_mcp import diagnose_config
from mergelens_mcp.errors import AnalysisCancelledError, ConfigError, PathNotAllowedError
from mergelens_mcp.mergekit.simulate import trim
from mergelens_mcp.models import ConfigDiagnosis, FindingLevel
from mergelens_mcp.security.paths import PathGuard
from mergelens_mcp.service import diagnose

REPO = Path(__file__).resolve().parents[2]
TENSOR = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def broken(family: Family) -> dict[str, str]:
    return broken_configs(str(family.finetune_a), str(family.finetune_b), str(family.base))


@pytest.mark.parametrize("code", sorted(broken_configs()))
def test_each_kind_of_config_mistake_is_found_with_its_path_and_fix(
    code: str, broken: dict[str, str],
) -> None:
    result = diagnose_config(broken[code])
    found = [f for f in result.findings if f.code == code]
    assert found, [f.code for f in result.findings]
    assert all(f.fix and f.path for f in found)
    if any(f.level is FindingLevel.ERROR for f in found):
        assert not result.valid


def test_finding_paths_point_at_the_offending_yaml_node(broken: dict[str, str]) -> None:
    def paths(code: str) -> list[str | None]:
        return [f.path for f in diagnose_config(broken[code]).findings if f.code == code]

    assert paths("density_out_of_range") == ["models[1].parameters.density"]
    assert paths("unknown_parameter") == ["models[0].parameters.t"]
    assert paths("unknown_key") == ["paramters"]
    assert paths("string_number") == ["models[0].parameters.density"]
    assert paths("slice_out_of_range") == ["slices[1].sources[0].layer_range"]
    assert paths("gradient_too_long") == ["parameters.t"]


def test_the_fixes_suggest_the_name_that_was_probably_meant(broken: dict[str, str]) -> None:
    fixes = {f.code: f.fix for code in ("unknown_key", "unknown_method")
             for f in diagnose_config(broken[code]).findings}
    assert fixes == {"unknown_key": "did you mean 'parameters'?", "unknown_method": "did you mean 'ties'?"}


def test_a_sound_config_on_readable_models_is_valid_and_simulated(family: Family) -> None:
    config = yaml.safe_dump(ties_config(str(family.finetune_a), str(family.finetune_b), str(family.base)))
    result = diagnose_config(config)
    assert result.valid and result.findings == []
    assert result.models_checked == [str(family.finetune_a), str(family.finetune_b), str(family.base)]
    assert list(result.interference_scores) == [
        "embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head",
    ]
    assert result.overall_interference is not None and result.overall_interference < 0.05


def test_a_sign_flipped_layer_shows_as_the_interference_peak(family: Family) -> None:
    config = yaml.safe_dump(ties_config(str(family.finetune_a), str(family.flipped), str(family.base)))
    result = diagnose_config(config)
    scores = result.interference_scores
    assert max(scores, key=lambda name: scores[name]) == "layers.2"
    assert scores["layers.2"] > 0.2 > scores["layers.1"]
    assert [f.code for f in result.findings] == ["sign_conflict"]
    assert "layers.2" in result.findings[0].message


def _write(folder: Path, matrix: list[list[float]]) -> str:
    folder.mkdir(parents=True)
    save_file({TENSOR: torch.tensor(matrix, dtype=torch.float32)}, str(folder / "model.safetensors"))
    return str(folder)


def test_ties_simulation_matches_a_hand_computed_case(tmp_path: Path) -> None:
    base = _write(tmp_path / "base", [[0, 0], [0, 0]])
    a = _write(tmp_path / "a", [[1, 2], [3, 4]])
    b = _write(tmp_path / "b", [[-1, 2], [3, -8]])
    # density 1, weights 1: sum = [0, 4, 6, -4]; elected signs [+, +, +, -] (mergekit: a zero sum elects +);
    # losing mass 1 (b's -1 at coord 0) + 4 (a's +4 at coord 3) = 5 of 24
    full = diagnose_config(yaml.safe_dump(ties_config(a, b, base, density=1.0, weights=(1.0, 1.0))))
    assert full.interference_scores == {"layers.0": pytest.approx(5 / 24, abs=1e-6)}  # rounded to 6 places
    # density 0.5 keeps a = [0, 0, 3, 4], b = [0, 0, 3, -8]: sum [0, 0, 6, -4]; a's 4 loses, of 18
    half = diagnose_config(yaml.safe_dump(ties_config(a, b, base, density=0.5, weights=(1.0, 1.0))))
    layer = half.layers[0]
    assert layer.interference == pytest.approx(4 / 18) and layer.sign_conflict == pytest.approx(4 / 18)
    assert layer.survival == {a: pytest.approx(7 / 10), b: pytest.approx(11 / 14)}


def test_linear_and_slerp_simulation_match_hand_computed_cases(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", [[1, 2], [3, 4]])
    b = _write(tmp_path / "b", [[-1, 2], [3, -8]])
    doubled = _write(tmp_path / "a2", [[2, 4], [6, 8]])
    # 0.5 a + 0.5 b = [0, 2, 3, -2]: |.| sum 7 of (10 + 14) / 2 = 12 -> 5/12 cancels
    linear = diagnose_config(yaml.safe_dump(linear_config(a, b)))
    assert linear.overall_interference == pytest.approx(5 / 12)
    slerp = diagnose_config(yaml.safe_dump(slerp_config(a, doubled)))
    assert slerp.layers[0].slerp_linear_share == 1.0 and slerp.overall_interference == pytest.approx(0.0)
    assert [f.code for f in slerp.findings] == ["slerp_degenerate"]


def test_models_that_are_not_local_are_not_downloaded_and_not_simulated() -> None:
    result = diagnose_config(yaml.safe_dump(ties_config("org/ft-a", "org/ft-b", "org/base")))
    assert result.valid and result.models_checked == [] and result.overall_interference is None
    assert any("not downloaded" in n for n in result.notes)


def test_malformed_yaml_raises_a_config_error_naming_the_line() -> None:
    with pytest.raises(ConfigError, match="line 4, column 2"):
        diagnose_config("merge_method: ties\nmodels:\n  - model: a\n bad: [1,\n")


@pytest.mark.parametrize(("text", "message"), [
    ("- merge_method: ties\n", "not a mapping"),
    ("# nothing\n", "is empty"),
    ("merge_method: ties\n---\nmerge_method: linear\n", "several YAML documents"),
])
def test_yaml_that_is_not_one_mergekit_mapping_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        diagnose_config(text)


def test_a_config_file_outside_the_allowed_roots_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(linear_config("org/a", "org/b")))
    with pytest.raises(PathNotAllowedError):
        diagnose(str(path), guard=PathGuard([tmp_path / "elsewhere"]))
    assert diagnose(str(path), guard=PathGuard([tmp_path])).merge_method == "linear"


def test_models_named_in_the_yaml_go_through_the_path_guard(tmp_path: Path, family: Family) -> None:
    config = yaml.safe_dump(ties_config(str(family.finetune_a), str(family.finetune_b), str(family.base)))
    result = diagnose(config, guard=PathGuard([tmp_path]))
    assert result.models_checked == [] and result.overall_interference is None
    assert {f.code for f in result.findings} == {"model_unreadable"}
    assert "outside the allowed roots" in result.findings[0].message


def test_diagnose_config_is_public_and_returns_a_frozen_diagnosis() -> None:
    assert {"diagnose_config", "ConfigDiagnosis"} <= set(mergelens_mcp.__all__)
    result = diagnose_config(yaml.safe_dump(linear_config("org/a", "org/b")))
    assert isinstance(result, ConfigDiagnosis)
    with pytest.raises(ValueError):
        result.valid = False  # type: ignore[misc]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergelens_mcp", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_diagnose_prints_severity_path_and_fix_and_exits_by_validity(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(broken_configs()["density_out_of_range"])
    run = _cli("diagnose", "--config", str(bad), "--json", str(tmp_path / "out.json"))
    assert run.returncode == 1, run.stderr
    assert "[error] at models[1].parameters.density: density 1.5 is outside (0, 1]" in run.stdout
    assert "fix: use e.g. 0.5" in run.stdout
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["valid"] is False and saved["findings"][0]["code"] == "density_out_of_range"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(linear_config("org/a", "org/b")))
    assert _cli("diagnose", "--config", str(good)).returncode == 0
    missing = _cli("diagnose", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "is not a file" in " ".join(missing.stderr.split())
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("merge_method: ties\nmodels: [a,\n")
    run = _cli("diagnose", "--config", str(malformed))
    assert run.returncode == 2 and "invalid YAML at line 3" in " ".join(run.stderr.split())


def _slices(spec: list[list[tuple[str, int, int]]], method: str, **top: object) -> str:
    slices = [{"sources": [{"model": m, "layer_range": [s, e]} for m, s, e in sources]} for sources in spec]
    return yaml.safe_dump({"merge_method": method, "slices": slices, "parameters": top, "dtype": "bfloat16"})


def test_a_slices_config_over_the_whole_depth_simulates_like_the_models_config(family: Family) -> None:
    a, b = str(family.finetune_a), str(family.finetune_b)
    models = diagnose_config(yaml.safe_dump(slerp_config(a, b, t=0.3)))
    sliced = diagnose_config(_slices([[(a, 0, 4), (b, 0, 4)]], "slerp", t=0.3).replace(
        "merge_method: slerp", f"merge_method: slerp\nbase_model: {a}"))
    assert sliced.valid, sliced.findings
    assert sliced.interference_scores == pytest.approx(models.interference_scores)
    assert list(sliced.interference_scores) == list(models.interference_scores)


def test_slices_that_pair_different_depths_interfere_more_than_aligned_ones(family: Family) -> None:
    a, b = str(family.finetune_a), str(family.finetune_b)
    aligned = diagnose_config(_slices([[(a, 0, 2), (b, 0, 2)], [(a, 2, 4), (b, 2, 4)]], "linear", weight=0.5))
    shifted = diagnose_config(_slices([[(a, 0, 2), (b, 2, 4)], [(a, 2, 4), (b, 0, 2)]], "linear", weight=0.5))
    assert aligned.valid and shifted.valid
    blocks = [f"layers.{i}" for i in range(4)]
    for name in blocks:
        assert shifted.interference_scores[name] > 0.2 > 0.01 > aligned.interference_scores[name]
    assert shifted.interference_scores["embed"] == pytest.approx(aligned.interference_scores["embed"])


def test_models_of_different_shapes_are_caught_before_merging(tmp_path: Path, family: Family) -> None:
    other = Shape(hidden=32, intermediate=64)
    save(random_model(other, 1), tmp_path / "small", other)
    result = diagnose_config(yaml.safe_dump(linear_config(str(family.finetune_a), str(tmp_path / "small"))))
    assert not result.valid and result.overall_interference is None
    assert "config_mismatch" in {f.code for f in result.findings}


def test_a_vocab_mismatch_without_a_tokenizer_section_is_flagged(tmp_path: Path, family: Family) -> None:
    grown = Shape(vocab=Shape().vocab + 8)
    save(random_model(grown, 3), tmp_path / "grown", grown)
    config = linear_config(str(family.finetune_a), str(tmp_path / "grown"))
    flagged = diagnose_config(yaml.safe_dump(config))
    vocab = [f for f in flagged.findings if f.code == "vocab_mismatch"]
    assert [f.path for f in vocab] == ["models"] and "tokenizer" in (vocab[0].fix or "")
    config["tokenizer"] = {"source": "union"}
    assert "vocab_mismatch" not in {f.code for f in diagnose_config(yaml.safe_dump(config)).findings}


def test_diagnosis_reports_progress_and_stops_when_cancelled(family: Family) -> None:
    config = yaml.safe_dump(ties_config(str(family.finetune_a), str(family.finetune_b), str(family.base)))
    seen: list[tuple[int, int]] = []
    diagnose(config, progress=lambda done, total, _name: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == len(seen) > 30
    with pytest.raises(AnalysisCancelledError, match="cancelled after 0 of"):
        diagnose(config, cancelled=lambda: True)


def test_trimming_keeps_the_largest_values_and_breadcrumbs_also_drops_the_top_gamma() -> None:
    generator = torch.Generator().manual_seed(0)
    tau = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert trim(tau, 0.5, "magnitude", 0.0, generator).tolist() == [[0.0, 0.0], [3.0, -4.0]]
    assert trim(tau, 0.5, "magnitude_outliers", 0.25, generator).tolist() == [[0.0, -2.0], [3.0, 0.0]]
    assert trim(tau, 1.0, "magnitude", 0.0, generator) is tau
    big = torch.randn(5_000_000, generator=generator)
    kept = trim(big, 0.2, "magnitude", 0.0, generator)
    assert int((kept != 0).sum()) == 1_000_000  # the merge's exact top-k, also on a large tensor
    tied = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])  # equal values straddle the cut: storage order decides
    assert trim(tied, 0.4, "magnitude", 0.0, generator).tolist() == [0.0, 2.0, 0.0, 0.0, 3.0]
    assert trim(tied, 0.4, "magnitude_outliers", 0.2, generator).tolist() == [0.0, 2.0, 2.0, 0.0, 0.0]


def test_the_seed_loop_over_interference_scores_and_the_mapping_uses_both_work(
    tmp_path: Path, family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merge.yaml").write_text(
        yaml.safe_dump(ties_config(str(family.finetune_a), str(family.flipped), str(family.base)))
    )
    scores = mergelens_mcp.diagnose_config("merge.yaml").interference_scores
    printed = [(s.layer_name, s.score) for s in scores]  # the seed API's loop, as documented
    assert printed == list(scores.items()) and len(printed) == len(scores) == 7
    assert printed[3][0] == "layers.2" and printed[3][1] == scores["layers.2"] > 0.2
    assert list(scores) == list(scores.keys()) == [name for name, _ in printed]
    assert list(scores.values()) == [score for _, score in printed]
    assert "layers.2" in scores and max(scores, key=lambda name: scores[name]) == "layers.2"
    assert scores == dict(scores.items()) and isinstance(scores, dict)


def test_the_diagnosis_json_keeps_interference_scores_a_plain_object(family: Family) -> None:
    result = diagnose_config(yaml.safe_dump(ties_config(str(family.finetune_a), str(family.flipped),
                                                       str(family.base))))
    dumped = json.loads(result.model_dump_json())
    assert dumped["interference_scores"] == dict(result.interference_scores.items())
    assert type(result.model_dump()["interference_scores"]) is dict
    assert ConfigDiagnosis.model_validate_json(result.model_dump_json()) == result
    schema = ConfigDiagnosis.model_json_schema()["properties"]["interference_scores"]
    assert schema["type"] == "object" and schema["additionalProperties"] == {"type": "number"}


def test_model_references_are_read_as_mergekit_reads_them_in_both_forms() -> None:
    """The mapping form `model: {model: {path, revision}}` and `path+lora` are model references; a bare
    `model: {path: ...}` is not (mergekit has no such form). Keys are `ModelReference.key`."""
    config = {"merge_method": "linear", "models": [
        {"model": {"model": {"path": "org/a", "revision": "v1"}}, "parameters": {"weight": 0.5}},
        {"model": {"model": "org/b", "lora": "org/lora"}, "parameters": {"weight": 0.5}},
    ]}
    result = diagnose_config(yaml.safe_dump(config))
    assert result.valid and result.findings == [], result.findings
    assert any("org/a@v1: not a local path" in n for n in result.notes)
    config["models"][0]["model"] = {"path": "org/a"}
    found = [(f.code, f.path) for f in diagnose_config(yaml.safe_dump(config)).findings]
    assert found == [("invalid_model", "models[0]")]


def test_a_module_with_both_models_and_slices_is_an_error_at_its_path() -> None:
    config = {"merge_method": "linear", "modules": {"text": {
        "models": [{"model": "org/a", "parameters": {"weight": 1.0}}],
        "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}],
    }}}
    result = diagnose_config(yaml.safe_dump(config))
    assert [(f.level, f.code, f.path) for f in result.findings] == [
        (FindingLevel.INFO, "modules_not_checked", "modules"),
        (FindingLevel.ERROR, "models_and_slices", "modules.text.slices"),
    ]
    assert not result.valid


def test_slerp_simulation_decides_the_linear_fallback_per_whole_tensor_as_mergekit_does(tmp_path: Path) -> None:
    # every row of b is parallel to a's (per-row |cos| = 1), but the flattened tensors are not
    # (cos = 5 / sqrt(2 * 13) = 0.98): mergekit 0.1.5 interpolates spherically here
    a = _write(tmp_path / "a", [[1, 0], [0, 1]])
    b = _write(tmp_path / "b", [[2, 0], [0, 3]])
    result = diagnose_config(yaml.safe_dump(slerp_config(a, b)))
    assert result.layers[0].slerp_linear_share == 0.0
    assert "slerp_degenerate" not in [f.code for f in result.findings]
