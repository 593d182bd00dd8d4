"""The pipeline flow as `make demo` runs it, on the bundled samples, traced from checkpoint to XML."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import MIRROR
from flows.cli import flow_arguments, _flow_parser
from flows.pipeline import pipeline
from storage.lineage import lineage, table, tree_lines

@pytest.mark.usefixtures("prefect_server")
def test_the_demo_configuration_runs_the_whole_pipeline(store):
    args = _flow_parser("pipeline", pipeline).parse_args(["--config", "demo", "--max-steps", "5"])
    kwargs = flow_arguments(pipeline, args)
    assert kwargs["source"].source == str(MIRROR) and kwargs["tokenizer"].vocab_size == 4096
    [evaluation_ref] = pipeline(**kwargs)
    assert store.require(evaluation_ref).kind == "evaluate"
    [checkpoint] = store.ls("pretrain")
    assert checkpoint.summary["steps"] == 5
    root = lineage(store, evaluation_ref)
    built = table(root)
    for kind in ("download/", "parse/", "corpus/", "tokenizer/", "shards/", "pretrain/", "qa/", "evaluate/"):
        assert kind in built
    tree = "\n".join(tree_lines(root))
    for md5_file in MIRROR.glob("*/*.md5"):
        name, md5 = md5_file.read_text().removeprefix("MD5(").strip().split(")= ")
        assert f"{name} md5={md5}" in tree
