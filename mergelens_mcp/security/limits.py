"""Caps checked on safetensors headers, before any tensor byte is read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LimitExceededError


@dataclass(frozen=True)
class Limits:
    """What one request may read. Defaults admit a 70B checkpoint and refuse only absurd sizes."""

    max_header_bytes: int = 100 * 2**20
    max_tensors: int = 200_000
    max_tensor_elements: int = 2**34
    max_request_bytes: int = 2**42

    def check_header(self, size: int, where: str) -> None:
        """`size` comes from the file's first 8 bytes: it is never shown (a file that is not safetensors would
        have its first bytes printed as a number)."""
        if size > self.max_header_bytes:
            raise LimitExceededError(
                f"{where}: the safetensors header length is over the cap of {self.max_header_bytes:,} bytes; the "
                "file is not safetensors, or raise MERGELENS_MAX_HEADER_BYTES if this file is trusted"
            )

    def check_tensor_count(self, count: int, where: str) -> None:
        if count > self.max_tensors:
            raise LimitExceededError(
                f"{where}: {count:,} tensors is over the cap of {self.max_tensors:,}; "
                "raise MERGELENS_MAX_TENSORS if this checkpoint is trusted"
            )

    def check_tensor(self, name: str, numel: int, where: str) -> None:
        if numel > self.max_tensor_elements:
            raise LimitExceededError(
                f"{where}: tensor {_name(name)} has {numel:,} elements, over the cap of "
                f"{self.max_tensor_elements:,}; raise MERGELENS_MAX_TENSOR_ELEMENTS for a trusted checkpoint"
            )

    def check_shape(self, name: str, shape: Sequence[int], where: str) -> int:
        """The element count of `shape`, refused as soon as the running product passes the cap (so a header
        listing thousands of huge dimensions costs no big-number arithmetic)."""
        if 0 in shape:
            return 0
        numel = 1
        for dim in shape:
            numel *= dim
            if numel > self.max_tensor_elements:
                if len(shape) <= 16:  # few dimensions: the exact count is cheap and clearer
                    self.check_tensor(name, math.prod(shape), where)
                raise LimitExceededError(
                    f"{where}: tensor {_name(name)} has {len(shape)} dimensions and over "
                    f"{self.max_tensor_elements:,} elements (the cap); raise MERGELENS_MAX_TENSOR_ELEMENTS "
                    "if the checkpoint is trusted"
                )
        return numel

    def check_request(self, total_bytes: int) -> None:
        if total_bytes > self.max_request_bytes:
            raise LimitExceededError(
                f"this request would read {total_bytes:,} bytes of weights, over the cap of "
                f"{self.max_request_bytes:,}; compare fewer models or raise MERGELENS_MAX_REQUEST_BYTES"
            )


def _name(name: str) -> str:
    from .redact import redact

    name = redact(name)  # before the cut: a token straddling it would otherwise show its first half
    return repr(name if len(name) <= 120 else name[:120] + "...")
