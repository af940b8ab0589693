"""Token redaction for everything that leaves the process: log records, tool errors, JSON results, reports.

What is redacted:
- Hugging Face tokens (`hf_` followed by 16 or more letters and digits);
- the credential of `Authorization: <scheme> <credential>` and of any `Bearer <credential>`;
- passwords in URLs (`https://user:password@host`);
- the value of every environment variable whose name looks secret (TOKEN, SECRET, KEY, PASSWORD, AUTH, ...)
  when it is at least `MIN_SECRET_LENGTH` characters long and is not an existing absolute path;
- any value passed to `register_secret` (e.g. a bearer token read from `--auth-token-file`).

Logging redacts at the formatter, so formatted tracebacks and stack traces are covered too: `install()` puts a
`RedactingFormatter` on every handler of the given loggers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8
SECRET_NAME = re.compile(
    r"TOKEN|SECRET|KEY|PASS|AUTH|CREDENTIAL|PRIVATE|SESSION|COOKIE|SIGNATURE", re.IGNORECASE
)
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), REDACTED),
    (
        re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;]+"),
        rf"\1{REDACTED}",
    ),
    # a credential, not a word of prose: 8+ characters, at least one of them not a letter
    (re.compile(r"(?i)\b(bearer\s+)(?!\[REDACTED\])(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}"),
     rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)

_registered: set[str] = set()
_lock = threading.Lock()
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def register_secret(value: str | None) -> None:
    """Redact this value from now on, wherever it appears (values shorter than the minimum are ignored)."""
    if value and len(value.strip()) >= MIN_SECRET_LENGTH:
        with _lock:
            _registered.add(value.strip())


def registered_secrets() -> list[str]:
    """The values given to `register_secret` so far (a worker process is handed them with each job)."""
    with _lock:
        return sorted(_registered)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every value to redact literally, longest first, with its URL- and JSON-escaped forms."""
    environ = os.environ if environ is None else environ
    values = {
        value.strip()
        for name, value in environ.items()
        if SECRET_NAME.search(name)
        and len(value.strip()) >= MIN_SECRET_LENGTH
        and not _is_path(value.strip())
    }
    with _lock:
        values |= _registered
    forms = set(values)
    for value in values:
        forms.add(quote(value, safe=""))
        forms.add(json.dumps(value)[1:-1])
    return sorted(forms, key=len, reverse=True)


def _is_path(value: str) -> bool:
    """Paths such as SSH_AUTH_SOCK or XAUTHORITY name secrets but are not secrets themselves."""
    try:
        return os.path.isabs(value) and os.path.exists(value)
    except (OSError, ValueError):
        return False


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every token, credential and secret-looking environment value replaced by [REDACTED]."""
    return _redact_with(text, secret_values(environ)) if text else text


def redact_json(value: T) -> T:
    """A JSON-like value (dicts, lists, strings, numbers) with every string, keys included, redacted."""
    secrets = secret_values()

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return _redact_with(item, secrets)
        if isinstance(item, dict):
            return {walk(k): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item

    return walk(value)  # type: ignore[no-any-return]


def redact_model(model: M) -> M:
    """The same result model with every string redacted; the model itself when nothing needed redacting."""
    data = model.model_dump(mode="json")
    cleaned = redact_json(data)
    return model if cleaned == data else type(model).model_validate(cleaned)


def _redact_with(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output (message, arguments, traceback, stack) is redacted.

    Given `inner`, it formats with that formatter first (keeping its layout) and redacts the result.
    """

    def __init__(
        self, fmt: str | None = None, datefmt: str | None = None, *, inner: logging.Formatter | None = None
    ):
        super().__init__(fmt, datefmt)
        self.inner = inner

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return redact(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record) if self.inner is not None else super().format(record)
        if record.exc_text:  # the cache another handler would reuse
            record.exc_text = redact(record.exc_text)
        return redact(text)


def install(loggers: Iterable[logging.Logger | str] = ("",)) -> None:
    """Put a RedactingFormatter on every handler of these loggers (default: the root logger)."""
    for item in loggers:
        logger = logging.getLogger(item) if isinstance(item, str) else item
        for handler in logger.handlers:
            current = handler.formatter
            if not isinstance(current, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(inner=current or logging.Formatter()))
