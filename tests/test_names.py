"""One name per concept (docs/running.md, "Names"): a renamed command, deployment or option still
works under its old name, with a note, and only through the one alias table (flows/registry.py
ALIASES); no old name is used anywhere else, and no command is taken under a name the table does
not list."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.cli import OTHER_COMMANDS, main
from flows.registry import ALIASES, COMMANDS, DEPLOYMENTS

REPO = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".toml", ".sbatch", ".sh", ".yml", ".yaml", ".cfg", "Makefile")


def old_words(old: str) -> set[str]:
    """How an old name would be written: as given, and an option's as its parameter (``hf_base``)."""
    bare = old.removeprefix("--")
    return {old, bare.rsplit(":", 1)[-1], bare.replace("-", "_")} if old.startswith("--") or ":" in old else {old}


def test_no_old_name_is_used_outside_the_alias_table():
    """The code, the run configurations, the scripts and the pages use the new names; the glossary
    (docs/running.md, "Names") names the old ones for those who still type them, and tests/
    exercise them."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    glossary = re.search(r"(?ms)^## Names\n.*?(?=^## )", (REPO / "docs" / "running.md").read_text())[0]
    used = []
    for name in files:
        path = REPO / name
        if not name.endswith(TEXT) or name == "flows/registry.py" or name.startswith("tests/") or not path.is_file():
            continue
        text = path.read_text().replace(glossary, "") if name == "docs/running.md" else path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            used += [f"{name}:{number}: {alias.old}" for alias in ALIASES
                     if any(re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", line) for word in old_words(alias.old))]
    assert used == []
    assert all(alias.old in glossary for alias in ALIASES)  # and every one is documented there


def test_every_name_medlm_takes_is_current_or_in_the_alias_table():
    commands = set(COMMANDS) | set(OTHER_COMMANDS)
    # The names the dispatcher compares a command with: each one a command medlm lists.
    tree = ast.parse((REPO / "flows" / "cli.py").read_text())
    dispatched = {node.comparators[0].value for node in ast.walk(tree) if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                  and node.left.id == "command" and isinstance(node.comparators[0], ast.Constant)}
    assert dispatched and dispatched <= commands, dispatched - commands
    options = {action.option_strings[0] for entry in COMMANDS.values() for action in _parser(entry)._actions if action.option_strings}
    # The bundled run configurations' tables and settings are the pipeline's, by their current names.
    from flows.cli import flow_parameters
    from storage.config import CONFIG_DIR, make_config, read_run_config

    tables = flow_parameters(COMMANDS["pipeline"].load())[0]
    for config in sorted(CONFIG_DIR.glob("*.toml")):
        for table, values in read_run_config(config).items():
            assert table in tables, f"{config.name}: [{table}]"
            make_config(tables[table], values, where=f"{config.name} [{table}]")  # an unknown setting is refused
    for alias in ALIASES:
        assert alias.old != alias.new and alias.new not in {a.old for a in ALIASES}, alias  # no chain: an old name says the current one
        current = {"command": commands, "deployment": {d.entrypoint for d in DEPLOYMENTS}, "option": options | _deploy_options()}[alias.kind]
        assert alias.new in current and alias.old not in current, alias


def _parser(entry):
    from flows.cli import _flow_parser

    return _flow_parser(entry.command, entry.load())


def _deploy_options() -> set[str]:
    source = (REPO / "deployments" / "deploy.py").read_text()
    return set(re.findall(r'add_argument\("(--[\w-]+)"', source))


def test_an_old_command_runs_its_new_name_and_says_so(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["retrain", "--help"])
    out, err = capsys.readouterr()
    assert exit.value.code == 0 and out.startswith("usage: medlm pretrain")
    assert err == "note: the command retrain is now pretrain; the old name still works for now, but use the new one\n"


def test_an_old_option_is_taken_as_its_new_one_and_says_so(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--sources", "pubmedqa", "--hf-base", "/root"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "note: the option --hf-base is now --hf-model;" in err
    assert "error: hf_model: /root is outside the folders this process may read" in err  # read as --hf-model, and checked as one
    deploy = subprocess.run([sys.executable, "-m", "deployments.deploy", "--retrain-after-ingest", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0 and "--pretrain-after-ingest" in deploy.stdout
    assert deploy.stderr == "note: the option --retrain-after-ingest is now --pretrain-after-ingest; the old name still works for now, but use the new one\n"


def test_a_deployment_registered_under_an_old_name_runs_the_flow_it_became(capsys):
    from deployments.engine import Refused, our_flow

    registered_before = SimpleNamespace(entrypoint="flows/retrain.py:retrain")  # what the server holds for retrain/retrain
    assert our_flow(registered_before) is COMMANDS["pretrain"]
    assert "note: the deployment flows/retrain.py:retrain is now flows/pretrain.py:pretrain;" in capsys.readouterr().err
    with pytest.raises(Refused, match="this worker runs only medlm's flows"):
        our_flow(SimpleNamespace(entrypoint="flows/evil.py:evil"))


def test_an_api_run_with_a_renamed_parameter_fails_naming_the_current_one():
    """Not translated (docs/running.md, "Names"): Prefect's own check refuses it, listing the current names."""
    from prefect.exceptions import SignatureMismatchError

    with pytest.raises(SignatureMismatchError, match=r"'hf_model'.*provided with parameters \['hf_base'\]"):
        COMMANDS["finetune"].load().validate_parameters({"hf_base": "tests/data/hf"})
