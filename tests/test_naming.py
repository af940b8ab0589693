"""Model names in results: short, unique, from the paths the caller gave."""

from __future__ import annotations

from mergelens_mcp.naming import model_names


def test_model_names_are_short_unique_and_never_base() -> None:
    assert model_names(["/m/run1/ckpt", "/m/run2/ckpt/", "org/llama-ft@v2", "/x/model.safetensors"]) == [
        "run1/ckpt", "run2/ckpt", "llama-ft@v2", "model"]
    assert model_names(["/a/base", "/a/base"]) == ["a/base", "a/base-2"]
    assert model_names(["/base", "/w/v"]) == ["base-2", "v"]
