"""The small types the upper layers share with the analysis: progress and cancel callbacks, the device and
the analysis options and their defaults. tools/, settings.py and service.py import them from here, never from
the engine; a leaf of the analysis (no torch, nothing of ours but errors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..errors import InputError

DEFAULT_RANK = 16  # singular directions kept per matrix (spectral.py's default)
EXACT_MAX_ELEMENTS = 512 * 512  # matrices up to this size get an exact SVD, larger ones a randomized one
Progress = Callable[[int, int, str], None]  # (done, total, message)
Cancelled = Callable[[], bool]


class Device(str, Enum):
    """Where the tensors are measured: `auto` picks CUDA when torch sees a GPU, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: Device | str) -> Device:
        """`value` as a Device; an InputError naming the value and the choices when it is none of them, or
        when it asks for CUDA and torch sees no GPU. Reads no file, so it runs before any is opened."""
        if isinstance(value, Device):
            device = value
        else:
            try:
                device = cls(str(value).strip().lower())
            except ValueError:
                choices = ", ".join(d.value for d in cls)
                raise InputError(f"device {value!r} is not one of {choices}; pick one of them") from None
        if device is cls.CUDA and not cuda_available():
            raise InputError("device 'cuda' was asked for but torch sees no CUDA GPU; use device cpu or auto")
        return device

    @property
    def torch_name(self) -> str:
        """The torch device this one runs on ('cpu' or 'cuda')."""
        if self is Device.AUTO:
            return "cuda" if cuda_available() else "cpu"
        return self.value


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class AnalysisOptions:
    device: Device = Device.AUTO
    svd_rank: int = DEFAULT_RANK
    exact_svd_max_elements: int = EXACT_MAX_ELEMENTS
    threads: int | None = None  # worker threads on CPU, one core each; None: one per core
    read_base: bool = False  # read the base's tensors even when every model is a LoRA adapter of it

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", Device.parse(self.device))
