"""The device arrives by four routes (CLI, Python API, MCP server setting, environment); each refuses a bad
one with the value and the choices, before any checkpoint file is opened."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mergelens_mcp import compare_models, service
from mergelens_mcp.analysis import loading, types
from mergelens_mcp.analysis.types import AnalysisOptions, Device
from mergelens_mcp.cli import EXIT_BAD_INPUT, EXIT_OK, main
from mergelens_mcp.errors import InputError
from mergelens_mcp.settings import Settings


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every checkpoint the loader is asked to open."""
    calls: list[str] = []
    real = loading.load_checkpoint

    def recording(source: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(loading, "load_checkpoint", recording)
    monkeypatch.setattr(service, "load_checkpoint", recording)
    return calls


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(types, "cuda_available", lambda: False)


def test_a_device_that_is_not_auto_cpu_or_cuda_is_refused_with_the_value_and_the_choices() -> None:
    with pytest.raises(InputError, match=r"device 'tpu' is not one of auto, cpu, cuda"):
        Device.parse("tpu")
    with pytest.raises(InputError, match="'tpu'"):
        AnalysisOptions(device="tpu")  # type: ignore[arg-type]
    assert Device.parse(" CPU ") is Device.CPU and AnalysisOptions(device="cpu").device is Device.CPU  # type: ignore[arg-type]


def test_cuda_without_a_gpu_is_refused_and_auto_falls_back_to_the_cpu(no_gpu: None) -> None:
    with pytest.raises(InputError, match="no CUDA GPU"):
        Device.parse("cuda")
    assert Device.AUTO.torch_name == "cpu"


@pytest.mark.parametrize(("device", "message"), [("tpu", "'tpu' is not one of auto, cpu, cuda"),
                                                  ("cuda", "no CUDA GPU")])
def test_the_python_api_refuses_a_bad_device_before_opening_any_checkpoint(
    tmp_path: Path, opened: list[str], no_gpu: None, device: str, message: str
) -> None:
    missing = [str(tmp_path / "nowhere_a"), str(tmp_path / "nowhere_b")]
    with pytest.raises(InputError, match=message):
        compare_models(missing, device=device)
    with pytest.raises(InputError, match=message):
        service.compare(missing, device=device)
    assert opened == []


def test_a_server_or_report_setting_of_cuda_without_a_gpu_is_refused_before_opening_any_checkpoint(
    tmp_path: Path, opened: list[str], no_gpu: None
) -> None:
    missing = [str(tmp_path / "nowhere_a"), str(tmp_path / "nowhere_b")]
    with pytest.raises(InputError, match="no CUDA GPU"):
        service.generate_report(missing, None, tmp_path / "r.html", settings=Settings(device="cuda"))
    assert opened == []


def test_the_device_setting_comes_from_the_environment_and_a_bad_one_is_refused(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGELENS_DEVICE", "cpu")
    assert Settings().device is Device.CPU and Settings().analysis_options().device is Device.CPU
    monkeypatch.setenv("MERGELENS_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="'tpu' is not one of auto, cpu, cuda"):
        Settings()


def test_serve_takes_a_device_and_refuses_cuda_without_a_gpu_before_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_gpu: None
) -> None:
    from mergelens_mcp import server

    served: list[Settings] = []
    monkeypatch.setattr(server, "run", lambda transport, host, port, settings, **kw: served.append(settings))
    assert main(["serve", "--device", "cpu"]) == EXIT_OK
    assert [s.device for s in served] == [Device.CPU]
    assert main(["serve", "--device", "cuda"]) == EXIT_BAD_INPUT
    assert "no CUDA GPU" in capsys.readouterr().err
    assert len(served) == 1


def test_settings_and_the_tools_take_the_shared_types_from_types_not_from_the_engine() -> None:
    package = Path(__file__).parents[2] / "mergelens_mcp"
    importers = []
    for path in [package / "settings.py", *(package / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("analysis.engine"):
                importers.append(path.name)
    assert importers == []
    declared = [path.name for path in (package / "analysis").glob("*.py")
                if any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("Progress", "Cancelled")
                                                            for t in node.targets)
                       for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]
    assert declared == ["types.py"]


def test_the_cli_refuses_cuda_without_a_gpu_before_opening_any_checkpoint(
    tmp_path: Path, opened: list[str], no_gpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["compare"], ["report", "-o", str(tmp_path / "r.html")]):
        code = main([*command, str(tmp_path / "nowhere_a"), str(tmp_path / "nowhere_b"), "--device", "cuda"])
        assert code == EXIT_BAD_INPUT and "no CUDA GPU" in capsys.readouterr().err
    assert opened == []
