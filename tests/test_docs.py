"""The README, CONTRIBUTING.md and docs/ name only what exists: every `medlm` command (and `medlm
store` action), `make` target, `python -m` module and MEDLM_* setting they quote, every page they
link to; the settings' tables say what storage/settings.py says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from flows.cli import OTHER_COMMANDS, main
from flows.registry import COMMANDS
from storage.settings import VARIABLES, table_row

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)  # fenced blocks and inline code: what a reader would type


def quoted(pattern: str) -> dict[str, list[str]]:
    """Each match of ``pattern`` inside the pages' code, with the pages that quote it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for code in CODE.findall(page.read_text()):
            for match in re.findall(pattern, code):
                found.setdefault(match, []).append(page.name)
    return found


def test_the_pages_are_split_as_the_readme_says():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220  # what a first visit needs; the rest is in docs/
    linked = set(re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    assert {f"docs/{p.name}" for p in PAGES if p.parent.name == "docs"} <= linked  # every page reachable from the README


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_page_a_page_links_to_exists(page):
    for target in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).resolve().is_file(), f"{page.name} links to {target}, which is not there"


def test_every_medlm_command_the_pages_quote_exists(capsys):
    commands = set(COMMANDS) | set(OTHER_COMMANDS)
    missing = {name: pages for name, pages in quoted(r"(?:^|[\s`(])medlm ([a-z][a-z-]*)").items() if name not in commands}
    assert not missing, f"commands quoted that medlm does not have: {missing}"
    with pytest.raises(SystemExit):
        main(["store", "--help"])
    actions = set(re.search(r"\{([\w,-]+)\}", capsys.readouterr().out)[1].split(","))  # argparse's {ls,verify,...}
    missing = {name: pages for name, pages in quoted(r"medlm store ([a-z][a-z-]*)").items() if name not in actions}
    assert not missing, f"`medlm store` actions quoted that it does not have ({sorted(actions)}): {missing}"


def test_every_make_target_the_pages_quote_exists():
    targets = set(re.findall(r"(?m)^([a-z][\w-]*):", (REPO / "Makefile").read_text()))
    missing = {name: pages for name, pages in quoted(r"(?:^|[\s`(])make ([a-z][\w-]*)").items() if name not in targets}
    assert not missing, f"make targets quoted that the Makefile does not have: {missing}"


def test_every_module_the_pages_run_with_python_m_exists():
    modules = {name: pages for name, pages in quoted(r"python -m ([A-Za-z_][\w.]*)").items() if name not in ("benchmarks.NAME",)}
    assert "benchmarks.demo" in modules
    missing = {name: pages for name, pages in modules.items() if importlib.util.find_spec(name) is None}
    assert not missing, f"modules quoted that do not exist: {missing}"


def test_every_setting_the_pages_quote_exists():
    read_by_the_tests = {"MEDLM_REQUIRE_NETNS"}  # tests/test_cluster.py's, not medlm's (CONTRIBUTING.md)
    missing = {name: pages for name, pages in quoted(r"MEDLM_[A-Z_]+").items() if name not in {*VARIABLES.values(), *read_by_the_tests}}
    assert not missing, f"MEDLM_* variables quoted that are no setting (storage/settings.py): {missing}"


def test_the_settings_tables_are_the_settings_descriptions():
    """Each table row of a setting is its generated row (storage/settings.py's table_row), and
    docs/running.md has a row for every setting."""
    generated = {f"`{variable}`": table_row(name) for name, variable in VARIABLES.items()}
    rows = {}
    for page in PAGES:
        for row in re.findall(r"(?m)^\| `MEDLM_[A-Z_]+`.*$", page.read_text()):
            rows.setdefault(row.split(" | ")[0].removeprefix("| "), []).append((page.name, row))
    stale = [(page, row, generated.get(name)) for name, found in rows.items() for page, row in found if row != generated.get(name)]
    assert not stale, "settings rows that are not their description (paste the third of each): " + "\n".join(map(str, stale))
    in_running = {name for name, found in rows.items() if any(page == "running.md" for page, _ in found)}
    assert in_running == set(generated), f"settings without a row in docs/running.md: {sorted(set(generated) - in_running)}"
