"""PubMedQA: ``QUESTION`` + ``CONTEXTS``, keyed by PMID (``ori_pqal.json`` / ``ori_pqaa.json``), or
the hub's ``pubid`` + ``context`` {contexts, labels, meshes}.

Options yes / no / maybe, gold = ``final_decision``, explanation = ``LONG_ANSWER``. Split: PMIDs
in ``test_ground_truth.json`` (``config.pubmedqa_ground_truth``, else the file beside the data)
are "test", checked against ``final_decision``, the rest "train"; without that file (PQA-A, hub
copies) everything is "train" or the dataset's split.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.qa.containers import Pos, Unit, json_document
from tasks.qa.errors import QAFormatError, json_type
from tasks.qa.records import (
    GROUND_TRUTH_DISAGREES,
    NOT_AMONG_OPTIONS,
    Benchmark,
    Dataset,
    Normaliser,
    Prompting,
    Provenance,
    Skip,
    qualified_id,
    record,
    require,
    text_field,
    text_list,
)

if TYPE_CHECKING:
    from tasks.qa.stage import QAConfig

NAME = "pubmedqa"
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
GROUND_TRUTH_FILE = "test_ground_truth.json"


def detect(row: dict) -> bool:
    return "QUESTION" in row or "pubid" in row and "context" in row


def normaliser(unit: Unit, config: QAConfig, info: dict) -> Normaliser:
    truth = _ground_truth(unit, config, info)

    def normalise(row: dict, pos: Pos) -> dict:
        require(row, unit, pos, ("QUESTION", "pubid"))
        if "QUESTION" in row:  # the original ori_pqal.json / ori_pqaa.json layout
            require(row, unit, pos, "QUESTION", "CONTEXTS")
            if pos.kind != "key":
                require(row, unit, pos, "pubid")
            encoding, pmid = "original", str(row.get("pubid", pos.value))
            question, contexts, long_answer = row["QUESTION"], row["CONTEXTS"], row.get("LONG_ANSWER")
            labels, meshes, year = row.get("LABELS"), row.get("MESHES"), row.get("YEAR")
            preds = row
        else:  # the hub's qiaojin/PubMedQA
            require(row, unit, pos, "pubid", "question", "context")
            ctx = row["context"]
            if not isinstance(ctx, dict) or "contexts" not in ctx:
                raise QAFormatError(unit.name, pos, "field 'context' has no 'contexts'", "context: {contexts, labels, meshes}")
            encoding, pmid = "hf", str(row["pubid"])
            question, contexts, long_answer = row["question"], ctx["contexts"], row.get("long_answer")
            labels, meshes, year = ctx.get("labels"), ctx.get("meshes"), None
            preds = {**ctx, **row}
        decision = text_field(row.get("final_decision"), unit, pos, "final_decision")
        record_id = qualified_id(config, NAME, pmid)
        if decision is not None and decision not in PUBMEDQA_OPTIONS:
            raise Skip(NOT_AMONG_OPTIONS, record_id)
        split = None if truth is None else "train"
        if truth is not None and pmid in truth:
            info["ground_truth_matched"] += 1
            split = "test"
            if decision is not None and truth[pmid] != decision:
                raise Skip(GROUND_TRUTH_DISAGREES, record_id)
        meta = {
            "context_labels": text_list(labels, unit, pos, "LABELS"),
            "meshes": text_list(meshes, unit, pos, "MESHES"),
            "year": year,
            "reasoning_required_pred": preds.get("reasoning_required_pred"),
            "reasoning_free_pred": preds.get("reasoning_free_pred"),
        }
        return record(
            unit, config, NAME, encoding, native_id=pmid, split=split, default_split="train",
            question=text_field(question, unit, pos, "question"), context=text_list(contexts, unit, pos, "CONTEXTS"),
            options=list(PUBMEDQA_OPTIONS),
            answer_idx=None if decision is None else PUBMEDQA_OPTIONS.index(decision),
            answer_text=decision, explanation=text_field(long_answer, unit, pos, "LONG_ANSWER"), meta=meta,
        )

    return normalise


def _ground_truth(unit: Unit, config: QAConfig, info: dict) -> dict[str, str] | None:
    """PMID -> label from ``config.pubmedqa_ground_truth`` or the test_ground_truth.json beside the data."""
    if config.pubmedqa_ground_truth:
        path = Path(config.pubmedqa_ground_truth)
    elif unit.folder is not None and (unit.folder / GROUND_TRUTH_FILE).is_file():
        path = unit.folder / GROUND_TRUTH_FILE
    else:
        info["test_ground_truth"] = None
        return None
    truth = json_document(path)
    if not isinstance(truth, dict):
        raise QAFormatError(path, None, f"the file is a JSON {json_type(truth)}", 'an object PMID -> "yes" | "no" | "maybe"')
    for pmid, label in truth.items():
        if label not in PUBMEDQA_OPTIONS:
            raise QAFormatError(path, f"key {pmid}", "a label that is not yes, no or maybe", '"yes", "no" or "maybe"')
    info.update(test_ground_truth=str(path), ground_truth_pmids=len(truth), ground_truth_matched=0)
    return truth


DATASET = Dataset(
    name=NAME,
    title="PubMedQA",
    expected="PubMedQA records: QUESTION, CONTEXTS, final_decision (or the hub's pubid, question, context)",
    detect=detect,
    normaliser=normaliser,
    question_fields=("question", "QUESTION"),
    data_help="PubMedQA: a folder with ori_pqal.json and test_ground_truth.json, or a Hugging Face copy.",
    marks=("QUESTION", "CONTEXTS"),
    side_files=(GROUND_TRUTH_FILE,),
    prompting=Prompting(context_label="Abstract: ", answer_words=True, long_answers="PubMedQA long answers"),
    benchmarks=(Benchmark("pubmedqa", NAME, "test", None, ("cloze",), "majority", "qiaojin/PubMedQA", "PubMedQA"),),
    preference=True,
    provenance=Provenance(
        "PubMedQA", "qiaojin/PubMedQA", "MIT (https://github.com/pubmedqa/pubmedqa, LICENSE)",
        "Jin, Dhingra, Liu, Cohen and Lu. PubMedQA: A Dataset for Biomedical Research Question Answering. EMNLP-IJCNLP 2019",
        "PubMed article titles, answered yes, no or maybe from the abstract",
    ),
    pmid=lambda record: int(record["id"].split(":", 1)[1]),  # the native id is the PMID; its context is that abstract
)
