"""Request caps checked before any work, and planning work linear in the tensor count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from fixtures.hostile import Sandbox
from mergelens_mcp import service
from mergelens_mcp.analysis import loading
from mergelens_mcp.analysis.compat import plan_comparison
from mergelens_mcp.analysis.loading import Checkpoint, TensorInfo
from mergelens_mcp.errors import LimitExceededError
from mergelens_mcp.server import build_server
from mergelens_mcp.settings import Settings
from mergelens_mcp.tools import TOOL_NAMES

TIMEOUT_S = 120


@pytest.fixture
def header_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every safetensors header the process reads."""
    reads: list[Path] = []
    real = loading.read_header

    def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading, "read_header", counted)
    return reads


async def test_ten_thousand_models_in_one_request_are_refused_before_any_header_is_read(
    sandbox: Sandbox, header_reads: list[Path]
) -> None:
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False)
    async with Client(build_server(settings)) as client:
        with anyio.fail_after(TIMEOUT_S):
            result = await client.call_tool("get_compatibility_score", {"models": [str(sandbox.model_a)] * 10_000})
            listed = await client.list_tools()
    text = " ".join(c.text for c in result.content)
    assert result.is_error and "10000" in text.replace(",", "") and "4096" in text
    assert header_reads == [] and len(listed.tools) == len(TOOL_NAMES)


def test_more_models_than_the_cap_are_refused_naming_the_cap_and_the_setting(
    sandbox: Sandbox, header_reads: list[Path]
) -> None:
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False, max_models=3)
    models = [str(sandbox.model_a), str(sandbox.model_b), str(sandbox.model_a)]
    with pytest.raises(LimitExceededError, match="names 4 models .*cap of 3.*MERGELENS_MAX_MODELS"):
        service.compare(models, str(sandbox.model_b), settings=settings)
    assert header_reads == []


def test_a_model_listed_twice_is_read_once_and_compared_under_both_labels(
    sandbox: Sandbox, header_reads: list[Path]
) -> None:
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False, device="cpu")
    result = service.compare([str(sandbox.model_a), str(sandbox.model_a), str(sandbox.model_b)], settings=settings)
    assert [m.label for m in result.models] == ["model_a", "model_a-2", "model_b"]  # named by folder
    assert len(header_reads) == 2
    first = next(p for p in result.pairwise if (p.model_a, p.model_b) == ("model_a", "model_a-2"))
    assert first.score == 100.0


def test_the_byte_cap_stops_a_request_at_the_first_model_past_it(sandbox: Sandbox, header_reads: list[Path]) -> None:
    with loading.load_checkpoint(str(sandbox.model_a), "model_a") as probe:
        size = probe.nbytes  # model_b is generated with the same shapes
    header_reads.clear()
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False, max_request_bytes=size + 1)
    with pytest.raises(LimitExceededError, match=f"would read {2 * size:,} bytes"):
        service.compare([str(sandbox.model_a), str(sandbox.model_b), str(sandbox.root / "never-read")],
                        settings=settings)
    assert [p.parent.name for p in header_reads] == ["model_a", "model_b"]


def synthetic(label: str, count: int) -> Checkpoint:
    """A checkpoint of `count` one-dimensional float tensors, header only (planning reads no tensor)."""
    tensors = {
        f"model.layers.{i % 32}.part{i}.weight": TensorInfo(f"model.layers.{i % 32}.part{i}.weight", (4,), "F32",
                                                             Path(f"/nowhere/{label}"), 8 + 16 * i)
        for i in range(count)
    }
    return Checkpoint(label, label, Path("/nowhere"), [], tensors, None)


def planning_checks(count: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many times planning a three-model comparison (two models and a base) asks a tensor whether it is
    a float."""
    calls = 0
    real = TensorInfo.is_float

    def counted(self: TensorInfo) -> bool:
        nonlocal calls
        calls += 1
        return real.fget(self)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(TensorInfo, "is_float", property(counted))
    plan = plan_comparison([synthetic("model_a", count), synthetic("model_b", count)], synthetic("base", count))
    assert len(plan.tensors) == len(plan.base_tensors) == count
    monkeypatch.undo()
    return calls


def test_planning_a_comparison_costs_work_linear_in_the_tensor_count(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = planning_checks(2_000, monkeypatch), planning_checks(20_000, monkeypatch)
    assert small <= 3 * 2_000 * 2  # each tensor of each checkpoint asked about once, twice at most
    assert large <= 10 * small  # 10x the tensors: 10x the work, not 100x
