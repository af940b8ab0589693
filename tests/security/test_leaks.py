"""What error messages and startup lines may show: no half tokens at a cut, no bytes of a file that is not
safetensors, no secret in the allowed folders printed by `serve`; and hard links refused by the server."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from fixtures.hostile import Sandbox
from mergelens_mcp import cli, server, service
from mergelens_mcp.errors import CheckpointNotFoundError, MergeLensError, PathNotAllowedError
from mergelens_mcp.security import redact as redaction
from mergelens_mcp.security.paths import MAX_SHOWN, PathGuard
from mergelens_mcp.settings import Settings

HF_TOKEN = "hf_" + "Pl4nt3dT0k3n" * 3


def test_a_token_straddling_the_cut_of_a_long_path_is_redacted_not_halved(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    prefix = str(sandbox.root) + "/"
    name = "x" * (MAX_SHOWN - 11 - len(prefix)) + "-" + HF_TOKEN  # the token starts 10 characters before the cut
    with pytest.raises(CheckpointNotFoundError) as caught:
        PathGuard([sandbox.root]).check(prefix + name, "model_a")
    message = str(caught.value)
    assert "hf_Pl4n" not in message and "Pl4nt3d" not in message
    assert "[REDACTED]" in message


def test_the_header_length_of_a_file_that_is_not_safetensors_never_appears_in_the_error(tmp_path: Path) -> None:
    text = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(text)
    declared = struct.unpack("<Q", text[:8])[0]
    with pytest.raises(MergeLensError) as caught:
        service.compare([str(tmp_path / "m"), str(tmp_path / "m")], settings=Settings(allowed_roots=[tmp_path]))
    message = str(caught.value)
    assert "header length is over the cap" in message
    assert str(declared) not in message and f"{declared:,}" not in message


def test_a_shorter_file_never_shows_its_declared_header_length(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(struct.pack("<Q", 4321) + b"{}")
    with pytest.raises(MergeLensError, match=r"declares a header longer than the file \(10 bytes\)") as caught:
        service.compare([str(tmp_path / "m"), str(tmp_path / "m")], settings=Settings(allowed_roots=[tmp_path]))
    assert "4321" not in str(caught.value) and "4,321" not in str(caught.value)


def test_serve_prints_its_allowed_folders_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(redaction, "_registered", set())
    monkeypatch.setattr(server, "run", lambda *args, **kwargs: None)
    folder = tmp_path / f"models-{HF_TOKEN}"
    folder.mkdir()
    assert cli.main(["serve", "--transport", "http", "--allow-dir", str(folder), "--port", "1"]) == 0
    err = capsys.readouterr().err
    assert HF_TOKEN not in err and "models-[REDACTED]" in err.replace("\n", "")


def test_the_server_refuses_a_hard_link_into_an_allowed_folder_and_the_cli_reads_it(sandbox: Sandbox) -> None:
    linked = sandbox.root / "linked"
    linked.mkdir()
    os.link(sandbox.secret_model / "model.safetensors", linked / "model.safetensors")
    settings = Settings(allowed_roots=[sandbox.root], include_hf_cache=False)
    with pytest.raises(PathNotAllowedError, match="is a hard link .*MERGELENS_ALLOW_HARDLINKS"):
        service.compare([str(linked), str(sandbox.model_a)], settings=settings, guard=settings.guard())
    allowed = Settings(allowed_roots=[sandbox.root], include_hf_cache=False, allow_hardlinks=True, device="cpu")
    assert service.compare([str(linked), str(sandbox.model_a)], settings=allowed, guard=allowed.guard()).mci
    assert service.compare([str(linked), str(sandbox.model_a)], settings=allowed).mci  # no guard: the CLI's user


def test_the_cli_progress_line_shows_tensor_names_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)

    def job(progress: cli.Callable[[int, int, str], None]) -> int:
        progress(1, 2, f"model.layers.0.{HF_TOKEN}.weight")
        console.print("")  # a refresh of the live bar
        return 7

    assert cli._with_progress(console, "reading tensors", job) == 7
    assert HF_TOKEN not in out.getvalue() and "[REDACTED]" in out.getvalue()
