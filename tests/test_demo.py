"""`make demo`'s flow: the whole pipeline on the bundled samples, traced from checkpoint to XML."""

from __future__ import annotations

import pytest

from conftest import MIRROR
from flows.demo import built_table, demo
from storage import Store


@pytest.mark.usefixtures("prefect_server")
def test_demo_runs_the_whole_pipeline(tmp_path):
    store = Store(tmp_path / "store")
    [checkpoint_ref] = demo(store_root=str(store.root), train_steps=5)
    checkpoint = store.require(checkpoint_ref)
    assert checkpoint.kind == "checkpoint" and checkpoint.summary["steps"] == 5
    table = built_table(store, [checkpoint_ref])
    for kind in ("download/", "parsed/", "corpus/", "tokenizer/", "shards/", "checkpoint/"):
        assert kind in table
    lineage = "\n".join(store.lineage_lines(checkpoint_ref))
    for md5_file in MIRROR.glob("*/*.md5"):
        name, md5 = md5_file.read_text().removeprefix("MD5(").strip().split(")= ")
        assert f"{name} md5={md5}" in lineage
