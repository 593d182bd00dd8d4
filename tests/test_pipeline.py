"""The pipeline flow as `make demo` runs it, on the bundled samples, traced from checkpoint to XML."""

from __future__ import annotations

import json

import pytest

from conftest import MIRROR
from flows.cli import flow_arguments, _flow_parser
from flows.pipeline import pipeline
from storage.lineage import lineage, table, tree_lines

@pytest.mark.usefixtures("prefect_server")
def test_the_demo_configuration_runs_the_whole_pipeline(store):
    quick = ["--optim.max-steps", "5", "--finetune-optim.max-steps", "2", "--dpo-optim.max-steps", "2", "--shots", "0", "--max-items", "3",
             "--generation-items", "0", "--perplexity-documents", "3", "--held-out-documents", "3"]
    args = _flow_parser("pipeline", pipeline).parse_args(["--config", "demo", *quick])
    kwargs = flow_arguments(pipeline, args)
    assert kwargs["source"].source == str(MIRROR) and kwargs["tokenizer"].vocab_size == 4096
    assert kwargs["curriculum"].sources == ("pubmedqa", "instructions") and kwargs["finetune"].method == "lora"
    assert kwargs["curriculum"].preference_sources == ("pubmedqa",)
    *refs, release = pipeline(**kwargs)
    assert len(refs) == 4  # the pretrained model's evaluation, then the model's after each source, then after DPO
    evaluated = [store.require(store.require(ref).parents[0]) for ref in refs]
    assert [a.kind for a in evaluated] == ["pretrain", "finetune", "finetune", "dpo"]
    checkpoint = evaluated[0]
    assert checkpoint.summary["steps"] == 5 and evaluated[2].summary["steps"] == evaluated[3].summary["steps"] == 2
    assert evaluated[3].parents[0] == evaluated[2].ref  # DPO from the last fine-tuned model, its reference
    assert store.require(release).parents == [evaluated[-1].ref, refs[-1]]  # the last model released, with its evaluation
    root = lineage(store, evaluated[-1].ref)  # the final model, down to the XML files
    built = table(root)
    for kind in ("download/", "parse/", "corpus/", "hygiene/", "tokenizer/", "shards/", "pretrain/", "finetune/", "dpo/", "qa/", "trainset/"):
        assert kind in built
    for tuned in evaluated[1:]:  # fine-tuning and DPO train on cleaned training sets, screened against every QA artifact evaluated
        [data] = [store.require(p) for p in tuned.parents if p.startswith("trainset/")]
        assert {store.require(p).kind for p in data.parents} == {"qa"} and len(data.parents) == 4 and data.summary["train"]["after"] > 0
    cleaned, held_out = store.ls("hygiene")  # on by default, of the QA data's evaluation items: the evaluation finds none in the corpus
    assert {store.require(ref).kind for ref in cleaned.parents} == {"corpus", "qa"}
    # The corpus is the baseline file's; the update file's new abstracts, cleaned alike, are held out in every evaluation.
    snapshots = [store.require(next(p for p in a.parents if p.startswith("corpus/"))) for a in (cleaned, held_out)]
    assert [s.summary["records"] for s in snapshots] == [1_500, 3_000]
    for ref in refs:
        evaluation = store.require(ref)
        results = json.loads(evaluation.file("results.json").read_text())
        assert all(r["contamination"]["overlapping_items"] == 0 for r in results if "contamination" in r)
        assert evaluation.parents[-1] == held_out.ref and f"abstracts new since its corpus (in {held_out.ref})" in [r["name"] for r in results]
    trained, evaluated = ("\n".join(tree_lines(lineage(store, ref))) for ref in (evaluated[-1].ref, refs[-1]))
    for md5_file in MIRROR.glob("*/*.md5"):  # the model down to the baseline file; its evaluation to the update file too
        name, md5 = md5_file.read_text().removeprefix("MD5(").strip().split(")= ")
        assert (f"{name} md5={md5}" in trained) == (md5_file.parent.name == "baseline") and f"{name} md5={md5}" in evaluated
