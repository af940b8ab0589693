"""Hostile mergekit YAML through service.diagnose: a ConfigError (or a diagnosis), never a crash or a hang."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.hostile import Sandbox, in_bounded_thread
from mergelens_mcp import service
from mergelens_mcp.errors import ConfigError, MergeLensError, PathNotAllowedError
from mergelens_mcp.models import ConfigDiagnosis
from mergelens_mcp.security import paths
from mergelens_mcp.security.paths import PathGuard


def laughs(levels: int, fan: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return (
        "\n".join(lines)
        + f"\nmerge_method: ties\nmodels:\n  - model: *l{levels - 1}\nparameters: *l{levels - 1}\n"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000, "nested too deeply"),
        ("{a: " * 50_000, "nested too deeply"),
        ("x" * 10_000, "not a mapping"),
        (laughs(8), "expands to over 100,000 values"),
        ("&a [*a]", "expands to over"),
        ("!!python/object/apply:os.system ['echo pwned']", "could not determine a constructor"),
        ("merge_method: ties\nmodels: [\n", "invalid YAML at line"),
        ("---\nmerge_method: ties\n---\nmerge_method: slerp\n", "several YAML documents"),
        ("", "not a mapping|is empty"),
        ("merge_method: " + "x" * 2_000_000, "over 1,048,576 characters"),
        ("merge_method: ties\nx: 2001-02-30\n", "invalid YAML at line 2.*2001-02-30"),
        ("merge_method: !!int abc\n", "invalid YAML at line 1.*'abc' cannot be read as int"),
        ("merge_method: ties\n\nx: !!float abc\n", "invalid YAML at line 3.*as float"),
        ("merge_method: ties\nx: " + "9" * 5000 + "\n", "invalid YAML at line 2.*cannot be read as int"),
    ],
    ids=[
        "deep-list",
        "deep-map",
        "long-line",
        "billion-laughs",
        "self-alias",
        "python-tag",
        "unclosed",
        "multi-doc",
        "empty",
        "huge",
        "impossible-date",
        "int-tag",
        "float-tag",
        "5000-digits",
    ],
)
def test_hostile_yaml_text_gives_a_config_error_in_bounded_time(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        in_bounded_thread(lambda: service.diagnose(text), timeout=60)
    assert len(str(info.value)) < 1000


def test_a_config_path_outside_the_roots_reveals_nothing_about_whether_it_exists(sandbox: Sandbox) -> None:
    guard = PathGuard([sandbox.root])
    (sandbox.outside / "real.yaml").write_text("merge_method: ties\n")
    errors = []
    for name in ("real.yaml", "missing.yaml", "real", "missing"):
        with pytest.raises(MergeLensError) as info:
            service.diagnose(str(sandbox.outside / name), guard=guard)
        errors.append((type(info.value).__name__, str(info.value).replace(name, "NAME")))
    assert errors[0] == errors[1] and errors[2] == errors[3]


def test_models_named_inside_a_yaml_are_held_to_the_roots(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sandbox.root)
    text = (
        "merge_method: ties\nbase_model: model_a\nmodels:\n"
        f"  - model: {sandbox.secret_model}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: ../outside/no_such_model\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        "  - model: model_b\n    parameters: {weight: 0.5, density: 0.5}\n"
    )
    result = service.diagnose(text, guard=PathGuard([sandbox.root]))
    unreadable = [f.message for f in result.findings if f.code == "model_unreadable"]
    assert len(unreadable) == 2 and all("outside the allowed roots" in m for m in unreadable)
    assert sorted(result.models_checked) == ["model_a", "model_b"]


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "merge_method",
        "models",
        "slices",
        "base_model",
        "parameters",
        "dtype",
        "tokenizer_source",
        "model",
        "layer_range",
        "sources",
        "weight",
        "density",
        "t",
        "x",
    ]
)
CONFIGS = st.recursive(
    st.fixed_dictionaries(
        {
            "merge_method": st.sampled_from(["ties", "slerp", "linear", "dare_ties", "passthrough", "nope"])
            | SCALARS
        }
    ),
    lambda inner: st.dictionaries(KEYS, inner | VALUES, max_size=5),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=CONFIGS)
def test_generated_config_structures_give_a_diagnosis_or_a_config_error(config: object) -> None:
    text = yaml.safe_dump(config)
    try:
        result = service.diagnose(text)
    except MergeLensError as exc:
        assert 0 < len(str(exc)) < 5000
    else:
        assert isinstance(result, ConfigDiagnosis)
        result.model_dump_json()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_random_text_as_a_config_gives_a_diagnosis_or_a_config_error(text: str) -> None:
    try:
        service.diagnose(text, guard=PathGuard([Path.cwd()]))
    except MergeLensError as exc:
        assert str(exc)


def test_a_config_swapped_for_a_symlink_after_the_path_check_is_not_followed(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is opened without following a last-component link, as checkpoint files are: a link swapped in
    between the guard's check and the read cannot lead outside the roots."""
    (sandbox.outside / "secret.yaml").write_text("merge_method: linear\nmodels: [{model: org/secret}]\n")
    link = sandbox.root / "merge.yaml"
    link.symlink_to(sandbox.outside / "secret.yaml")
    guard = PathGuard([sandbox.root])
    monkeypatch.setattr(guard, "check", lambda raw, what="path", **_: link)  # the check saw a regular file
    with pytest.raises(PathNotAllowedError, match="cannot open .*merge.yaml.*refused"):
        service.diagnose(str(link), guard=guard)


def test_a_fifo_or_an_oversized_config_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "merge.yaml"
    os.mkfifo(fifo)
    with pytest.raises(MergeLensError, match="not a file|not a regular file"):
        in_bounded_thread(lambda: service.diagnose(str(fifo), guard=PathGuard([tmp_path])), timeout=30)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"merge_method: linear\n" + b"#" * (1 << 20))
    with pytest.raises(ConfigError, match="big.yaml is over 1 MiB"):
        service.diagnose(str(big), guard=PathGuard([tmp_path]))


def test_a_config_file_is_read_no_further_than_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that grows after its size was looked at (or whose size lies, as /proc files do) is still read
    at most one byte past the cap."""
    path = tmp_path / "merge.yaml"
    path.write_bytes(b"merge_method: linear\n" + b"#" * (3 << 20))
    asked: list[int] = []
    real_open = paths.open_regular

    def spying_open(target: Path, what: str) -> BinaryIO:
        fh = real_open(target, what)
        read = fh.read
        fh.read = lambda n=-1: asked.append(n) or read(n)  # type: ignore[method-assign]
        return fh

    monkeypatch.setattr(paths, "open_regular", spying_open)
    with pytest.raises(ConfigError, match="over 1 MiB"):
        service.diagnose(str(path))
    assert asked == [(1 << 20) + 1]
