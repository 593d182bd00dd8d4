"""The `medlm` command on a store built by the real stages (no Prefect server needed)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import MIRROR
from flows.cli import app
from storage import Store
from tasks.corpus import snapshot
from tasks.download import download, select_files
from tasks.parse import parse

runner = CliRunner()


def test_store_ls_lineage_and_verify(tmp_path):
    store = Store(tmp_path / "store")
    remotes = select_files(MIRROR)
    parsed = [parse(store, download(store, remote)) for remote in remotes]
    corpus = snapshot(store, parsed)
    args = ["--store", str(store.root)]

    listing = runner.invoke(app, ["store", "ls", *args])
    assert listing.exit_code == 0, listing.output
    assert corpus.ref in listing.output and listing.output.count("download/") == 2

    tree = runner.invoke(app, ["lineage", corpus.ref, *args])
    assert tree.exit_code == 0, tree.output
    for remote in remotes:
        assert f"{remote.name} md5={remote.md5}" in tree.output
    as_json = json.loads(runner.invoke(app, ["lineage", corpus.ref, "--json", *args]).output)
    assert {p["parents"][0]["params"]["file_name"] for p in as_json["parents"]} == {r.name for r in remotes}

    assert runner.invoke(app, ["store", "verify", corpus.ref, *args]).exit_code == 0
    stats = corpus.file("stats.json")
    stats.write_text(stats.read_text().replace("1", "2"))  # same size, different bytes
    broken = runner.invoke(app, ["store", "verify", corpus.ref, *args])
    assert broken.exit_code == 1 and "stats.json: sha256 differs" in broken.output


def test_unknown_ref_is_explained(tmp_path):
    result = runner.invoke(app, ["lineage", "corpus/0123456789abcdef0123", "--store", str(tmp_path)])
    assert result.exit_code != 0
    assert "not in the store" in str(result.exception)
