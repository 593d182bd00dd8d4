"""The trainset stage on real QA rows: PII planted in real ChatDoctor records is masked in what
fine-tuning trains on (or missed, where tests/data/pii/planted.json says it is); a real MedQA test
question planted in an instruction record is dropped and counted; of a near-duplicate pair one is
kept; the evaluation's records stay byte-identical; every rule off is the data as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import DATA
from model.finetune import read_data
from model.sft import render
from storage.formats import read_records
from tasks.hygiene import jaccard, shingles
from tasks.pii import scrub
from tasks.qa import QA, QAConfig
from tasks.trainset import REPORT_JSON, REPORT_MD, TRAINSET, TrainsetConfig, fields, report_rows

PLANTED = json.loads((DATA / "pii" / "planted.json").read_text())
CHATDOCTOR = json.loads((DATA / "instructions" / "chatdoctor5k_head.json").read_text())
MEDQA_TEST = [json.loads(line) for line in (DATA / "medqa" / "US_test.jsonl").read_text().splitlines()]
ALL_OFF = TrainsetConfig(evaluation_ngrams=False, scrub_pii=False, exact_duplicates=False, near_duplicates=False)


def qa(store, source: Path, **config):
    return QA.run(store, {}, QAConfig(source=str(source), **config))


def instructions(store, tmp_path: Path, rows: list[dict], name: str = "planted.json"):
    """A qa artifact of instruction rows written as an Alpaca JSON array, as ChatDoctor ships them."""
    (tmp_path / name).write_text(json.dumps(rows, indent=6))
    return qa(store, tmp_path / name)


def report(trainset) -> dict:
    return {r["rule"]: r for r in json.loads(trainset.file(REPORT_JSON).read_text())["rules"]}


def test_planted_pii_is_caught_or_missed_as_documented():
    for case in PLANTED["cases"]:
        masked, kinds = scrub(case["text"])
        assert all(p not in masked for p in case["pii"]) == case["caught"], (case["kind"], masked)
    for text in PLANTED["not_pii"]:
        assert scrub(text) == (text, []), text


def test_planted_pii_in_real_records_is_masked_in_what_fine_tuning_trains_on(session_store, tmp_path):
    caught = [c for c in PLANTED["cases"] if c["caught"]]
    planted = {i: caught[i::len(CHATDOCTOR)] for i in range(len(CHATDOCTOR))}  # every record a few cases: the patient's, then the doctor's
    rows = [dict(row, input=" ".join([row["input"], *(c["text"] for c in planted[i][:2])]), output=" ".join([row["output"], *(c["text"] for c in planted[i][2:])]))
            for i, row in enumerate(CHATDOCTOR)]
    data = instructions(session_store, tmp_path, rows)
    trainset = TRAINSET.run(session_store, {"data": [data]}, TrainsetConfig())

    train, _ = read_data([trainset.path])
    assert len(train) == len(rows)
    for i, record in enumerate(train):
        prompt, completion = render(record, "instruction")
        for case in planted[i]:
            assert all(p not in prompt + completion for p in case["pii"]), (case["kind"], prompt + completion)
    assert report(trainset)["PII masked"]["records"] == len(rows)
    example = report(trainset)["PII masked"]["examples"][0]
    assert example["id"] == train[0]["id"] and "<EMAIL_ADDRESS>" in example["text"] and "jane.doe84" not in example["text"]
    assert "jane.doe84" not in trainset.file(REPORT_MD).read_text()
    masked = json.loads(trainset.file(REPORT_JSON).read_text())["masked"]
    assert masked["PHONE_NUMBER"] == 5 and masked["PERSON"] == 3 and masked["STREET_ADDRESS"] == 4


def test_a_planted_medqa_test_question_is_dropped_and_counted(session_store, tmp_path):
    medqa = qa(session_store, DATA / "medqa" / "US_test.jsonl")
    question = MEDQA_TEST[3]["question"]
    rows = [dict(CHATDOCTOR[0], input=f"{CHATDOCTOR[0]['input']} My exam asks: {question}"), *CHATDOCTOR[1:]]
    data = instructions(session_store, tmp_path, rows)

    trainset = TRAINSET.run(session_store, {"data": [data], "held_out": [medqa]}, TrainsetConfig())
    train, _ = read_data([trainset.path])
    assert [r["answer_text"] for r in train] == [r["output"] for r in CHATDOCTOR[1:]]
    dropped = report(trainset)["evaluation 13-gram"]
    planted_id = read_records(data.path)[0]["id"]
    assert dropped["records"] == 1 and dropped["examples"][0]["id"] == planted_id
    medqa_ids = {r["id"] for r in read_records(medqa.path) if r["question"] == question}
    assert dropped["examples"][0]["matches"] in medqa_ids
    assert trainset.parents == sorted([data.ref]) + [medqa.ref]  # the held-out QA data is in the lineage
    assert {"rule": "evaluation 13-gram", "on": "yes", "records": -1, "changed": 0} in report_rows(trainset)
    # Off, the record stays.
    kept = TRAINSET.run(session_store, {"data": [data], "held_out": [medqa]}, TrainsetConfig(evaluation_ngrams=False))
    assert len(read_data([kept.path])[0]) == len(rows)


def test_of_a_near_duplicate_pair_one_is_kept_and_an_exact_duplicate_is_dropped(session_store, tmp_path):
    original = CHATDOCTOR[2]
    near = dict(original, output=original["output"].replace("Additionally", "Also", 1))  # a repost, one word changed
    exact = dict(CHATDOCTOR[1], input="  " + CHATDOCTOR[1]["input"].upper())  # case and spacing ignored
    data = instructions(session_store, tmp_path, [*CHATDOCTOR, near, exact])
    records = read_records(data.path)
    ids = [r["id"] for r in records]
    assert 0.8 <= jaccard(*(shingles("\n".join(fields(r)), 5) for r in (records[2], records[5]))) < 1

    trainset = TRAINSET.run(session_store, {"data": [data]}, TrainsetConfig())
    assert [r["id"] for r in read_data([trainset.path])[0]] == ids[:5]
    rules = report(trainset)
    assert rules["near-duplicate"]["records"] == 1 and rules["near-duplicate"]["examples"][0] | {"text": ""} == {"id": ids[5], "text": "", "duplicate_of": ids[2]}
    assert rules["exact duplicate"]["records"] == 1 and rules["exact duplicate"]["examples"][0]["duplicate_of"] == ids[1]
    both_kept = TRAINSET.run(session_store, {"data": [data]}, TrainsetConfig(near_duplicates=False, exact_duplicates=False))
    assert [r["id"] for r in read_data([both_kept.path])[0]] == ids


def test_the_evaluation_records_are_byte_identical_and_every_rule_off_is_the_data_as_it_was(session_store):
    evaluated = [qa(session_store, DATA / "pubmedqa"), qa(session_store, DATA / "medqa"), qa(session_store, DATA / "medmcqa" / "medmcqa_val.json")]
    instruction_data = qa(session_store, DATA / "instructions")

    def digests() -> dict[str, str]:
        return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for a in evaluated + [instruction_data] for f in sorted(a.path.iterdir())}

    before = digests()
    for data in (evaluated[0], instruction_data):
        held_out = [a for a in evaluated if a is not data]
        cleaned = TRAINSET.run(session_store, {"data": [data], "held_out": held_out}, TrainsetConfig())
        as_it_was = TRAINSET.run(session_store, {"data": [data], "held_out": held_out}, ALL_OFF)
        assert read_data([as_it_was.path]) == read_data([data.path])
        assert [r for r in read_records(as_it_was.path) if r["split"] == "train"] == [r for r in read_records(data.path) if r["split"] == "train"]
        # Cleaned or not, the splits evaluation scores pass through as they are.
        assert [r for r in read_records(cleaned.path) if r["split"] != "train"] == [r for r in read_records(data.path) if r["split"] != "train"]
    assert digests() == before


def test_bad_input_is_one_line_naming_the_artifact(session_store, tmp_path):
    medqa = qa(session_store, DATA / "medqa" / "US_test.jsonl")
    with pytest.raises(Exception, match=r"input 'data' must be a qa artifact"):
        TRAINSET.run(session_store, {"data": [TRAINSET.run(session_store, {"data": [medqa]}, ALL_OFF)]}, TrainsetConfig())
