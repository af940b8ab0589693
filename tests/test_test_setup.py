"""The README's test command on a fresh machine: what it cannot install itself, it names, with the one command
(`make test-deps`) that adds it; CI runs that same command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

from fixtures import browser, setup

REPO = Path(__file__).resolve().parents[1]


def test_make_test_deps_installs_chromium_and_the_inspector_and_ci_uses_it() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test-deps:\n\t\.ci/test-deps$", makefile, re.M)
    script = (REPO / ".ci" / "test-deps").read_text()
    assert "apt-get install -y -qq chromium" in script and "@modelcontextprotocol/inspector@2" in script
    assert (REPO / ".ci" / "test-deps").stat().st_mode & 0o111
    assert "make test-deps\nmake test\n" in (REPO / ".ci" / "run").read_text()
    assert "`make test-deps` installs both" in (REPO / "README.md").read_text()


def test_the_skip_reasons_and_the_end_of_the_run_name_make_test_deps() -> None:
    assert "`make test-deps`" in browser.INSTALL_HINT
    assert "run `make test-deps`" in (REPO / "tests" / "protocol" / "test_inspector.py").read_text()
    lines: list[str] = []
    skipped = [SimpleNamespace(longrepr=("x.py", 1, f"Skipped: no Chromium: {browser.INSTALL_HINT}")),
               SimpleNamespace(longrepr=("y.py", 2, "Skipped: unrelated"))]
    reporter = SimpleNamespace(stats={"skipped": skipped}, write_line=lambda text, **_: lines.append(text))
    setup.pytest_terminal_summary(reporter)  # type: ignore[arg-type]
    assert lines == ["1 test(s) skipped for want of Chromium or the MCP Inspector: `make test-deps` installs "
                     "them, then run the tests again"]


def test_import_mergekit_in_the_test_process_is_never_the_test_folder() -> None:
    """tests/ is on sys.path (pyproject's pythonpath): a tests/mergekit/__init__.py would make `import mergekit`
    here the test package, hiding a real mergekit. Without it the folder is at most a namespace portion, which
    an installed mergekit outranks."""
    spec = importlib.util.find_spec("mergekit")
    assert spec is None or spec.origin is None or (REPO / "tests") not in Path(spec.origin).parents
