"""Fixture generators are deterministic: the same arguments give the same bytes, wherever they are written."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fixtures.checkpoints import (
    TINY,
    make_checkpoint,
    make_family,
    make_finetune,
    make_gpt2,
    make_hub_cache,
    make_vocab_variant,
    make_with_int_tensor,
    make_with_nonfinite,
    variant,
    write_pickle_only,
)


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


GENERATORS: dict[str, Callable[[Path], object]] = {
    "bf16": lambda d: make_checkpoint(d),
    "fp16": lambda d: make_checkpoint(d, dtype=torch.float16),
    "fp32-sharded": lambda d: make_checkpoint(d, dtype=torch.float32, shards=2),
    "tied": lambda d: make_checkpoint(d, variant(TINY, tie_embeddings=True)),
    "finetune": lambda d: make_finetune(d, task_seed=3),
    "vocab": lambda d: make_vocab_variant(d, vocab=40),
    "gpt2": lambda d: make_gpt2(d),
    "int-tensor": lambda d: make_with_int_tensor(d),
    "nonfinite": lambda d: make_with_nonfinite(d),
    "bin-only": lambda d: write_pickle_only(d),
    "hub-cache": lambda d: make_hub_cache(d, "owner/name", blobs=False),
    "family": lambda d: make_family(d, variant(TINY, layers=3)),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_generators_write_the_same_bytes_for_the_same_arguments(tmp_path: Path, name: str) -> None:
    GENERATORS[name](tmp_path / "one")
    GENERATORS[name](tmp_path / "two")
    first, second = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert first and first == second


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a, b = digest(make_checkpoint(tmp_path / "a", seed=1)), digest(make_checkpoint(tmp_path / "b", seed=2))
    assert a["config.json"] == b["config.json"] and a["model.safetensors"] != b["model.safetensors"]


def test_the_hub_cache_commit_is_40_hex_and_refs_point_at_it(tmp_path: Path) -> None:
    commit = make_hub_cache(tmp_path, "owner/name", revision="v1")
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert (tmp_path / "models--owner--name" / "refs" / "v1").read_text() == commit
    snapshot = tmp_path / "models--owner--name" / "snapshots" / commit
    assert (snapshot / "model.safetensors").is_symlink()
    assert (snapshot / "model.safetensors").resolve().parent.name == "blobs"
