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
        elif r["source"] == "medmcqa":
            files["medmcqa"].append({"id": r["id"], "question": r["question"], **dict(zip(("opa", "opb", "opc", "opd"), r["options"])), "cop": r["answer_idx"]})
        elif r["source"] == "medqa":
            endings = {f"ending{i}": o for i, o in enumerate(r["options"])}
            files[f"medqa_{len(r['options'])}options"].append({"id": r["id"], "sent1": r["question"], **endings, "label": r["answer_idx"]})
    return files


def source_lm_eval_docs() -> dict[str, list[dict]]:
    """The same rows as ``lm_eval_docs``, built from the bundled source files themselves, not from
    our records: what the harness's tasks would read from the hub copies of these rows (every text
    exactly as the source has it, MedMCQA's four options whatever they say). Only the ids (for
    joining) come from our conversion, matched by position in each file."""
    records = {}
    for source in (DATA / "pubmedqa", *sorted((DATA / "medqa").glob("*.jsonl")), DATA / "medmcqa" / "medmcqa_val.json"):
        with tempfile.TemporaryDirectory() as tmp:
            convert_qa(QAConfig(source=str(source)), Path(tmp))
            records[source.name] = read_records(Path(tmp))
    files: dict[str, list[dict]] = {"pubmedqa": [], "medmcqa": [], "medqa_4options": [], "medqa_5options": []}
    pqal = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = {r["id"] for r in records["pubmedqa"] if r["split"] == "test"}
    for pmid, row in pqal.items():
        if f"pubmedqa:{pmid}" in test_ids:
            files["pubmedqa"].append({"id": f"pubmedqa:{pmid}", "QUESTION": row["QUESTION"], "CONTEXTS": row["CONTEXTS"], "final_decision": row["final_decision"]})
    for path in sorted((DATA / "medqa").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row, record in zip(rows, records[path.name], strict=True):
            options = [row["options"][letter] for letter in sorted(row["options"])]
            endings = {f"ending{i}": o for i, o in enumerate(options)}
            label = sorted(row["options"]).index(row["answer_idx"])
            files[f"medqa_{len(options)}options"].append({"id": record["id"], "sent1": row["question"], **endings, "label": label})
    for element in json.loads((DATA / "medmcqa" / "medmcqa_val.json").read_text(encoding="utf-8")):
        row = element["data"]
        options = {o: row[o] for o in ("opa", "opb", "opc", "opd")}
        files["medmcqa"].append({"id": f"medmcqa:{row['id']}", "question": row["question"], **options, "cop": int(row["cop"])})
    return files


def write_lm_eval_data() -> None:
    out = LM_EVAL_TASKS / "data"
    out.mkdir(exist_ok=True)
    for name, docs in source_lm_eval_docs().items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


if __name__ == "__main__":
    write_lm_eval_data()
