"""The path sandbox: every path resolves (symlinks followed) inside an allowed root, or is refused clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.hostile import Sandbox, in_bounded_thread
from mergelens_mcp.analysis.loading import load_checkpoint
from mergelens_mcp.cli import EXIT_BAD_INPUT, main
from mergelens_mcp.errors import CheckpointNotFoundError, InputError, MergeLensError, PathNotAllowedError
from mergelens_mcp.security.paths import PathGuard, parse_hub_id
from mergelens_mcp.settings import Settings, hf_cache_dir


def test_a_model_folder_inside_the_root_loads_with_its_resolved_path(sandbox: Sandbox) -> None:
    guard = PathGuard([sandbox.root])
    ckpt = load_checkpoint(str(sandbox.model_a), "model_a", guard=guard)
    assert ckpt.root == sandbox.model_a.resolve()
    assert len(ckpt.tensors) == 21


@pytest.mark.parametrize(
    "attempt",
    [
        "{root}/../outside/secret_model",
        "{root}/model_a/../../outside/secret_model",
        "{outside}/secret_model",
        "{outside}/secret_model/model.safetensors",
        "/etc/passwd",
        "/",
    ],
)
def test_dot_dot_and_absolute_paths_leaving_the_root_are_refused(sandbox: Sandbox, attempt: str) -> None:
    raw = attempt.format(root=sandbox.root, outside=sandbox.outside)
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        load_checkpoint(raw, "model_a", guard=PathGuard([sandbox.root]))


def test_a_relative_dot_dot_path_is_resolved_against_the_working_directory_and_refused(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sandbox.root)
    guard = PathGuard([sandbox.root])
    assert load_checkpoint("model_a", "model_a", guard=guard).root == sandbox.model_a.resolve()
    with pytest.raises(PathNotAllowedError, match="secret_model"):
        load_checkpoint("../outside/secret_model", "model_a", guard=guard)


def test_a_symlinked_folder_inside_the_root_that_points_out_is_refused(sandbox: Sandbox) -> None:
    (sandbox.root / "innocent").symlink_to(sandbox.secret_model, target_is_directory=True)
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        load_checkpoint(str(sandbox.root / "innocent"), "model_a", guard=PathGuard([sandbox.root]))


def test_a_weights_file_symlinked_out_of_an_allowed_folder_is_refused(sandbox: Sandbox) -> None:
    folder = sandbox.root / "half_linked"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(sandbox.secret_model / "model.safetensors")
    with pytest.raises(PathNotAllowedError, match="symlink that points outside"):
        load_checkpoint(str(folder), "model_a", guard=PathGuard([sandbox.root]))


def test_refusals_never_show_where_a_path_outside_the_roots_leads(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    (sandbox.root / "innocent").symlink_to(sandbox.secret_model, target_is_directory=True)
    (sandbox.outside / "loop").symlink_to(sandbox.outside / "loop")
    monkeypatch.chdir(sandbox.outside)
    guard = PathGuard([sandbox.root])
    messages = {}
    for attempt in (
        sandbox.root / "innocent",
        "/proc/self/cwd",
        "/proc/self/cwd/secret_model",
        sandbox.outside / "loop",
    ):
        with pytest.raises(PathNotAllowedError) as info:
            guard.check(attempt)
        messages[str(attempt)] = str(info.value)
    assert "symlink that points outside" in messages[str(sandbox.root / "innocent")]
    assert all(
        str(sandbox.outside) not in m for a, m in messages.items() if not a.startswith(str(sandbox.outside))
    )
    assert "is outside the allowed roots" in messages[str(sandbox.outside / "loop")]


def test_a_config_json_symlinked_out_of_the_root_is_refused_unread(sandbox: Sandbox) -> None:
    config = sandbox.model_a / "config.json"
    config.unlink()
    leaked = sandbox.outside / "config.json"
    leaked.write_text('{"architectures": ["LeakedSecretArch"]}')
    config.symlink_to(leaked)
    with pytest.raises(PathNotAllowedError, match="config.json") as info:
        load_checkpoint(str(sandbox.model_a), "model_a", guard=PathGuard([sandbox.root]))
    assert "LeakedSecretArch" not in str(info.value)


@pytest.mark.parametrize(
    "shard", ["../../outside/secret_model/model.safetensors", "/etc/passwd", "sub/../../x"]
)
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(sandbox: Sandbox, shard: str) -> None:
    index = {"weight_map": {"model.norm.weight": shard}}
    (sandbox.model_a / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MergeLensError, match="outside"):
        load_checkpoint(str(sandbox.model_a), "model_a", guard=PathGuard([sandbox.root]))


@pytest.mark.parametrize("attempt", ["~", "~/secret_model", "~/../outside/secret_model", "~root/.ssh/id_rsa"])
def test_tilde_forms_that_expand_outside_the_root_are_refused(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, attempt: str
) -> None:
    monkeypatch.setenv("HOME", str(sandbox.outside))
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        load_checkpoint(attempt, "model_a", guard=PathGuard([sandbox.root]))


def test_tilde_expanding_inside_an_allowed_root_is_allowed(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(sandbox.root))
    assert PathGuard([sandbox.root]).check("~/model_a") == sandbox.model_a.resolve()


@pytest.mark.parametrize("attempt", ["{root}/model_a\x00/etc/passwd", "\x00", "", "   "])
def test_nul_bytes_and_empty_paths_are_refused(sandbox: Sandbox, attempt: str) -> None:
    with pytest.raises(PathNotAllowedError, match="NUL byte|empty"):
        PathGuard([sandbox.root]).check(attempt.format(root=sandbox.root))


def test_a_fifo_is_refused_without_ever_blocking_on_it(sandbox: Sandbox) -> None:
    fifo = sandbox.root / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(PathNotAllowedError, match="FIFO"):
        load_checkpoint(str(fifo), "model_a", guard=PathGuard([sandbox.root]))
    (sandbox.root / "fifo_folder").mkdir()
    (sandbox.root / "fifo_folder" / "model.safetensors").symlink_to(fifo)
    with pytest.raises(PathNotAllowedError, match="FIFO"):
        load_checkpoint(str(sandbox.root / "fifo_folder"), "model_a", guard=PathGuard([sandbox.root]))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_device_files_are_refused_even_when_their_folder_is_allowed(sandbox: Sandbox, device: str) -> None:
    (sandbox.root / "dev.safetensors").symlink_to(device)
    for guard in (PathGuard(["/dev", sandbox.root]), None):
        with pytest.raises(PathNotAllowedError, match="not a regular file"):
            load_checkpoint(str(sandbox.root / "dev.safetensors"), "model_a", guard=guard)


def test_a_symlink_loop_is_refused_with_a_clear_error(sandbox: Sandbox) -> None:
    (sandbox.root / "loop_a").symlink_to(sandbox.root / "loop_b")
    (sandbox.root / "loop_b").symlink_to(sandbox.root / "loop_a")
    with pytest.raises(PathNotAllowedError, match="symlink loop|cannot be resolved|ELOOP"):
        load_checkpoint(str(sandbox.root / "loop_a"), "model_a", guard=PathGuard([sandbox.root]))


def test_a_name_too_long_for_the_file_system_is_refused_not_crashing(sandbox: Sandbox) -> None:
    with pytest.raises(MergeLensError) as info:
        load_checkpoint(str(sandbox.root / ("x" * 5000)), "model_a", guard=PathGuard([sandbox.root]))
    assert len(str(info.value)) < 1000


def test_containment_is_checked_before_existence_so_outside_paths_reveal_nothing(sandbox: Sandbox) -> None:
    guard = PathGuard([sandbox.root])
    errors = []
    for name in ("secret_model", "no_such_model"):
        with pytest.raises(PathNotAllowedError) as info:
            guard.check(sandbox.outside / name)
        errors.append(type(info.value))
    assert errors == [PathNotAllowedError, PathNotAllowedError]
    with pytest.raises(CheckpointNotFoundError):
        guard.check(sandbox.root / "no_such_model")


def test_client_roots_only_narrow_the_allowed_roots(sandbox: Sandbox) -> None:
    guard = PathGuard([sandbox.root])
    narrowed = guard.restrict(
        [
            sandbox.model_a,
            (sandbox.model_b).as_uri(),
            sandbox.outside,
            "https://example.com/x",
            "/",
        ]
    )
    assert set(narrowed.roots) == {
        sandbox.model_a.resolve(),
        sandbox.model_b.resolve(),
        sandbox.root.resolve(),
    }
    only_a = guard.restrict([sandbox.model_a.as_uri()])
    assert only_a.check(sandbox.model_a) == sandbox.model_a.resolve()
    with pytest.raises(PathNotAllowedError):
        only_a.check(sandbox.model_b)
    with pytest.raises(PathNotAllowedError):
        guard.restrict([sandbox.outside.as_uri()]).check(sandbox.outside / "secret_model")


def test_no_client_roots_at_all_leaves_nothing_allowed(sandbox: Sandbox) -> None:
    nothing = PathGuard([sandbox.root]).restrict([])
    assert nothing.roots == ()
    with pytest.raises(PathNotAllowedError, match="none left by the client's roots"):
        nothing.check(sandbox.model_a)


def test_output_paths_must_lie_in_an_existing_allowed_folder_and_be_regular_files(sandbox: Sandbox) -> None:
    reports = sandbox.root / "reports"
    reports.mkdir()
    guard = PathGuard([reports])
    assert guard.check_output(reports / "r.html") == (reports / "r.html").resolve()
    (reports / "existing.html").write_text("old")
    assert guard.check_output(reports / "existing.html").name == "existing.html"
    os.mkfifo(reports / "pipe.html")
    (reports / "escape.html").symlink_to(sandbox.outside / "x.html")
    refused = {
        str(sandbox.outside / "r.html"): "outside the allowed roots",
        str(reports / "../r.html"): "outside the allowed roots",
        str(reports / "escape.html"): "outside the allowed roots",
        str(reports / "missing" / "r.html"): "does not exist",
        str(reports / "pipe.html"): "not a regular file",
        str(reports): "not a regular file",
        str(reports / "r.html\x00.txt"): "NUL byte",
    }
    for raw, message in refused.items():
        with pytest.raises(PathNotAllowedError, match=message):
            guard.check_output(raw)


def test_settings_read_allowed_roots_from_the_environment_plus_the_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("MERGELENS_ALLOWED_ROOTS", f"{a}{os.pathsep}{b}{os.pathsep}")
    assert Settings().roots == [a.resolve(), b.resolve(), hf_cache_dir().resolve()]
    monkeypatch.delenv("MERGELENS_ALLOWED_ROOTS")
    monkeypatch.chdir(tmp_path)
    assert Settings().roots == [tmp_path.resolve(), hf_cache_dir().resolve()]
    assert Settings(include_hf_cache=False).roots == [tmp_path.resolve()]


@pytest.mark.parametrize(
    "hub_id, repo, revision",
    [
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None),
        ("org/model@main", "org/model", "main"),
        ("org/model@refs/pr/1", "org/model", "refs/pr/1"),
        ("org/model@" + "a" * 40, "org/model", "a" * 40),
    ],
)
def test_well_formed_hub_ids_parse(hub_id: str, repo: str, revision: str | None) -> None:
    parsed = parse_hub_id(hub_id)
    assert (parsed.repo, parsed.revision) == (repo, revision)


HOSTILE_IDS = [
    "org/model@../../x",
    "org/model@refs/../../../etc",
    "org/model@/abs",
    "org/model@main/",
    "org/model@.hidden",
    "org/model@x.lock",
    "org/model@a//b",
    "org/model@",
    "../org/model",
    "org/../model",
    "org/model/../../etc",
    "org/mo..del",
    "org/mo--del",
    "-org/model",
    "org/model-",
    ".org/model",
    "org//model",
    "org/model/extra",
    "/etc/passwd",
    "~/x",
    "https://huggingface.co/org/model",
    "org\\model",
    "org/model\x00",
    "org/" + "m" * 97,
]


@pytest.mark.parametrize("hub_id", HOSTILE_IDS)
def test_hostile_hub_ids_are_refused_before_any_network_or_cache_access(
    hub_id: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError):
        parse_hub_id(hub_id)
    guard = PathGuard([tmp_path, hf_cache_dir()])
    with pytest.raises(InputError):
        load_checkpoint(hub_id, "model_a", guard=guard)
    assert calls == []


def test_a_hub_id_is_refused_before_download_when_the_hf_cache_is_not_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathNotAllowedError, match="Hugging Face cache"):
        load_checkpoint("org/model", "model_a", guard=PathGuard([tmp_path]))
    assert calls == []


def test_a_valid_hub_id_reaches_the_download_with_its_repo_and_revision_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[object, object]] = []

    def fake_download(repo_id: str, revision: str | None = None, **_: object) -> str:
        calls.append((repo_id, revision))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="not in the local cache"):
        load_checkpoint("org/model@v1.0", "model_a", guard=PathGuard([tmp_path, hf_cache_dir()]))
    assert calls == [("org/model", "v1.0")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.text(alphabet="./~@-_aZ09\\\x00 ", max_size=40),
        st.from_regex(r"[a-z.]{1,5}/[a-z.]{1,5}(@[a-z./]{0,12})?", fullmatch=True),
    )
)
def test_any_text_as_a_model_is_refused_cleanly_and_only_clean_hub_ids_reach_the_download(
    text: str, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads: list[tuple[str, str | None]] = []

    def fake_download(repo_id: str, revision: str | None = None, **_: object) -> str:
        downloads.append((repo_id, revision))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(sandbox.outside)
    try:
        ckpt = load_checkpoint(text, "model_a", guard=PathGuard([sandbox.root, hf_cache_dir()]))
    except MergeLensError as exc:
        assert 0 < len(str(exc)) < 1500
    else:
        assert ckpt.root.is_relative_to(sandbox.root.resolve())
    for repo, revision in downloads:
        assert ".." not in repo and ".." not in (revision or "") and not repo.startswith(("/", "."))


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_fifo_as_a_report_output_is_refused_by_the_cli_without_blocking(
    sandbox: Sandbox, command: str
) -> None:
    fifo = sandbox.root / "report.html"
    os.mkfifo(fifo)
    flag = "-o" if command == "report" else "--report"
    argv = [command, str(sandbox.model_a), str(sandbox.model_b), flag, str(fifo)]
    assert in_bounded_thread(lambda: main(argv), timeout=60) == EXIT_BAD_INPUT
    assert fifo.is_fifo()
