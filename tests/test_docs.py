"""The README, CONTRIBUTING.md and docs/ name only what exists: every `medlm` command (and `medlm
store` action), `make` target and `python -m` module they quote, every page they link to."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from flows.cli import OTHER_COMMANDS, main
from flows.registry import COMMANDS

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
