"""A dataset is one module and one registry line: a sixth dataset, written here in a format of its
own, is converted, fine-tuned on, evaluated and named on the model card, with no file of the
repository touched.

Its registry line is the environment's ``MEDLM_DATASETS`` (tasks/qa/registry.py): the config
classes (QASources' fields, the curriculum's and the evaluation's names) are built from the
registry when they are imported, so the stages run in a fresh interpreter that has it, as every
process of a deployment would; they run there in-process, through a store, without Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MODULE = '''
"""Triage cases: JSON lines {"case", "ask", "picks", "right", "part"}, right an index into picks."""

from tasks.qa.records import Benchmark, Dataset, Prompting, Provenance, record, require, text_field

NAME = "triage"


def normaliser(unit, config, info):
    def normalise(row, pos):
        require(row, unit, pos, "case", "ask", "picks", "right", "part")
        return record(
            unit, config, NAME, "jsonl", native_id=str(row["case"]), split=row["part"],
            question=text_field(row["ask"], unit, pos, "ask"), context=[], options=row["picks"], answer_idx=row["right"],
            answer_text=None, explanation=None, meta={},
        )

    return normalise


DATASET = Dataset(
    name=NAME,
    title="Triage cases",
    expected="triage records: case, ask, picks, right, part",
    detect=lambda row: "ask" in row and "picks" in row,
    normaliser=normaliser,
    question_fields=("ask",),
    data_help="Triage cases: JSON lines of case, ask, picks, right, part.",
    marks=("picks",),
    prompting=Prompting(options_heading="Pick one:"),
    benchmarks=(Benchmark("triage", NAME, "test", None, ("letters", "cloze"), "constant", "medlm-tests/triage", "Triage cases"),),
    preference=True,
    provenance=Provenance("Triage cases", "medlm-tests/triage", "CC0-1.0 (written by tests/test_datasets.py)", "The medlm tests. Triage cases. 2026",
                          "cases a test made up"),
)
'''

# In the fresh interpreter: the stages, as the flows would run them, on the sixth dataset alone.
RUN = '''
import json, sys
from prefect.utilities.callables import parameter_schema
from flows.finetune import Curriculum, finetune
from model.finetune import FinetuneConfig
from model.prompts import doc_to_text
from model.train import TrainConfig
from storage import Store
from storage.formats import read_records
from tasks.evaluate import EVALUATE, EvaluationConfig
from tasks.finetune import FINETUNE, FinetuneRun
from tasks.qa import QA, QASources
from tasks.release import RELEASE, ReleaseConfig

store_root, checkpoint_ref, data = sys.argv[1:]
store = Store(store_root)
curriculum = Curriculum(sources=("triage",), preference_sources=("triage",))  # the names come from the registry
converted = QA.run(store, {}, QASources(triage=data).configs()["triage"])
steps = TrainConfig.of(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=100, checkpoint_every=100)
tuned = FINETUNE.run(store, {"base": store.require(checkpoint_ref), "data": [converted]}, FinetuneRun(FinetuneConfig(max_length=256), steps.optim, steps.run))
evaluation = EVALUATE.run(store, {"model": tuned, "qa": [converted]}, EvaluationConfig(benchmarks=("triage",), shots=(0,), generation_items=0))
release = RELEASE.run(store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-triage"))
form = parameter_schema(finetune.fn).model_dump()["definitions"]  # the UI form of the finetune flow
print(json.dumps({
    "form": {"qa": form["QASources"]["properties"]["triage"]["description"], "sources": form["Curriculum"]["properties"]["sources"]["items"]["enum"],
             "benchmarks": form["EvaluationConfig"]["properties"]["benchmarks"]["items"]["enum"]},
    "curriculum": curriculum.sources, "records": converted.summary["records"], "format": converted.summary["format"],
    "prompt": doc_to_text(read_records(converted.path)[0]), "tuned_on": tuned.parents, "converted": converted.ref,
    "evaluation": str(evaluation.path), "release": str(release.path),
}))
'''


def cases(n: int, part: str) -> list[dict]:
    return [{"case": f"{part}-{i}", "ask": f"Patient {i} of the {part} set: who is seen first?", "picks": ["the child", "the adult", "the elder"],
             "right": i % 3, "part": part} for i in range(n)]


def test_a_sixth_dataset_is_one_module_and_one_registry_line(tiny_checkpoint, session_store, tmp_path):
    from huggingface_hub import ModelCard

    from flows.finetune import Curriculum
    from storage.config import ConfigError, make_config

    (tmp_path / "triage.py").write_text(textwrap.dedent(MODULE))
    data = tmp_path / "triage.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in cases(12, "train") + cases(6, "test")))
    env = {**os.environ, "MEDLM_DATASETS": "triage", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    repository = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    run = subprocess.run([sys.executable, "-c", RUN, str(session_store.root), tiny_checkpoint.ref, str(data)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    made = json.loads(run.stdout.strip().splitlines()[-1])
    assert subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True).stdout == repository  # no file of the repository touched

    assert made["form"] == {"qa": "Triage cases: JSON lines of case, ask, picks, right, part.", "sources": ["pubmedqa", "medmcqa", "medqa", "triage", "instructions"],
                            "benchmarks": ["pubmedqa", "medmcqa", "medqa_4options", "medqa_5options", "triage"]}
    assert made["curriculum"] == ["triage"] and made["format"] == "triage"
    assert {k: n for k, n in made["records"].items() if n} == {"train": 12, "test": 6}
    assert made["prompt"] == "Question: Patient 0 of the train set: who is seen first?\nPick one:\nA. the child\nB. the adult\nC. the elder\nAnswer:"
    assert made["converted"] in made["tuned_on"]
    results = json.loads((Path(made["evaluation"]) / "results.json").read_text())
    assert [(r["name"], r["style"], r["metrics"]["acc"]["n"]) for r in results] == [("triage", "letters", 6), ("triage", "cloze", 6)]
    card = ModelCard.load(Path(made["release"]) / "README.md")
    assert "CC0-1.0 (written by tests/test_datasets.py)" in card.text and "Triage cases's questions come from cases a test made up" in card.text
    assert "medlm-tests/triage" in card.data.datasets
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {("medlm-tests/triage", "Triage cases")}

    # This process has no MEDLM_DATASETS: the name is refused in one line that lists the registered ones.
    with pytest.raises(ConfigError, match=r"^Curriculum: sources\.0: Input should be 'pubmedqa', 'medmcqa', 'medqa' or 'instructions'$"):
        make_config(Curriculum, {"sources": ["triage"]})
