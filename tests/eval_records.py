"""Canonical QA records from the bundled real rows (tests/data/eval/), and the same rows in the
schemas lm-evaluation-harness's tasks read (tests/data/lm_eval_tasks/data/).

A stand-in for the QA converter, for tests and benchmarks only; see tests/data/eval/SOURCES.md
for what the rows are. ``python tests/eval_records.py`` rewrites the lm-eval data files.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "tests" / "data" / "eval"
LM_EVAL_TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
LETTERS = "ABCDE"


def _record(id, source, split, question, options, answer_idx, context=(), explanation=None, **meta) -> dict:
    return {
        "id": id, "source": source, "split": split, "question": question, "context": list(context),
        "options": options, "answer_idx": answer_idx, "answer_text": options[answer_idx],
        "explanation": explanation, "meta": json.dumps(meta),
    }


def pubmedqa_records() -> list[dict]:
    rows = json.loads((EVAL_DATA / "pubmedqa" / "ori_pqal.json").read_text())
    test = json.loads((EVAL_DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    options = ["yes", "no", "maybe"]
    return [
        _record(pmid, "pubmedqa", "test" if pmid in test else "train", r["QUESTION"], options, options.index(r["final_decision"]),
                r["CONTEXTS"], r["LONG_ANSWER"], labels=r["LABELS"], year=r["YEAR"])
        for pmid, r in rows.items()
    ]


def medqa_records() -> list[dict]:
    records = []
    for n, name in ((4, "US_4_options_phrases_no_exclude_test.jsonl"), (5, "US_test.jsonl")):
        lines = (EVAL_DATA / "medqa" / name).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            r = json.loads(line)
            records.append(_record(f"medqa-us{n}-test-{i:04d}", "medqa", "test", r["question"], list(r["options"].values()),
                                   LETTERS.index(r["answer_idx"]), meta_info=r["meta_info"]))
    return records


def medmcqa_records() -> list[dict]:
    rows = json.loads((EVAL_DATA / "medmcqa" / "medmcqa_val.json").read_text())
    return [
        _record(d["id"], "medmcqa", "validation", d["question"], [d[k] for k in ("opa", "opb", "opc", "opd")], int(d["cop"]),
                explanation=None if d["exp"] == "nan" else d["exp"], subject=d["subject_name"])
        for d in (row["data"] for row in rows)
    ]


def load_records() -> list[dict]:
    return pubmedqa_records() + medqa_records() + medmcqa_records()


def lm_eval_docs(records: list[dict]) -> dict[str, list[dict]]:
    """Test-split rows per lm-eval data file, in the fields of the harness's hub datasets
    (GBaker/MedQA-USMLE-4-options-hf, openlifescienceai/medmcqa, bigbio/pubmed_qa), plus our id."""
    files: dict[str, list[dict]] = {"pubmedqa": [], "medmcqa": [], "medqa_4options": [], "medqa_5options": []}
    for r in records:
        if r["source"] == "pubmedqa" and r["split"] == "test":
            files["pubmedqa"].append({"id": r["id"], "QUESTION": r["question"], "CONTEXTS": r["context"], "final_decision": r["answer_text"]})
        elif r["source"] == "medmcqa":
            files["medmcqa"].append({"id": r["id"], "question": r["question"], **dict(zip(("opa", "opb", "opc", "opd"), r["options"])), "cop": r["answer_idx"]})
        elif r["source"] == "medqa":
            endings = {f"ending{i}": o for i, o in enumerate(r["options"])}
            files[f"medqa_{len(r['options'])}options"].append({"id": r["id"], "sent1": r["question"], **endings, "label": r["answer_idx"]})
    return files


def write_lm_eval_data() -> None:
    out = LM_EVAL_TASKS / "data"
    out.mkdir(exist_ok=True)
    for name, docs in lm_eval_docs(load_records()).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


if __name__ == "__main__":
    write_lm_eval_data()
