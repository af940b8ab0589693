"""Path containment: every path a request names must resolve inside an allowed root.

A `PathGuard` holds resolved roots. `check` resolves a user-given path with every symlink followed and refuses
it unless the result lies inside a root and is a regular file or folder; `check_output` does the same for a
file about to be written; `open_regular` opens without following a last-moment symlink and without blocking
on a FIFO. Hub ids are validated by `parse_hub_id` before anything touches the network or the cache.

What is refused, always with `PathNotAllowedError` (an `InputError`) naming the path and the fix: NUL bytes,
`..` or absolute paths that land outside the roots, symlinks pointing out, `~` and `~user` forms that expand
outside the roots, symlink loops, names too long for the file system, device files, FIFOs and sockets, and
(with `allow_hardlinks=False`, the server's default) regular files with more than one hard link: another name
of the file may lie outside the roots, and nothing can tell where. Paths in messages are redacted before
they are cut short (`shown`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn
from urllib.parse import unquote, urlparse

from ..errors import CheckpointNotFoundError, InputError, MergeLensError, PathNotAllowedError

MAX_SHOWN = 200


def shown(value: str | os.PathLike[str]) -> str:
    """A path or name as it may appear in an error message: redacted, then quoted and cut to a readable length
    (redacted first: a token straddling the cut would show its first half, which no later pass recognises)."""
    from .redact import redact

    text = redact(str(value))
    return repr(text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "...")


def _text_of(raw: str | os.PathLike[str], what: str) -> str:
    try:
        text = os.fspath(raw)
    except TypeError:
        raise PathNotAllowedError(f"{what}: expected a file system path, got {type(raw).__name__}") from None
    if not isinstance(text, str):
        raise PathNotAllowedError(f"{what}: expected a text path, got bytes")
    if "\x00" in text:
        raise PathNotAllowedError(f"{what}: the path contains a NUL byte; pass a plain file system path")
    if not text.strip():
        raise PathNotAllowedError(f"{what}: the path is empty")
    return text


def _reason(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return code + (f": {exc.strerror}" if exc.strerror else "")


def _client_root_path(root: str | os.PathLike[str]) -> Path | None:
    """A client root as a local path: `file://` URIs are decoded; other schemes are not local (None)."""
    text = os.fspath(root)
    if isinstance(text, str) and "://" in text:
        uri = urlparse(text)
        if uri.scheme != "file" or uri.netloc not in ("", "localhost"):
            return None
        text = unquote(uri.path)
    if not isinstance(text, str) or "\x00" in text or not text.strip():
        return None
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


class PathGuard:
    """Resolves user-given paths (symlinks followed) and refuses any that leave the allowed roots."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]], *, allow_hardlinks: bool = True) -> None:
        self.allow_hardlinks = allow_hardlinks
        resolved = []
        for r in roots:
            is_uri = isinstance(r, str) and "://" in r
            path = _client_root_path(r) if is_uri else Path(r).expanduser().resolve()
            if path is not None:
                resolved.append(path)
        self.roots = tuple(dict.fromkeys(resolved))

    def __repr__(self) -> str:
        return f"PathGuard({[str(r) for r in self.roots]})"

    def restrict(self, client_roots: Iterable[str | os.PathLike[str]]) -> PathGuard:
        """A guard for the intersection of these roots with the MCP client's declared roots.

        Client roots (paths or `file://` URIs) only ever narrow access: a client root that contains an allowed
        root keeps that root, one inside an allowed root becomes a root, one elsewhere adds nothing. No client
        roots at all leaves a guard that refuses everything.
        """
        narrowed: list[Path] = []
        for client_root in client_roots:
            path = _client_root_path(client_root)
            if path is None:
                continue
            for root in self.roots:
                if path.is_relative_to(root):
                    narrowed.append(path)
                elif root.is_relative_to(path):
                    narrowed.append(root)
        return PathGuard(narrowed, allow_hardlinks=self.allow_hardlinks)

    def contains(self, path: Path) -> bool:
        """Whether an already resolved path lies inside (or is) one of the roots."""
        return any(path.is_relative_to(root) for root in self.roots)

    def _resolve(self, raw: str | os.PathLike[str], what: str) -> tuple[str, Path]:
        """Expand `~`, make absolute against the working directory, follow every symlink, and refuse the path
        unless the result lies inside a root. Messages never show where a path outside the roots leads (a
        symlink target, a loop), so refusals reveal nothing about the file system beyond the roots."""
        text = _text_of(raw, what)
        try:
            expanded = Path(text).expanduser()
        except RuntimeError:  # `~someone` with no such user
            problem = f"{what}: {shown(text)} names the home of an unknown user; refused"
            raise PathNotAllowedError(problem) from None
        try:
            lexical: Path | None = Path(os.path.normpath(os.path.abspath(expanded)))
        except OSError:  # the working directory is gone
            lexical = None
        try:
            resolved = expanded.resolve()
        except (RuntimeError, OSError) as exc:  # Python < 3.13 reports symlink loops as RuntimeError
            if lexical is None or not self.contains(lexical):
                self._refuse(text, what, "is outside")
            reason = "is a symlink loop"
            if isinstance(exc, OSError):
                reason = f"cannot be resolved ({_reason(exc)})"
            raise PathNotAllowedError(f"{what}: {shown(text)} {reason}; refused") from None
        if not self.contains(resolved):
            if lexical is not None and self.contains(lexical):
                self._refuse(text, what, "passes through a symlink that points outside")
            self._refuse(text, what, "is outside")
        return text, resolved

    def _refuse(self, text: str, what: str, problem: str) -> NoReturn:
        allowed = ", ".join(str(r) for r in self.roots) or "none left by the client's roots"
        raise PathNotAllowedError(
            f"{what}: {shown(text)} {problem} the allowed roots ({allowed}); move the files under an allowed "
            "root or add one with --allow-dir / MERGELENS_ALLOWED_ROOTS"
        )

    def check(self, raw: str | os.PathLike[str], what: str = "path", *, must_exist: bool = True) -> Path:
        """Return the resolved path, or raise naming `what`, the path and the fix.

        Containment is checked before existence, so nothing is revealed about paths outside the roots.
        """
        text, resolved = self._resolve(raw, what)
        if must_exist:
            try:
                st = resolved.stat()
                mode = st.st_mode
            except FileNotFoundError:
                raise CheckpointNotFoundError(
                    f"{what}: {shown(text)} does not exist ({shown(resolved)})"
                ) from None
            except OSError as exc:
                raise PathNotAllowedError(f"{what}: cannot read {shown(resolved)} ({_reason(exc)})") from None
            require_regular_or_dir(mode, resolved, what)
            if stat.S_ISREG(mode) and st.st_nlink > 1 and not self.allow_hardlinks:
                raise PathNotAllowedError(
                    f"{what}: {shown(text)} is a hard link ({st.st_nlink} names for one file), and another name "
                    "may lie outside the allowed roots; refused. Copy the file, or set "
                    "MERGELENS_ALLOW_HARDLINKS=1 if every hard link on this machine is trusted"
                )
        return resolved

    def check_file(self, raw: str | os.PathLike[str], what: str = "path") -> Path:
        """Like `check`, for a file found inside a checked folder: it too must resolve inside a root."""
        path = self.check(raw, what)
        if not path.is_file():
            raise PathNotAllowedError(f"{what}: {shown(path)} is a folder where a file was expected")
        return path

    def check_output(self, raw: str | os.PathLike[str], what: str = "output") -> Path:
        """A file about to be written: inside a root, its folder existing, and not a device, FIFO or folder.

        Whether an existing file may be replaced is the writer's decision (`overwrite`); this only says where.
        """
        text, resolved = self._resolve(raw, what)
        if not resolved.parent.is_dir():
            raise PathNotAllowedError(
                f"{what}: the folder {shown(resolved.parent)} does not exist; create it first"
            )
        try:
            mode = resolved.stat().st_mode
        except FileNotFoundError:
            return resolved
        except OSError as exc:
            raise PathNotAllowedError(f"{what}: cannot write {shown(resolved)} ({_reason(exc)})") from None
        if not stat.S_ISREG(mode):
            raise PathNotAllowedError(f"{what}: {shown(resolved)} exists and is not a regular file; refused")
        return resolved


def require_regular_or_dir(mode: int, path: Path, what: str) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise PathNotAllowedError(
            f"{what}: {shown(path)} is not a regular file or folder (device, FIFO or socket); refused"
        )


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open a file for reading only if it is a regular file, without blocking on a FIFO or following a link
    swapped in after the check (the last component)."""
    flags = os.O_RDONLY
    for extra in ("O_NONBLOCK", "O_NOFOLLOW", "O_CLOEXEC"):
        flags |= getattr(os, extra, 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what}: {shown(path)} does not exist") from None
    except OSError as exc:
        raise PathNotAllowedError(f"{what}: cannot open {shown(path)} ({_reason(exc)}); refused") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathNotAllowedError(
                f"{what}: {shown(path)} is not a regular file (device, FIFO or socket); refused"
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text_file(
    path: Path, what: str, limit: int, hint: str,
    error: type[MergeLensError] = InputError, too_large: type[MergeLensError] | None = None,
) -> str:
    """The UTF-8 text of a small regular file, opened with `open_regular` and never read past `limit` bytes,
    whatever its size said a moment ago. Over the limit: `too_large` (default `error`) saying "{what}: NAME is
    over N MiB; {hint}"; not UTF-8: `error`."""
    with open_regular(path, what) as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise (too_large or error)(f"{what}: {path.name} is over {limit >> 20} MiB; {hint}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: {path.name} is not UTF-8 text") from None


# Hugging Face rules: letters, digits, '-', '_', '.'; at most 96; no '--' or '..'; no '-' or '.' at the ends.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<rev>[A-Za-z0-9._/-]{{1,128}}))?")


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape `owner/name[@revision]` (before the finer checks of `parse_hub_id`)."""
    return isinstance(text, str) and _HUB_ID.fullmatch(text) is not None and not text.startswith((".", "~"))


def parse_hub_id(text: str, what: str = "model") -> HubId:
    """Validate a Hub id `owner/name[@revision]`; `InputError` for anything a path or URL could hide in."""
    match = _HUB_ID.fullmatch(text) if isinstance(text, str) else None
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        raise InputError(
            f"{what}: {shown(str(text))} is not a Hugging Face Hub id; expected owner/name or "
            "owner/name@revision (letters, digits, '-', '_', '.'; no '..' or '--')"
        )
    rev = match["rev"]
    if rev is not None and not _valid_revision(rev):
        raise InputError(
            f"{what}: revision {shown(rev)} is not a branch, tag or commit name (no '..', no empty or "
            "dot-led parts, no leading or trailing '/'); refused"
        )
    return HubId(match["repo"], rev)


def _valid_revision(rev: str) -> bool:
    parts = rev.split("/")
    return (
        ".." not in rev
        and not rev.endswith((".lock", "."))
        and all(part and not part.startswith(".") for part in parts)
    )
