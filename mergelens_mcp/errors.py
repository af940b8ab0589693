"""The exceptions mergelens raises. Every message names the object and the fix.

    MergeLensError
    ├── InputError                  the caller asked for something we cannot use
    │   ├── PathNotAllowedError     a path resolves outside the allowed roots
    │   ├── CheckpointNotFoundError no such file, folder or Hub id
    │   └── ConfigError             a mergekit YAML that cannot be parsed or used
    ├── CheckpointFormatError       the files exist but are not a usable safetensors checkpoint
    │   └── IncompatibleModelsError the checkpoints cannot be compared tensor by tensor
    ├── LimitExceededError          a header, tensor or request is over a configured cap
    └── AnalysisCancelledError      the caller cancelled a running analysis

Validators raise ``ValueError`` (pydantic turns it into ``ValidationError``); everything else raises a
``MergeLensError`` subclass. Only the two top levels (the MCP tool runtime and the CLI) catch ``Exception``.
"""

from __future__ import annotations


class MergeLensError(Exception):
    """Base of every error mergelens raises on purpose."""


class InputError(MergeLensError):
    """The caller asked for something we cannot use."""


class PathNotAllowedError(InputError):
    """A path resolves outside the allowed roots, or is not a regular file or folder."""


class CheckpointNotFoundError(InputError):
    """No checkpoint at that path or Hub id."""


class ConfigError(InputError):
    """A mergekit YAML that cannot be parsed or used."""


class CheckpointFormatError(MergeLensError):
    """The files exist but are not a usable safetensors checkpoint."""


class IncompatibleModelsError(CheckpointFormatError):
    """The checkpoints cannot be compared tensor by tensor."""


class LimitExceededError(MergeLensError):
    """A header, tensor or request is over a configured cap."""


class AnalysisCancelledError(MergeLensError):
    """The caller cancelled a running analysis; it stopped between tensors."""
