"""Hostile safetensors files and size caps: every failure is a clear MergeLensError, never a crash or hang."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fixtures.checkpoints import Shape, make_checkpoint, random_model, save
from fixtures.hostile import TINY, Sandbox, in_bounded_thread, safetensors_bytes, tiny_model
from mergelens_mcp.analysis import loading
from mergelens_mcp.analysis.loading import Checkpoint, load_checkpoint, read_header
from mergelens_mcp.errors import CheckpointFormatError, LimitExceededError, MergeLensError
from mergelens_mcp.security.limits import Limits
from mergelens_mcp.service import compare
from mergelens_mcp.settings import Settings

HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def write(tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def f32(shape: list[int], start: int) -> dict[str, Any]:
    n = math.prod(shape)
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + 4 * n]}


def test_a_header_length_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, safetensors_bytes({"w": f32([2], 0)}, bytes(8), header_len=10_000))
    with pytest.raises(CheckpointFormatError, match="declares a header longer than the file"):
        load_checkpoint(str(path), "model_a")


def test_a_header_length_over_the_cap_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, safetensors_bytes({"w": f32([2], 0)}, bytes(8), header_len=2**64 - 1))
    with pytest.raises(LimitExceededError, match="MERGELENS_MAX_HEADER_BYTES"):
        load_checkpoint(str(path), "model_a")
    with pytest.raises(LimitExceededError, match="over the cap of 16"):
        load_checkpoint(str(path), "model_a", limits=Limits(max_header_bytes=16))


@pytest.mark.parametrize(
    "header, data_len, message",
    [
        ({"a": f32([4], 0), "b": f32([4], 8)}, 24, "overlap"),
        ({"a": f32([4], 0), "b": f32([4], 0)}, 16, "overlap"),
        ({"a": f32([4], 100)}, 16, "outside the file's 16 data bytes"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, 16, "outside"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, 16, "outside"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**70]}}, 16, "outside"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, True]}}, 16, "outside"),
        (
            {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
            16,
            "16 bytes stored but F32 x \\[5\\] needs 20",
        ),
        ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, 16, "needs 8"),
        ({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype 'F99'"),
        ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype"),
        ({"a": {"dtype": {"x": 1}, "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, 16, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, 16, "invalid shape"),
        ({"a": [1, 2, 3]}, 16, "malformed header entry"),
        ([1, 2, 3], 16, "not a JSON object"),
        ("just a string", 16, "not a JSON object"),
        ({}, 0, "holds no tensors"),
    ],
)
def test_corrupt_headers_are_refused_with_a_message_naming_the_problem(
    tmp_path: Path, header: Any, data_len: int, message: str
) -> None:
    path = write(tmp_path, safetensors_bytes(header, bytes(data_len)))
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(path), "model_a")


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe\x00{", b'{"a": "\xc3\x28"}', b"{" * 10, b"", b"null", b'{"a": 1' + b"1" * 5000 + b"}"],
)
def test_undecodable_headers_are_refused(tmp_path: Path, raw: bytes) -> None:
    path = write(tmp_path, safetensors_bytes(raw, bytes(16)))
    with pytest.raises(CheckpointFormatError, match="unreadable header|not a JSON object"):
        load_checkpoint(str(path), "model_a")


@pytest.mark.parametrize("depth", [100_000, 2_000_000])
def test_a_header_of_deeply_nested_brackets_is_refused_in_a_worker_thread_without_recursion_error(
    tmp_path: Path, depth: int
) -> None:
    path = write(tmp_path, safetensors_bytes(b"[" * depth + b"]" * depth))
    with pytest.raises(CheckpointFormatError, match="unreadable header"):
        in_bounded_thread(lambda: load_checkpoint(str(path), "model_a"))


def test_deep_nesting_inside_a_tensor_entry_gives_a_short_message(tmp_path: Path) -> None:
    deep = b'{"a": {"dtype": ' + b"[" * 900 + b"]" * 900 + b', "shape": [1], "data_offsets": [0, 4]}}'
    path = write(tmp_path, safetensors_bytes(deep, bytes(4)))
    with pytest.raises(CheckpointFormatError, match="unknown dtype") as info:
        in_bounded_thread(lambda: load_checkpoint(str(path), "model_a"))
    assert len(str(info.value)) < 400


def test_a_shape_of_many_huge_dimensions_is_refused_at_once(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2**62] * 200_000, "data_offsets": [0, 4]}}
    path = write(tmp_path, safetensors_bytes(header, bytes(4)))
    with pytest.raises(LimitExceededError, match="200000 dimensions"):
        in_bounded_thread(lambda: load_checkpoint(str(path), "model_a"), timeout=20)


def test_an_empty_dimension_among_huge_ones_is_not_mistaken_for_a_huge_tensor(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}, "b": f32([1], 0)}
    path = write(tmp_path, safetensors_bytes(header, bytes(4)))
    ckpt = load_checkpoint(str(path), "model_a")
    assert ckpt.tensors["a"].numel == 0 and ckpt.skipped_tensors == ["a"]


def test_caps_on_tensor_count_and_elements_name_the_setting_to_raise(sandbox: Sandbox) -> None:
    with pytest.raises(LimitExceededError, match="21 tensors is over the cap of 20.*MERGELENS_MAX_TENSORS"):
        load_checkpoint(str(sandbox.model_a), "model_a", limits=Limits(max_tensors=20))
    with pytest.raises(
        LimitExceededError,
        match="'(lm_head|model.embed_tokens).weight' has 512 elements, over the cap of 511.*ELEMENTS",
    ):
        load_checkpoint(str(sandbox.model_a), "model_a", limits=Limits(max_tensor_elements=511))
    assert (
        len(load_checkpoint(str(sandbox.model_a), "model_a", limits=Limits(max_tensor_elements=512)).tensors)
        == 21
    )


def test_the_request_byte_cap_refuses_before_any_tensor_is_read(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(*_: object) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", no_read)
    one = load_checkpoint(str(sandbox.model_a), "model_a").nbytes
    models = [str(sandbox.model_a), str(sandbox.model_b)]
    with pytest.raises(
        LimitExceededError, match=f"would read {3 * one:,} bytes.*MERGELENS_MAX_REQUEST_BYTES"
    ):
        compare(models, str(sandbox.model_a), settings=Settings(max_request_bytes=3 * one - 1))
    monkeypatch.setenv("MERGELENS_MAX_REQUEST_BYTES", str(2 * one - 1))
    with pytest.raises(LimitExceededError):
        compare(models, settings=Settings())


def test_caps_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [
        ("HEADER_BYTES", 11),
        ("TENSORS", 12),
        ("TENSOR_ELEMENTS", 13),
        ("REQUEST_BYTES", 14),
    ]:
        monkeypatch.setenv(f"MERGELENS_MAX_{name}", str(value))
    assert Settings().limits() == Limits(11, 12, 13, 14)


def test_a_shard_index_of_deeply_nested_json_is_refused(sandbox: Sandbox) -> None:
    (sandbox.model_a / "model.safetensors.index.json").write_bytes(b"[" * 200_000)
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        in_bounded_thread(lambda: load_checkpoint(str(sandbox.model_a), "model_a"))


def test_an_oversized_shard_index_is_refused_unread(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "MAX_JSON_BYTES", 1000)
    (sandbox.model_a / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {}, "pad": "x" * 2000})
    )
    with pytest.raises(CheckpointFormatError, match="over 1,000 bytes"):
        load_checkpoint(str(sandbox.model_a), "model_a")


def test_a_nested_or_broken_config_json_is_ignored_with_a_warning(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    (sandbox.model_a / "config.json").write_bytes(b"{" * 100_000)
    ckpt = in_bounded_thread(lambda: load_checkpoint(str(sandbox.model_a), "model_a"))
    assert isinstance(ckpt, Checkpoint) and ckpt.config is None
    assert "config.json is not valid JSON" in caplog.text


def test_tensors_above_the_exact_svd_cap_use_the_randomized_path_and_the_result_says_so(
    sandbox: Sandbox,
) -> None:
    shape = Shape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=64)
    models = [str(make_checkpoint(sandbox.root / f"wide_{seed}", shape, seed)) for seed in (1, 2)]
    randomized = compare(models, settings=Settings(svd_rank=2, exact_svd_max_elements=0))
    # per model: q, o, gate, up, down in each of 2 blocks, plus embed and lm_head; k and v (16 x 32) stay exact
    # because rank 2 + oversampling 16 already covers their 16 singular values
    assert (randomized.coverage.randomized_svd_tensors, randomized.coverage.exact_svd_tensors) == (
        2 * 12,
        2 * 4,
    )
    assert any("randomized path" in note for note in randomized.notes)


def _finite_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"JSON holds {constant}")

    return json.loads(text, parse_constant=refuse)


def _all_floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _all_floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _all_floats(v)]
    return []


def test_nan_and_inf_weights_are_counted_reported_and_never_reach_a_score(tmp_path: Path) -> None:
    base = random_model(TINY, 0)
    poisoned = {k: v.clone() for k, v in base.items()}
    poisoned["model.layers.0.mlp.up_proj.weight"][:3] = float("nan")  # 3 rows x 16
    poisoned["model.layers.1.self_attn.q_proj.weight"][:] = float("inf")  # 16 x 16
    poisoned["model.norm.weight"][:] = float("-inf")  # 16
    poisoned["lm_head.weight"][0, 0] = 3e38  # finite but overflows any square
    clean = save(base, tmp_path / "clean", TINY, dtype=torch.float32)
    bad = save(poisoned, tmp_path / "bad", TINY, dtype=torch.float32)
    for base_model in (None, str(clean)):
        result = compare([str(clean), str(bad)], base_model)
        assert [m.nonfinite_values for m in result.models] == [0, 3 * 16 + 16 * 16 + 16]
        assert any(f.code == "nonfinite_values" and "320 NaN or Inf" in f.message for f in result.findings)
        floats = _all_floats(result.model_dump())
        assert floats and all(math.isfinite(f) for f in floats)
        assert _finite_json(result.model_dump_json())["mci"]["score"] == result.mci.score
        assert result.mci.score is not None and 0 <= result.mci.score <= 100


def test_a_checkpoint_of_only_zeros_scores_without_nan(tmp_path: Path) -> None:
    zeros = {k: torch.zeros_like(v) for k, v in random_model(TINY, 0).items()}
    z = save(zeros, tmp_path / "zeros", TINY, dtype=torch.float32)
    other = tiny_model(tmp_path / "other", 5)
    for models in ([z, z], [z, other]):
        result = compare([str(m) for m in models], str(z))
        assert all(math.isfinite(f) for f in _all_floats(result.model_dump()))
        _finite_json(result.model_dump_json())


@HYPOTHESIS
@given(content=st.binary(max_size=2000))
def test_random_bytes_as_a_checkpoint_give_a_clear_error(content: bytes, tmp_path: Path) -> None:
    path = write(tmp_path, content)
    with pytest.raises(MergeLensError):
        load_checkpoint(str(path), "model_a")


@HYPOTHESIS
@given(prefix=st.binary(min_size=8, max_size=8), content=st.binary(max_size=400))
def test_random_header_lengths_over_random_bytes_give_a_clear_error(
    prefix: bytes, content: bytes, tmp_path: Path
) -> None:
    path = write(tmp_path, prefix + content)
    with pytest.raises(MergeLensError):
        load_checkpoint(str(path), "model_a")


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=3),
)
DTYPE = st.one_of(
    st.sampled_from(sorted(loading.DTYPE_BYTES)), st.sampled_from(["f32", "", "F128", "F32 "]), JUNK
)
DIM = st.one_of(st.integers(-2, 9), st.integers(2**31, 2**70), JUNK)
SHAPE = st.one_of(st.lists(DIM, max_size=4), JUNK)
OFFSET = st.one_of(st.integers(-8, 300), st.integers(2**62, 2**66), JUNK)
OFFSETS = st.one_of(st.lists(OFFSET, min_size=2, max_size=2), st.lists(OFFSET, max_size=3), JUNK)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Mostly plausible headers (contiguous float tensors) with a few fields broken, or wholly random ones."""
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5, unique=True))
    header: dict[str, Any] = {}
    start = 0
    for name in names:
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * loading.DTYPE_BYTES[dtype]
        entry: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        start += size
        for key, strategy in (("dtype", DTYPE), ("shape", SHAPE), ("data_offsets", OFFSETS)):
            if draw(st.integers(0, 11)) == 0:
                entry[key] = draw(strategy)
        header[name] = entry if draw(st.integers(0, 20)) else draw(JUNK)
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(JUNK, st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
        )
    data_len = start if draw(st.integers(0, 3)) else draw(st.integers(0, start + 16))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    return json.dumps(header).encode(), data


@HYPOTHESIS
@given(
    case=headers(), lie=st.integers(0, 3).flatmap(lambda k: st.just(None) if k else st.integers(0, 2**64 - 1))
)
def test_generated_corrupt_headers_load_cleanly_or_fail_with_a_mergelens_error(
    case: tuple[bytes, bytes], lie: int | None, tmp_path: Path
) -> None:
    raw, data = case
    path = write(tmp_path, safetensors_bytes(raw, data, header_len=lie))
    try:
        ckpt = load_checkpoint(str(path), "model_a")
    except MergeLensError as exc:
        event(type(exc).__name__)
        assert 0 < len(str(exc)) < 1500
        return
    event("loaded")
    with ckpt:
        for name, info in ckpt.tensors.items():
            end = info.offset + info.nbytes
            assert end <= path.stat().st_size
            if name in ckpt.float_tensors:
                try:
                    tensor = ckpt.read(name)
                except CheckpointFormatError:
                    continue
                assert tuple(tensor.shape) == info.shape


def test_read_header_validates_what_safetensors_wrote(sandbox: Sandbox) -> None:
    infos = read_header(sandbox.model_a / "model.safetensors", Limits(), "model_a")
    (header_len,) = struct.unpack("<Q", (sandbox.model_a / "model.safetensors").read_bytes()[:8])
    assert infos["model.norm.weight"].shape == (16,)
    assert min(i.offset for i in infos.values()) == 8 + header_len
