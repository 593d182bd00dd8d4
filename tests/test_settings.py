"""The MEDLM_* settings: one module reads them (storage/settings.py), when asked, and `medlm
settings` shows them as a user runs it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.settings import VARIABLES, Settings, SettingsError, settings

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "model", "storage", "deployments", "tasks", "benchmarks")
SETTINGS_MODULE = REPO / "storage" / "settings.py"
MEDLM = Path(sys.executable).with_name("medlm")


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _names_a_setting(node: ast.AST, constants: set[str]) -> bool:
    """A MEDLM_* variable's name: a literal, an f-string that starts with one, ``variable(...)``,
    or a constant assigned one of those (``constants``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.startswith("MEDLM_")
    if isinstance(node, ast.JoinedStr):
        return bool(node.values) and _names_a_setting(node.values[0], constants)
    if isinstance(node, ast.Call):
        return getattr(node.func, "id", getattr(node.func, "attr", None)) == "variable"
    return getattr(node, "id", getattr(node, "attr", None)) in constants


def setting_constants(trees: list[ast.Module]) -> set[str]:
    """Module-level names assigned a MEDLM_* variable's name (``REMOTE_SETTING = variable("remote")``)."""
    return {target.id for tree in trees for statement in tree.body if isinstance(statement, ast.Assign) and _names_a_setting(statement.value, set())
            for target in statement.targets if isinstance(target, ast.Name)}


def environment_reads(tree: ast.Module, constants: set[str]) -> list[int]:
    """The lines of ``tree`` that read a MEDLM_* variable from the environment: ``os.environ[NAME]``,
    ``os.environ.get/pop/setdefault(NAME)``, ``os.getenv(NAME)``, ``NAME in os.environ``."""
    lines = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            name = node.slice
        elif isinstance(node, ast.Call) and node.args and (
                (isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault") and _is_environ(node.func.value))
                or getattr(node.func, "attr", getattr(node.func, "id", None)) == "getenv"):
            name = node.args[0]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and any(map(_is_environ, node.comparators)):
            name = node.left
        if name is not None and _names_a_setting(name, constants):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_walk_finds_every_way_of_reading_a_variable():
    source = textwrap.dedent('''
        import os
        from os import environ, getenv
        STORE_SETTING = "MEDLM_STORE"
        CORES_SETTING = variable("cores")
        os.environ.get("MEDLM_HOME")
        os.environ[STORE_SETTING]
        os.getenv(f"MEDLM_{name}")
        getenv("MEDLM_DEBUG", "0")
        "MEDLM_REMOTE" in os.environ
        environ.pop(CORES_SETTING, None)
        os.environ.setdefault(variable("sources"), "")
        os.environ["MEDLM_PARENT_PID"] = "1"  # a write: what a child process reads
        env = {**os.environ, "MEDLM_STORE": "/s"}
        os.environ.get("PATH")
    ''')
    tree = ast.parse(source)
    assert environment_reads(tree, setting_constants([tree])) == [6, 7, 8, 9, 10, 11, 12]


def test_no_module_but_the_settings_module_reads_a_medlm_variable():
    files = [f for package in PACKAGES for f in sorted((REPO / package).rglob("*.py"))]
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    constants = setting_constants(list(trees.values()))
    assert {"REMOTE_SETTING", "DATA_ROOTS_SETTING"} <= constants
    reads = {str(f.relative_to(REPO)): lines for f, tree in trees.items() if f != SETTINGS_MODULE and (lines := environment_reads(tree, constants))}
    assert not reads, f"MEDLM_* variables read outside storage/settings.py (ask settings() instead): {reads}"


def test_settings_are_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDLM_STORE", raising=False)
    monkeypatch.setenv("MEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDLM_CORES", "3")
    first = settings()
    assert first.store == tmp_path / "home" / "store" and first.cores == 3  # the store's default follows the home
    assert settings() is first  # the same values: parsed once
    monkeypatch.setenv("MEDLM_STORE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MEDLM_CORES", "")  # an empty variable is unset...
    monkeypatch.setenv("MEDLM_SOURCES", "")  # ...but an empty list is a list: no downloads
    monkeypatch.setenv("MEDLM_DATA_ROOTS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}{os.pathsep}")
    monkeypatch.setenv("MEDLM_RENDEZVOUS_HOSTS", "node01, node02 node03")
    now = settings()
    assert now.store == tmp_path / "elsewhere" and now.cores is None and now.sources == ()
    assert now.data_roots == (tmp_path / "a", tmp_path / "b") and now.rendezvous_hosts == ("node01", "node02", "node03")


@pytest.mark.parametrize("variable, value, message", [
    ("MEDLM_CORES", "two", "MEDLM_CORES='two': expected a valid integer"),
    ("MEDLM_CORES", "0", "MEDLM_CORES='0': expected greater than or equal to 1"),
    ("MEDLM_CONNECT_TIMEOUT", "-5", "MEDLM_CONNECT_TIMEOUT='-5': expected greater than 0"),
    ("MEDLM_REMOTE", "https://bucket.example.org/x", "MEDLM_REMOTE='https://bucket.example.org/x': expected s3://bucket/prefix or file:///path"),
    ("MEDLM_DEBUG", "maybe", "MEDLM_DEBUG='maybe': expected a valid boolean"),
])
def test_a_value_that_does_not_parse_is_one_line_naming_the_variable(variable, value, message, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        settings()
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def _run_settings(folder: Path, *args: str, **variables: str) -> subprocess.CompletedProcess:
    """The installed `medlm settings` (or `medlm ARGS`), in ``folder``, with no MEDLM_* variable but ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))} | variables
    return subprocess.run([str(MEDLM), *(args or ["settings"])], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_medlm_settings_shows_each_value_and_where_it_came_from(tmp_path):
    run = _run_settings(tmp_path)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    shown, said = {}, {}  # each variable's line; the description below it
    for line in run.stdout.splitlines():
        if line.startswith("MEDLM_"):
            variable = line.split("=", 1)[0]
            shown[variable], said[variable] = line, []
        elif line.startswith("    "):
            said[variable].append(line.strip())
    assert list(shown) == list(VARIABLES.values())  # every setting, in the order of its class
    assert all(" ".join(said[VARIABLES[name]]) == field.description for name, field in Settings.model_fields.items())
    assert shown["MEDLM_HOME"] == "MEDLM_HOME=.medlm  (default)"
    assert shown["MEDLM_STORE"] == "MEDLM_STORE=.medlm/store  (derived: MEDLM_HOME/store)"
    assert shown["MEDLM_REMOTE"] == "MEDLM_REMOTE=  (unset)"
    assert shown["MEDLM_CONNECT_TIMEOUT"] == "MEDLM_CONNECT_TIMEOUT=120  (default)"
    assert not any(tmp_path.iterdir())  # it only looks: nothing made in the folder

    home = tmp_path / "my home"
    run = _run_settings(tmp_path, MEDLM_HOME=str(home), MEDLM_CORES="3", MEDLM_SOURCES="https://a.example/x, https://b.example/y", MEDLM_STOER="/typo")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert f"MEDLM_HOME='{home}'  (environment)" in lines and f"MEDLM_STORE='{home}/store'  (derived: MEDLM_HOME/store)" in lines
    assert "MEDLM_CORES=3  (environment)" in lines and "MEDLM_SOURCES='https://a.example/x https://b.example/y'  (environment)" in lines
    assert lines[-1] == "set, but not settings of medlm (misspelt?): MEDLM_STOER"


def test_a_bad_value_is_one_line_and_status_2_before_any_command_runs(tmp_path):
    run = _run_settings(tmp_path, MEDLM_CORES="two")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: MEDLM_CORES='two': expected a valid integer, unable to parse string as an integer\n"
    run = _run_settings(tmp_path, "store", "ls", MEDLM_CONNECT_TIMEOUT="soon")
    assert run.returncode == 2 and run.stdout == "" and run.stderr == "error: MEDLM_CONNECT_TIMEOUT='soon': expected a valid number, unable to parse string as a number\n"
    assert not any(tmp_path.iterdir())


def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    """`medlm settings | head -1`: the pipe closes before the output is written; the command ends
    as a shell expects of it (status 141, SIGPIPE's), not with "error: [Errno 32] Broken pipe"."""
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write fails
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}
    run = subprocess.run([str(MEDLM), "settings"], cwd=tmp_path, env=env, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(writer)
    assert (run.returncode, run.stderr) == (141, "")
