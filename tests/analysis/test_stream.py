"""The one tensor stream: compare and the merge simulation read tensors through the same scheduler, which
opens sets ahead only within the largest set's bytes and releases every set it opened."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fixtures.checkpoints import TINY, make_checkpoint, make_finetune
from fixtures.configs import ties_config
from mergelens_mcp import service
from mergelens_mcp.analysis import stream
from mergelens_mcp.analysis.loading import Checkpoint, load_checkpoint


@pytest.fixture
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The keys of the sets of every stream.schedule call, in order."""
    calls: list[list[str]] = []
    real = stream.schedule

    def recording(sets: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([s.key for s in sets])
        return real(sets, *args, **kwargs)

    monkeypatch.setattr(stream, "schedule", recording)
    return calls


def test_compare_and_the_merge_simulation_read_their_tensors_through_the_one_scheduler(
    tmp_path: Path, scheduled: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_checkpoint(tmp_path / "base")
    a, b = make_finetune(tmp_path / "a", task_seed=1), make_finetune(tmp_path / "b", task_seed=2)
    names = sorted(TINY.tensor_shapes())
    result = service.compare([str(a), str(b)], str(base), device="cpu")
    monkeypatch.setattr(Checkpoint, "read", lambda *args, **kwargs: pytest.fail("a tensor read around the stream"))
    diagnosis = service.diagnose(yaml.safe_dump(ties_config(str(a), str(b), str(base))))
    assert result.coverage.tensors_compared == len(names)
    assert diagnosis.overall_interference is not None and diagnosis.layers
    assert len(scheduled) == 2
    assert sorted(scheduled[0]) == names and sorted(scheduled[1]) == names


def test_the_scheduler_opens_sets_ahead_within_the_largest_sets_bytes_and_releases_every_one(
    tmp_path: Path
) -> None:
    sizes = [400, 100, 100, 100, 400, 250, 100]
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}, str(tmp_path / "m.safetensors"))
    events: list[tuple[str, str]] = []
    live: dict[str, int] = {}
    peaks: list[int] = []

    def opening(s: stream.TensorSet) -> None:
        s.open(torch.device("cpu"))
        events.append(("open", s.key))
        live[s.key] = s.nbytes
        peaks.append(sum(live.values()))

    def closing(s: stream.TensorSet) -> None:
        events.append(("close", s.key))
        del live[s.key]
        s.release()

    with ExitStack() as stack:
        ckpts = [stack.enter_context(load_checkpoint(str(tmp_path / "m.safetensors"), label)) for label in "ab"]
        sets = [stream.TensorSet(f"t{i}", [(c, f"t{i}") for c in ckpts]) for i in range(len(sizes))]
        budget = 2 * 4 * max(sizes)
        seen = []
        for current in stream.schedule(sets, opening, closing):
            assert [torch.equal(v, ckpts[0].view(current.key)) for v in current.views] == [True, True]
            seen.append(current.key)
        assert seen == [f"t{i}" for i in range(len(sizes))]
        assert max(peaks) <= budget and live == {}
        assert events.index(("open", "t3")) < events.index(("close", "t1")), "small sets are opened ahead"

        events.clear()
        stopped = stream.schedule(sets, opening, closing)
        assert next(stopped).key == "t0"
        stopped.close()  # a consumer stopping early: every set opened is closed
        assert live == {} and {k for e, k in events if e == "open"} == {k for e, k in events if e == "close"}


def test_a_measured_set_keeps_no_operands_views_or_svd_jobs_once_the_stream_moves_on(
    tmp_path: Path, scheduled: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's list of sets lives as long as the run: a closed set that kept its SVD jobs kept their
    factors (about 0.15 GB on the 0.5B benchmark) until the end."""
    closed: list[stream._Set] = []
    real_close = stream._close

    def recording_close(current: stream._Set) -> None:
        real_close(current)
        closed.append(current)

    monkeypatch.setattr(stream, "_close", recording_close)
    base = make_checkpoint(tmp_path / "base")
    a, b = make_finetune(tmp_path / "a", task_seed=1), make_finetune(tmp_path / "b", task_seed=2)
    service.compare([str(a), str(b)], base=str(base))
    assert len(closed) == len(scheduled[0]) > 0
    for current in closed:
        assert (current.views, current.weights, current.tasks, current.base) == ([], [], [], None)
        assert current.elementwise is None and current.svds == []


def test_a_comparison_frees_the_buffer_its_task_vector_svds_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergelens_mcp.analysis import spectral
    from mergelens_mcp.analysis.engine import analyze
    from mergelens_mcp.analysis.types import AnalysisOptions
    from mergelens_mcp.demo import Shape

    shape = Shape(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=128, vocab=32)  # sketched: 64 > 16 + 16
    base = make_checkpoint(tmp_path / "base", shape)  # bf16: the task vectors' SVDs round into the shared buffer
    a = make_finetune(tmp_path / "a", shape, task_seed=1)
    b = make_finetune(tmp_path / "b", shape, task_seed=2)
    largest: list[int] = []
    real = spectral._low_precision

    def recording(*args: Any) -> torch.Tensor:
        largest.append(spectral._SCRATCH.buffer.numel())
        return real(*args)

    monkeypatch.setattr(spectral, "_low_precision", recording)
    with ExitStack() as stack:
        models = [stack.enter_context(load_checkpoint(str(p), p.name)) for p in (a, b)]
        analyze(models, stack.enter_context(load_checkpoint(str(base), "base")),
                AnalysisOptions(device="cpu", exact_svd_max_elements=0))
    assert max(largest) > 0
    assert spectral._SCRATCH.buffer.numel() == 0


def test_a_measured_set_keeps_none_of_its_svds_once_the_next_set_is_drawn(tmp_path: Path) -> None:
    import gc
    import weakref

    from mergelens_mcp.analysis.compat import plan_comparison
    from mergelens_mcp.analysis.types import AnalysisOptions
    from mergelens_mcp.demo import Shape

    shape = Shape(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=32)
    base = make_checkpoint(tmp_path / "base", shape)
    a = make_finetune(tmp_path / "a", shape, task_seed=1)
    b = make_finetune(tmp_path / "b", shape, task_seed=2)
    with ExitStack() as stack:
        models = [stack.enter_context(load_checkpoint(str(p), p.name)) for p in (a, b)]
        base_ckpt = stack.enter_context(load_checkpoint(str(base), "base"))
        plan = plan_comparison(models, base_ckpt)
        run = stream.Run(models, base_ckpt, plan, torch.device("cpu"), AnalysisOptions(device="cpu"), [(0, 1)])
        alive: list[list[weakref.ref[Any]]] = []
        for measured in stream.measured_sets(plan.tensors, run):
            alive.append([weakref.ref(svd.u) for svd in measured.svds])
            del measured
            gc.collect()
            if len(alive) >= 3:  # two sets back: closed when the set before this one was drawn
                assert all(ref() is None for ref in alive[-3])
        assert sum(len(refs) for refs in alive) > 0
