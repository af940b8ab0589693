"""Token redaction: tokens, bearer credentials and secret-looking env values never leave the process."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from fixtures.hostile import tiny_model
from mergelens_mcp.models import Finding, FindingLevel
from mergelens_mcp.security import redact as redaction
from mergelens_mcp.security.redact import REDACTED, RedactingFormatter, redact, redact_json, redact_model
from mergelens_mcp.service import compare

HF_TOKEN = "hf_" + "Zq3xW9" * 6  # shaped like a real token, owned by no one
ENV_SECRET = "s3cr3t-" + "v4lu3" * 4


@pytest.fixture(autouse=True)
def planted_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setattr(redaction, "_registered", set())


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"token={HF_TOKEN}.", f"token={REDACTED}."),
        ("hf_abcdefghijklmnopqrstuvwx1234", REDACTED),
        ("Authorization: Bearer abc.DEF-123_x", f"Authorization: Bearer {REDACTED}"),
        ('{"authorization": "Basic dXNlcjpwYXNz"}', f'{{"authorization": "Basic {REDACTED}"}}'),
        ("authorization=opaque-credential-1", f"authorization={REDACTED}"),
        ("curl -H 'bearer q1w2e3r4t5'", f"curl -H 'bearer {REDACTED}'"),
        ("https://alice:pa55w0rd@hub.example/x", f"https://alice:{REDACTED}@hub.example/x"),
        (f"/models/{ENV_SECRET}/weights", f"/models/{REDACTED}/weights"),
        ("hf_cache_dir, hf_hub_download, model_a, Bearer", "hf_cache_dir, hf_hub_download, model_a, Bearer"),
        ("without a bearer token: set one", "without a bearer token: set one"),
        ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", f"Bearer {REDACTED}"),
    ],
)
def test_tokens_credentials_and_secret_env_values_are_redacted_and_nothing_else(
    text: str, expected: str
) -> None:
    assert redact(text) == expected


def test_url_and_json_escaped_forms_of_a_secret_are_redacted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", 'p@ss/w"rd 12')
    assert redact("postgres?password=p%40ss%2Fw%22rd%2012") == f"postgres?password={REDACTED}"
    assert redact(json.dumps({"x": 'p@ss/w"rd 12'})) == f'{{"x": "{REDACTED}"}}'


def test_short_values_and_paths_in_secret_named_variables_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("USE_AUTH", "true")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path))
    monkeypatch.setenv("MERGELENS_MAX_TENSORS", "1234567890")  # a long value, but not a secret's name
    assert redact(f"true {tmp_path} 1234567890") == f"true {tmp_path} 1234567890"


def test_a_registered_secret_is_redacted_from_then_on() -> None:
    token = "file-token-" + "x" * 20
    assert redact(f"got {token}") == f"got {token}"
    redaction.register_secret(token)
    redaction.register_secret("short")
    assert redact(f"got {token} short") == f"got {REDACTED} short"


def _logger_to(stream: io.StringIO, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


def _log_stack_from_a_line_holding_a_token(logger: logging.Logger) -> None:
    logger.warning("stack", stack_info=True)  # hf_StackTokenStackToken1234 shows in the stack's source line


def test_log_records_are_redacted_in_messages_arguments_tracebacks_and_stacks() -> None:
    stream = io.StringIO()
    logger = _logger_to(stream, "mergelens.test.redaction")
    redaction.install([logger])
    logger.info("loading %s with Authorization: Bearer %s", f"/m/{ENV_SECRET}", "opaque12345")
    try:
        raise ValueError(f"download failed for token {HF_TOKEN}")
    except ValueError:
        logger.exception("failed with %s", HF_TOKEN)
    _log_stack_from_a_line_holding_a_token(logger)
    out = stream.getvalue()
    assert HF_TOKEN not in out and ENV_SECRET not in out and "opaque12345" not in out
    assert "hf_StackTokenStackToken1234" not in out and "Stack (most recent call last)" in out
    assert out.count(REDACTED) == 5
    assert "ValueError: download failed for token [REDACTED]" in out
    assert out.startswith("INFO loading /m/[REDACTED] with Authorization: Bearer [REDACTED]")


def test_a_second_handler_reusing_the_cached_traceback_sees_it_redacted() -> None:
    redacted, plain = io.StringIO(), io.StringIO()
    logger = _logger_to(redacted, "mergelens.test.redaction2")
    logger.handlers[0].setFormatter(RedactingFormatter("%(message)s"))
    second = logging.StreamHandler(plain)
    second.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(second)
    try:
        raise RuntimeError(HF_TOKEN)
    except RuntimeError:
        logger.exception("boom")
    assert HF_TOKEN not in redacted.getvalue()
    assert HF_TOKEN not in plain.getvalue() and "RuntimeError: [REDACTED]" in plain.getvalue()


def test_install_keeps_each_handlers_layout_and_is_idempotent() -> None:
    stream = io.StringIO()
    logger = _logger_to(stream, "mergelens.test.redaction3")
    redaction.install([logger])
    redaction.install([logger])
    formatter = logger.handlers[0].formatter
    assert isinstance(formatter, RedactingFormatter) and not isinstance(formatter.inner, RedactingFormatter)
    logger.error("x %s", HF_TOKEN)
    assert stream.getvalue() == f"ERROR x {REDACTED}\n"


def test_redact_json_walks_keys_and_nested_values_and_keeps_numbers() -> None:
    data = {HF_TOKEN: [1.5, {"path": f"/x/{ENV_SECRET}"}, None, True], "n": 3}
    assert redact_json(data) == {REDACTED: [1.5, {"path": f"/x/{REDACTED}"}, None, True], "n": 3}


def test_a_token_in_a_model_path_is_redacted_from_every_field_of_the_result(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / f"run-{HF_TOKEN}" / "model_a", 1)
    other = tiny_model(tmp_path / "model_b", 2)
    result = compare([str(folder), str(other)])
    text = result.model_dump_json()
    assert HF_TOKEN not in text and text.count(REDACTED) >= 3  # source, resolved, the strategy's YAML
    assert result.models[0].source == str(folder).replace(HF_TOKEN, REDACTED)
    assert result.mci.score is not None and result.strategy is not None
    assert redact_model(result) is result


def test_redact_model_returns_a_validated_copy_only_when_something_changed() -> None:
    finding = Finding(level=FindingLevel.INFO, code="x", message=f"see {HF_TOKEN}", path="/safe")
    cleaned = redact_model(finding)
    assert cleaned.message == f"see {REDACTED}" and cleaned.path == "/safe" and cleaned is not finding
    assert redact_model(cleaned) is cleaned
