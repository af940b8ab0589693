"""Settings, from arguments or MERGELENS_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .analysis.types import DEFAULT_RANK, EXACT_MAX_ELEMENTS, AnalysisOptions, Device
from .security.limits import Limits
from .security.paths import PathGuard


def hf_cache_dir() -> Path:
    """The Hub cache the loader reads: the environment as it is now, else huggingface_hub's default."""
    from huggingface_hub import constants

    from .analysis.loading import hub_cache_dir

    return Path(hub_cache_dir() or constants.HF_HUB_CACHE)


def default_worker_memory_mb() -> int | None:
    """Three quarters of the machine's physical memory, in MiB (None where it cannot be known)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return max(16, total * 3 // 4 // 2**20)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGELENS_", frozen=True, extra="ignore")

    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders the server may read (os.pathsep-separated in the environment); default: cwd",
    )
    include_hf_cache: bool = True
    output_dir: Path | None = Field(default=None, description="where reports are written; default: first root")
    device: Device = Field(default=Device.AUTO, description="auto, cpu or cuda (auto: CUDA when torch sees a GPU)")
    svd_rank: int = Field(default=DEFAULT_RANK, ge=1, le=256)
    exact_svd_max_elements: int = Field(default=EXACT_MAX_ELEMENTS, ge=0)
    threads: int | None = Field(
        default=None, ge=1, le=256, description="worker threads for CPU analysis, one core each; default: one per core"
    )
    max_header_bytes: int = Field(default=Limits.max_header_bytes, ge=1)
    max_tensors: int = Field(default=Limits.max_tensors, ge=1)
    max_tensor_elements: int = Field(default=Limits.max_tensor_elements, ge=1)
    max_request_bytes: int = Field(default=Limits.max_request_bytes, ge=1)
    max_probe_model_bytes: int = Field(
        default=64 << 30, ge=1, description="preview/verify: the most one float32 model built for the probes may take"
    )
    workers: int = Field(default=2, ge=1, le=64, description="analyses that may run at once")
    cache_size: int = Field(default=16, ge=0, description="analyses kept in the server's cache")
    worker_processes: bool = Field(
        default=True, description="run analyses in killable worker processes (false: in threads of the server, "
        "where a file truncated mid-read can crash it; only for debugging)",
    )
    worker_memory_mb: int | None = Field(
        default_factory=default_worker_memory_mb, ge=16,
        description="anonymous memory one analysis worker may hold before it is stopped; default: 3/4 of RAM",
    )
    worker_cpu_seconds: float | None = Field(
        default=86_400.0, gt=0, description="CPU seconds (all threads) one analysis may use; None: no cap",
    )
    http_header_timeout_s: float = Field(default=10.0, gt=0, description="time an HTTP client has to send "
                                         "each request's headers")
    http_body_timeout_s: float = Field(default=30.0, gt=0, description="time an HTTP request body has to arrive")
    http_max_connections: int = Field(default=512, ge=1, description="open HTTP connections before the oldest "
                                      "one still sending headers is closed for a new one")
    allow_hardlinks: bool = Field(
        default=False, description="read files with more than one hard link (another of its names may lie "
        "outside the allowed roots: containment cannot be checked for it)",
    )
    max_models: int = Field(default=16, ge=2, le=4096, description="models one request may name, base included")
    auth_token: SecretStr | None = None

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _parse_device(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() not in {d.value for d in Device}:
            raise ValueError(f"device {value!r} is not one of {', '.join(d.value for d in Device)}")
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def roots(self) -> list[Path]:
        roots = [p.expanduser().resolve() for p in self.allowed_roots] or [Path.cwd().resolve()]
        if self.include_hf_cache:
            roots.append(hf_cache_dir().expanduser().resolve())
        return roots

    @property
    def reports_dir(self) -> Path:
        return (self.output_dir or self.roots[0]).expanduser().resolve()

    def guard(self) -> PathGuard:
        return PathGuard(self.roots, allow_hardlinks=self.allow_hardlinks)

    def limits(self) -> Limits:
        return Limits(self.max_header_bytes, self.max_tensors, self.max_tensor_elements, self.max_request_bytes)

    def analysis_options(self, device: Device | str | None = None, read_base: bool = False) -> AnalysisOptions:
        """The options of one analysis; `device` (else the setting) is validated here, before any file is
        opened: an InputError names a value that is not auto, cpu or cuda, or cuda without a GPU. `read_base`:
        read the base's tensors even when every model is a LoRA adapter of it."""
        return AnalysisOptions(
            Device.parse(device or self.device), self.svd_rank, self.exact_svd_max_elements, self.threads, read_base
        )
