"""Path containment: every path a request names must resolve inside an allowed root."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointNotFoundError, PathNotAllowedError


class PathGuard:
    """Resolves user-given paths (symlinks followed) and refuses any that leave the allowed roots."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        self.roots = tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))

    def __repr__(self) -> str:
        return f"PathGuard({[str(r) for r in self.roots]})"

    def restrict(self, client_roots: Iterable[str | os.PathLike[str]]) -> PathGuard:
        """A guard for the intersection of these roots with the MCP client's declared roots."""
        narrowed: list[Path] = []
        for client_root in (Path(r).expanduser().resolve() for r in client_roots):
            for root in self.roots:
                if client_root.is_relative_to(root):
                    narrowed.append(client_root)
                elif root.is_relative_to(client_root):
                    narrowed.append(root)
        return PathGuard(narrowed)

    def contains(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def check(self, raw: str | os.PathLike[str], what: str = "path", *, must_exist: bool = True) -> Path:
        """Return the resolved path, or raise naming `what`, the path and the fix."""
        text = os.fspath(raw)
        if "\x00" in text:
            raise PathNotAllowedError(f"{what}: the path contains a NUL byte; pass a plain file system path")
        if not text.strip():
            raise PathNotAllowedError(f"{what}: the path is empty")
        resolved = Path(text).expanduser().resolve()
        if not self.contains(resolved):
            allowed = ", ".join(str(r) for r in self.roots) or "(none)"
            raise PathNotAllowedError(
                f"{what}: {text!r} resolves to {resolved}, outside the allowed roots ({allowed}); "
                "move the files under an allowed root or add one with --allow-dir / MERGELENS_ALLOWED_ROOTS"
            )
        if must_exist:
            try:
                mode = resolved.stat().st_mode
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{what}: {text!r} does not exist ({resolved})") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise PathNotAllowedError(
                    f"{what}: {resolved} is not a regular file or folder (device, FIFO or socket); refused"
                )
        return resolved
