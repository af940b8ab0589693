"""Loading: every checkpoint form, headers before data, dtypes, and each bad input's exact error."""

from __future__ import annotations

import json
import pickle
import resource
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fixtures.checkpoints import (
    TINY,
    make_checkpoint,
    make_hub_cache,
    make_with_int_tensor,
    random_model,
    write_corrupt,
    write_pickle_only,
    write_safetensors_bytes,
    write_truncated,
)
from mergelens_mcp.analysis import loading
from mergelens_mcp.analysis.loading import load_checkpoint, read_header
from mergelens_mcp.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    InputError,
    LimitExceededError,
)
from mergelens_mcp.security.limits import Limits

N_TENSORS = len(TINY.tensor_shapes())  # 2 layers x 9 + embed, norm, lm_head = 21


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, with the environment pointing at it and the Hub offline."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _read_all(ckpt: loading.Checkpoint) -> dict[str, torch.Tensor]:
    return {name: ckpt.read(name) for name in ckpt.float_tensors}


# ---- forms -------------------------------------------------------------------------------------------


def test_a_folder_with_model_safetensors_loads_every_tensor_with_its_config(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", dtype=torch.float32)
    with load_checkpoint(str(folder), "model_a") as ckpt:
        assert ckpt.files == [folder / "model.safetensors"]
        assert len(ckpt.tensors) == N_TENSORS
        assert ckpt.architecture == "LlamaForCausalLM"
        assert ckpt.config is not None and ckpt.config["hidden_size"] == 16
        assert ckpt.n_params == sum(t.numel() for t in random_model(TINY, 0).values())
        torch.testing.assert_close(ckpt.read("model.norm.weight"), random_model(TINY, 0)["model.norm.weight"])


def test_a_single_safetensors_file_loads_and_reads_the_config_beside_it(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    with load_checkpoint(str(folder / "model.safetensors"), "model_a") as ckpt:
        assert ckpt.files == [folder / "model.safetensors"]
        assert ckpt.root == folder
        assert ckpt.architecture == "LlamaForCausalLM"
        assert len(ckpt.tensors) == N_TENSORS


def test_a_sharded_folder_loads_the_shards_its_index_lists_and_reads_the_same_values(tmp_path: Path) -> None:
    single = make_checkpoint(tmp_path / "single", dtype=torch.float32)
    sharded = make_checkpoint(tmp_path / "sharded", dtype=torch.float32, shards=2)
    with load_checkpoint(str(sharded), "model_a") as a, load_checkpoint(str(single), "model_b") as b:
        assert [f.name for f in a.files] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        assert set(a.tensors) == set(b.tensors)
        assert {a.tensors[n].file.name for n in a.tensors} == {f.name for f in a.files}
        for name in a.tensors:
            torch.testing.assert_close(a.read(name), b.read(name), rtol=0, atol=0)


def test_a_sharded_index_that_names_a_missing_shard_is_refused(tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"shard 'model-00002-of-00002.safetensors' .*missing"):
        load_checkpoint(str(sharded), "model_a")


def test_a_sharded_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "ckpt" / "sharded", shards=2)
    make_checkpoint(tmp_path / "ckpt" / "other")
    index = json.loads((sharded / loading.INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = "../other/model.safetensors"
    (sharded / loading.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="points outside its folder"):
        load_checkpoint(str(sharded), "model_a")


def test_an_index_without_weight_map_is_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    (folder / loading.INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointFormatError, match="not a valid safetensors index"):
        load_checkpoint(str(folder), "model_a")


def test_a_hub_id_resolves_offline_from_the_local_cache(hub_cache: Path) -> None:
    commit = make_hub_cache(hub_cache, "owner/tiny-llama")
    with load_checkpoint("owner/tiny-llama", "model_a") as ckpt:
        assert ckpt.root == (hub_cache / "models--owner--tiny-llama" / "snapshots" / commit).resolve()
        assert ckpt.architecture == "LlamaForCausalLM"
        assert len(ckpt.tensors) == N_TENSORS
        torch.testing.assert_close(
            ckpt.read("model.norm.weight"), random_model(TINY, 0)["model.norm.weight"].bfloat16().float()
        )


def test_a_hub_id_with_a_revision_resolves_that_revision(hub_cache: Path) -> None:
    make_hub_cache(hub_cache, "owner/tiny-llama", seed=0)
    commit = make_hub_cache(hub_cache, "owner/tiny-llama", seed=5, revision="v2")
    with load_checkpoint("owner/tiny-llama@v2", "model_a") as by_ref, \
            load_checkpoint(f"owner/tiny-llama@{commit}", "model_b") as by_commit:
        assert by_ref.root.name == commit == by_commit.root.name
        expected = random_model(TINY, 5)["model.norm.weight"].bfloat16().float()
        torch.testing.assert_close(by_ref.read("model.norm.weight"), expected)


def test_a_sharded_hub_snapshot_whose_files_link_into_blobs_loads(hub_cache: Path) -> None:
    make_hub_cache(hub_cache, "owner/sharded", shards=2, blobs=True)
    with load_checkpoint("owner/sharded", "model_a") as ckpt:
        assert len(ckpt.files) == 2
        assert len(ckpt.tensors) == N_TENSORS
        assert ckpt.read("lm_head.weight").shape == (TINY.vocab, TINY.hidden)


def test_a_hub_id_missing_from_the_offline_cache_is_not_found(hub_cache: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"'owner/absent' is not in the local cache.*OFFLINE"):
        load_checkpoint("owner/absent", "model_b")


def test_a_missing_local_path_is_not_found_and_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(CheckpointNotFoundError, match=r"model_a: .*nothing-here.* neither an existing path"):
        load_checkpoint(str(missing), "model_a")
    with pytest.raises(CheckpointNotFoundError, match="neither an existing path"):
        load_checkpoint("./not/here", "model_a")


# ---- headers before data ------------------------------------------------------------------------------


def test_loading_reads_headers_only_and_each_tensor_on_demand(tmp_path: Path) -> None:
    # A 1 GiB tensor whose bytes are a hole in a sparse file, then a small one: loading the checkpoint and
    # reading the small tensor must not bring the big one's bytes into memory.
    big = 2**28
    header = {
        "big": {"dtype": "F32", "shape": [2**14, 2**14], "data_offsets": [0, 4 * big]},
        "small": {"dtype": "F32", "shape": [2], "data_offsets": [4 * big, 4 * big + 8]},
    }
    path = write_safetensors_bytes(tmp_path / "sparse.safetensors", header)
    with path.open("r+b") as fh:
        fh.seek(0, 2)
        fh.seek(fh.tell() + 4 * big)
        fh.write(struct.pack("<2f", 1.5, -2.0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with load_checkpoint(str(path), "model_a") as ckpt:
        assert ckpt.tensors["big"].shape == (2**14, 2**14) and ckpt.tensors["big"].nbytes == 2**30
        assert ckpt.nbytes == 2**30 + 8
        assert ckpt.read("small").tolist() == [1.5, -2.0]
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256


def test_each_tensor_comes_from_its_own_shard(tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", shards=2)
    index = json.loads((sharded / loading.INDEX_NAME).read_text())["weight_map"]
    with load_checkpoint(str(sharded), "model_a") as ckpt:
        for name, info in ckpt.tensors.items():
            assert info.file.name == index[name]
        info = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]
        assert (info.shape, info.dtype, info.nbytes) == ((16, 32), "BF16", 16 * 32 * 2)


def test_a_tensor_over_the_element_cap_is_refused_at_header_time(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    message = r"tensor '(lm_head|model.embed_tokens).weight' has 512 elements, over the cap of 100"
    with pytest.raises(LimitExceededError, match=message):
        load_checkpoint(str(folder), "model_a", limits=Limits(max_tensor_elements=100))


def test_a_checkpoint_over_the_tensor_count_cap_is_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m")
    with pytest.raises(LimitExceededError, match=r"21 tensors is over the cap of 20"):
        load_checkpoint(str(folder), "model_a", limits=Limits(max_tensors=20))


# ---- dtypes -------------------------------------------------------------------------------------------

EXACT = [0.5, -1.25, 3.0, 0.0, -0.015625, 2.0]  # representable in bf16, fp16, fp8 e4m3 and e5m2
DTYPES = [
    (torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float64, "F64"),
    *([(torch.float8_e4m3fn, "F8_E4M3")] if hasattr(torch, "float8_e4m3fn") else []),
    *([(torch.float8_e5m2, "F8_E5M2")] if hasattr(torch, "float8_e5m2") else []),
]


@pytest.mark.parametrize(("dtype", "code"), DTYPES, ids=[code for _, code in DTYPES])
def test_every_float_dtype_is_read_as_float32_with_its_exact_values(
    tmp_path: Path, dtype: torch.dtype, code: str
) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.tensor(EXACT).reshape(2, 3).to(dtype)}, str(path))
    with load_checkpoint(str(path), "model_a") as ckpt:
        assert ckpt.tensors["w"].dtype == code
        value = ckpt.read("w")
    assert value.dtype == torch.float32
    assert value.tolist() == [EXACT[:3], EXACT[3:]]


def test_bf16_values_round_to_bf16_before_the_upcast(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.tensor([1.0 + 2**-10, 1.0 + 2**-6]).bfloat16()}, str(path))
    with load_checkpoint(str(path), "model_a") as ckpt:
        assert ckpt.read("w").tolist() == [1.0, 1.0 + 2**-6]  # bf16 keeps 7 mantissa bits


def test_non_float_tensors_are_skipped_and_listed(tmp_path: Path) -> None:
    folder = make_with_int_tensor(tmp_path / "m")
    with load_checkpoint(str(folder), "model_a") as ckpt:
        assert ckpt.skipped_tensors == ["model.position_ids"]
        assert "model.position_ids" not in ckpt.float_tensors
        assert ckpt.tensors["model.position_ids"].dtype == "I64"
        assert len(ckpt.float_tensors) == N_TENSORS


# ---- bad inputs ---------------------------------------------------------------------------------------


def test_an_empty_folder_says_what_a_checkpoint_folder_must_hold(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = r"model_a: .*empty holds no .safetensors files; point at a folder with model.safetensors"
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(tmp_path / "empty"), "model_a")


def test_a_bin_only_folder_is_refused_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    folder = write_pickle_only(tmp_path / "legacy")
    message = r"pytorch_model.bin is a pickle-based checkpoint.*convert it to safetensors"
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(folder), "model_b")
    with pytest.raises(CheckpointFormatError, match="never loads"):
        load_checkpoint(str(folder / "pytorch_model.bin"), "model_b")


def test_a_file_that_is_not_safetensors_by_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointFormatError, match=r"weights.npz is not a .safetensors file"):
        load_checkpoint(str(tmp_path / "weights.npz"), "model_a")


def test_a_corrupt_header_is_unreadable(tmp_path: Path) -> None:
    path = write_corrupt(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"model_a: bad.safetensors has an unreadable header"):
        load_checkpoint(str(path), "model_a")


def test_a_file_shorter_than_the_length_prefix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointFormatError, match=r"tiny.safetensors is 3 bytes, too short"):
        load_checkpoint(str(path), "model_a")


def test_a_file_truncated_inside_its_header_says_truncated(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "m") / "model.safetensors"
    path = write_truncated(tmp_path / "cut.safetensors", source, keep=100)
    message = r"declares a header longer than the file \(100 bytes\); the file is truncated"
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(path), "model_a")


def test_a_file_truncated_inside_its_data_is_refused_before_any_read(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "m") / "model.safetensors"
    (header_len,) = struct.unpack("<Q", source.read_bytes()[:8])
    path = write_truncated(tmp_path / "cut.safetensors", source, keep=8 + header_len + 100)
    message = r"has data offsets \[\d+, \d+\] outside the file's 100 data bytes"
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(path), "model_a")


def test_a_header_length_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = write_safetensors_bytes(tmp_path / "m.safetensors", {}, header_len=4096)
    with pytest.raises(CheckpointFormatError, match=r"declares a header longer than the file \(10 bytes\)"):
        load_checkpoint(str(path), "model_a")


def test_an_absurd_header_length_hits_the_header_cap_first(tmp_path: Path) -> None:
    path = write_safetensors_bytes(tmp_path / "m.safetensors", {}, header_len=2**60)
    with pytest.raises(LimitExceededError, match="header length is over the cap"):
        load_checkpoint(str(path), "model_a")


def test_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = write_safetensors_bytes(tmp_path / "m.safetensors", header, bytes(12))
    with pytest.raises(CheckpointFormatError, match="tensors 'a' and 'b' overlap in the file"):
        load_checkpoint(str(path), "model_a")


def test_a_byte_count_that_does_not_match_dtype_and_shape_is_refused(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    path = write_safetensors_bytes(tmp_path / "m.safetensors", header, bytes(12))
    message = r"tensor 'w': 12 bytes stored but F32 x \[2, 2\] needs 16"
    with pytest.raises(CheckpointFormatError, match=message):
        load_checkpoint(str(path), "model_a")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype 'F33'"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, r"invalid shape \[-1\]"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, r"invalid shape \[True\]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, r"data offsets \[4, 0\]"),
        ({"dtype": "F32", "shape": [1]}, "data offsets None"),
        ([1, 2, 3], "malformed header entry"),
    ],
    ids=["dtype", "negative-dim", "bool-dim", "reversed-offsets", "no-offsets", "not-an-object"],
)
def test_malformed_header_entries_are_refused(tmp_path: Path, entry: object, message: str) -> None:
    path = write_safetensors_bytes(tmp_path / "m.safetensors", {"w": entry}, bytes(4))
    with pytest.raises(CheckpointFormatError, match=message):
        read_header(path, Limits(), "model_a")


def test_a_header_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    path = write_safetensors_bytes(tmp_path / "m.safetensors", [1, 2], b"")
    with pytest.raises(CheckpointFormatError, match="header is not a JSON object"):
        load_checkpoint(str(path), "model_a")


def test_a_file_with_only_metadata_holds_no_tensors(tmp_path: Path) -> None:
    path = write_safetensors_bytes(tmp_path / "m.safetensors", {"__metadata__": {"format": "pt"}})
    with pytest.raises(CheckpointFormatError, match="holds no tensors"):
        load_checkpoint(str(path), "model_a")


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(folder / "b.safetensors"))
    with pytest.raises(CheckpointFormatError, match="tensor 'w' appears in two shards"):
        load_checkpoint(str(folder), "model_a")


def test_a_header_with_a_hole_reads_the_stored_value_or_fails_as_a_format_error(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}  # safetensors refuses holes
    path = write_safetensors_bytes(tmp_path / "m.safetensors", header, bytes(4) + struct.pack("<f", 1.5))
    with load_checkpoint(str(path), "model_a") as ckpt:
        try:
            value = ckpt.read("w")
        except CheckpointFormatError as exc:
            assert str(exc).startswith("model_a: cannot")
        else:
            assert value.tolist() == [1.5]


def test_a_path_with_a_nul_byte_is_refused_as_input_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="NUL byte"):
        load_checkpoint(str(tmp_path) + "/a\x00b", "model_a")


def test_a_dangling_symlink_is_not_found(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    message = r"model_a: .*link.*(does not exist|neither an existing path)"
    with pytest.raises(CheckpointNotFoundError, match=message):
        load_checkpoint(str(link), "model_a")


def test_hub_ids_pass_the_path_guard_of_default_settings_with_the_cache_the_loader_reads(
    hub_cache: Path, tmp_path: Path
) -> None:
    from mergelens_mcp.service import compare
    from mergelens_mcp.settings import Settings

    make_hub_cache(hub_cache, "owner/tiny-a", seed=0)
    make_hub_cache(hub_cache, "owner/tiny-b", seed=0)
    settings = Settings(allowed_roots=[tmp_path / "elsewhere"])
    assert hub_cache.resolve() in settings.roots
    result = compare(["owner/tiny-a", "owner/tiny-b"], settings=settings, guard=settings.guard())
    assert result.mci.score == 100.0
    assert [m.source for m in result.models] == ["owner/tiny-a", "owner/tiny-b"]


def test_hf_home_alone_points_at_its_hub_folder(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    make_hub_cache(hub_cache, "owner/tiny-llama")  # hub_cache is $HF_HOME/hub
    assert loading.hub_cache_dir() == str(hub_cache)
    with load_checkpoint("owner/tiny-llama", "model_a") as ckpt:
        assert len(ckpt.tensors) == N_TENSORS


def test_a_revision_missing_from_the_offline_cache_is_not_found(hub_cache: Path) -> None:
    make_hub_cache(hub_cache, "owner/tiny-llama")
    with pytest.raises(CheckpointNotFoundError, match=r"'owner/tiny-llama@v9' is not in the local cache"):
        load_checkpoint("owner/tiny-llama@v9", "model_a")


def test_hub_downloads_ask_only_for_safetensors_the_index_and_configs_with_the_environment_token(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    seen: dict[str, object] = {}
    commit = make_hub_cache(hub_cache, "owner/tiny-llama")

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(hub_cache / "models--owner--tiny-llama" / "snapshots" / commit)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with load_checkpoint("owner/tiny-llama@main", "model_a") as ckpt:
        assert len(ckpt.tensors) == N_TENSORS
    assert seen["repo_id"] == "owner/tiny-llama" and seen["revision"] == "main"
    assert sorted(seen["allow_patterns"]) == [  # adapter_config.json: a Hub id may name a LoRA adapter
        "*.safetensors", "adapter_config.json", "config.json", "model.safetensors.index.json"
    ]
    assert seen["token"] == "hf_test_token"
    assert str(seen["cache_dir"]) == str(hub_cache) and seen["local_files_only"] is False


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "last.ckpt", "weights.pkl"])
def test_every_pickle_suffix_is_refused_by_name(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(bytes(range(64)))  # never opened, whatever it holds
    with pytest.raises(CheckpointFormatError, match=f"{name} is a pickle-based checkpoint"):
        load_checkpoint(str(tmp_path / name), "model_a")
