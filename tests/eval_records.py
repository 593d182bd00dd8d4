"""Canonical QA records of the bundled real rows (tests/data/{pubmedqa,medqa,medmcqa}, made by the
qa stage's converter), and the same rows in the schemas lm-evaluation-harness's tasks read
(tests/data/lm_eval_tasks/data/). ``python tests/eval_records.py`` rewrites the lm-eval data files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from storage.formats import read_records
from tasks.qa import QAConfig, convert_qa

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
QA_SOURCES = (DATA / "pubmedqa", DATA / "medqa", DATA / "medmcqa" / "medmcqa_val.json")
LM_EVAL_TASKS = DATA / "lm_eval_tasks"
LOCAL_TASKS = {  # the local lm-eval tasks in LM_EVAL_TASKS -> (our benchmark, style)
    "local_pubmedqa": ("pubmedqa", "cloze"),
    "local_medmcqa": ("medmcqa", "letters"),
    "local_medmcqa_cloze": ("medmcqa", "cloze"),
    "local_medqa_4options": ("medqa_4options", "letters"),
    "local_medqa_4options_cloze": ("medqa_4options", "cloze"),
    "local_medqa_5options": ("medqa_5options", "letters"),
    "local_medqa_5options_cloze": ("medqa_5options", "cloze"),
}


def load_records() -> list[dict]:
    """PubMedQA (train and test), MedQA with 4 and with 5 options (test), MedMCQA (validation)."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(QA_SOURCES):
            convert_qa(QAConfig(source=str(source)), Path(tmp) / str(i))
            records += read_records(Path(tmp) / str(i))
    return records


def lm_eval_docs(records: list[dict]) -> dict[str, list[dict]]:
    """Test-split rows per lm-eval data file, in the fields of the harness's hub datasets
    (GBaker/MedQA-USMLE-4-options-hf, openlifescienceai/medmcqa, bigbio/pubmed_qa), plus our id."""
    files: dict[str, list[dict]] = {"pubmedqa": [], "medmcqa": [], "medqa_4options": [], "medqa_5options": []}
    for r in records:
        if r["source"] == "pubmedqa" and r["split"] == "test":
            files["pubmedqa"].append({"id": r["id"], "QUESTION": r["question"], "CONTEXTS": r["context"], "final_decision": r["answer_text"]})
        elif r["source"] == "medmcqa" and len(r["options"]) == 4:  # lm-eval's task reads opa..opd
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
