"""QA converters: real PubMedQA, MedMCQA, MedQA and ChatDoctor rows in, canonical records out.

Expected values come from the source files themselves, read here with plain ``json``; the
variants (Hugging Face copies, other option layouts, broken rows) are built in ``tmp_path``
from those real rows. Nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.qa import (
    DISAGREE,
    DUPLICATE_ID,
    EMPTY_QUESTION,
    GROUND_TRUTH_DISAGREES,
    MISSING_OPTION,
    NO_ANSWER,
    NOT_AMONG_OPTIONS,
    QA_SCHEMA,
    RECORDS_FILE,
    RECORDS_JSONL,
    REPORT_FILE,
    SKIP_REASONS,
    QAConfig,
    QAFormatError,
    convert_qa,
)
from storage.formats import read_records
from tasks.qa.registry import DATASETS

DATA = Path(__file__).parent / "data"
PUBMEDQA = DATA / "pubmedqa"
MEDMCQA_VAL = DATA / "medmcqa" / "medmcqa_val.json"
MEDMCQA_NATIVE = DATA / "medmcqa" / "hf_dummy_native"
MEDQA_4 = DATA / "medqa" / "US_4_options_phrases_no_exclude_test.jsonl"
MEDQA_5 = DATA / "medqa" / "US_test.jsonl"
INSTRUCTIONS = DATA / "instructions"
TWIN_ID = "f7469b1f-dda2-476a-9b27-312a080e0c8a"  # in hf_dummy_native/dev.json and medmcqa_val.json


def convert(source: Path | None, out: Path, **config) -> tuple[dict, list[dict], dict]:
    summary = convert_qa(QAConfig(source=None if source is None else str(source), **config), out)
    return summary, read_records(out), json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def without_format(records: list[dict]) -> list[dict]:
    """Records with meta's "format" (the container, which differs between copies) taken out."""
    out = []
    for r in records:
        meta = json.loads(r["meta"])
        del meta["format"]
        out.append({**r, "meta": meta})
    return out


# -- PubMedQA ------------------------------------------------------------------------------------


def test_pubmedqa_official_split_gold_and_long_answer(tmp_path):
    raw = json.loads((PUBMEDQA / "ori_pqal.json").read_text())
    truth = json.loads((PUBMEDQA / "test_ground_truth.json").read_text())
    summary, records, report = convert(PUBMEDQA, tmp_path)

    assert summary["records"] == {"train": len(raw) - len(truth), "validation": 0, "test": len(truth)}
    assert {r["id"] for r in records if r["split"] == "test"} == {f"pubmedqa:{p}" for p in truth}
    assert report["files"][0]["ground_truth_matched"] == len(truth)
    assert [r["id"] for r in records] == [f"pubmedqa:{p}" for p in raw]  # source order
    for r in records:
        item = raw[r["id"].split(":")[1]]
        assert r["question"] == item["QUESTION"].strip()
        assert r["context"] == item["CONTEXTS"]
        assert r["options"] == ["yes", "no", "maybe"]
        assert r["answer_text"] == item["final_decision"] == r["options"][r["answer_idx"]]
        assert r["explanation"] == item["LONG_ANSWER"]
        assert item["LONG_ANSWER"] not in r["question"] and all(item["LONG_ANSWER"] not in c for c in r["context"])
        meta = json.loads(r["meta"])
        assert meta["year"] == item["YEAR"] and meta["meshes"] == item["MESHES"]
        assert meta["context_labels"] == item["LABELS"] and meta["format"] == "json-object/pubmedqa-original"
    assert any(json.loads(r["meta"])["year"] is None for r in records)  # YEAR null in the source


def test_pubmedqa_file_path_finds_ground_truth_beside_it(tmp_path):
    _, from_folder, _ = convert(PUBMEDQA, tmp_path / "a")
    _, from_file, _ = convert(PUBMEDQA / "ori_pqal.json", tmp_path / "b")
    assert from_file == from_folder


def test_pubmedqa_without_ground_truth_is_all_train(tmp_path):
    """PQA-A has the same layout and no test_ground_truth.json: every item is "train"."""
    shutil.copy(PUBMEDQA / "ori_pqal.json", tmp_path / "ori_pqaa.json")
    summary, records, report = convert(tmp_path / "ori_pqaa.json", tmp_path / "out")
    assert summary["records"] == {"train": 66, "validation": 0, "test": 0}
    assert report["files"][0]["test_ground_truth"] is None


def test_pubmedqa_ground_truth_disagreement_and_duplicate_pmid_skipped(tmp_path):
    truth = json.loads((PUBMEDQA / "test_ground_truth.json").read_text())
    pmid = list(truth)[-1]  # not 21645374, the item doubled below
    truth[pmid] = "maybe" if truth[pmid] != "maybe" else "yes"
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    # The same PMID twice in the object: json keeps the last; the converter sees and skips the second.
    text = (PUBMEDQA / "ori_pqal.json").read_text()
    end = text.index(',\n    "')  # the first item is text[2:end] (json.dumps indent=4 layout)
    doubled = text[:end] + ",\n" + text[2:end] + text[end:]
    (tmp_path / "ori_pqal.json").write_text(doubled)

    summary, records, report = convert(tmp_path / "ori_pqal.json", tmp_path / "out", pubmedqa_ground_truth=str(tmp_path / "truth.json"))
    assert report["skipped"] == {GROUND_TRUTH_DISAGREES: 1, DUPLICATE_ID: 1}
    assert report["skip_examples"][GROUND_TRUTH_DISAGREES][0]["id"] == f"pubmedqa:{pmid}"
    assert report["skip_examples"][DUPLICATE_ID][0]["row"] == "key 21645374"
    assert f"pubmedqa:{pmid}" not in {r["id"] for r in records}
    assert summary["records"]["test"] == len(truth) - 1 and summary["rows_read"] == len(json.loads(text)) + 1


# -- MedMCQA -------------------------------------------------------------------------------------


def test_medmcqa_csv_derived_keeps_every_option_as_the_harness_does_and_clean_text_drops_nan(tmp_path):
    raw = [e["data"] for e in json.loads(MEDMCQA_VAL.read_text())]
    _, records, report = convert(MEDMCQA_VAL, tmp_path / "as-given")
    summary, cleaned, _ = convert(MEDMCQA_VAL, tmp_path / "clean", clean_text=True)

    assert summary["records"] == {"train": 0, "validation": len(raw), "test": 0}
    assert report["files"][0]["encoding"] == "csv-derived" and report["files"][0]["cop_base"] == 0
    as_given, clean = {r["id"]: r for r in records}, {r["id"]: r for r in cleaned}
    three = 0
    for d in raw:
        options = [d[o] for o in ("opa", "opb", "opc", "opd")]
        kept = [o.strip() for o in options if o != "nan"]
        r, c = as_given[f"medmcqa:{d['id']}"], clean[f"medmcqa:{d['id']}"]
        assert r["options"] == options and r["question"] == d["question"]  # what lm-eval's prompt lists: "D. nan"
        assert c["options"] == kept and c["question"] == d["question"].strip()
        assert r["answer_text"] == options[int(d["cop"])] and c["answer_text"] == kept[c["answer_idx"]] == options[int(d["cop"])].strip()
        assert c["explanation"] == (None if d["exp"] == "nan" else d["exp"].strip())
        meta = json.loads(r["meta"])
        assert meta["topic_name"] == (None if d["topic_name"] == "nan" else d["topic_name"])
        three += len(kept) == 3
    assert three == 6
    # The one question with opc missing: cleaned, opd moves up to C.
    c = clean["medmcqa:24c02db5-49d5-434a-80ab-fc70512353b5"]
    d = next(d for d in raw if d["id"] == "24c02db5-49d5-434a-80ab-fc70512353b5")
    assert c["options"] == [d["opa"], d["opb"], d["opd"]]


def test_medmcqa_native_record_and_its_csv_twin_agree(tmp_path):
    _, native, native_report = convert(MEDMCQA_NATIVE / "dev.json", tmp_path / "native")
    _, csv, _ = convert(MEDMCQA_VAL, tmp_path / "csv")
    twin = next(r for r in csv if r["id"] == f"medmcqa:{TWIN_ID}")
    assert native_report["files"][0]["cop_base"] == 1  # cop 4 = opd: 1-based
    assert native[0]["answer_idx"] == twin["answer_idx"] == 3
    assert without_format(native) == without_format([twin])


def test_medmcqa_native_folder_splits_and_unlabelled_test(tmp_path):
    summary, records, report = convert(MEDMCQA_NATIVE, tmp_path)
    assert summary["records"] == {"train": 1, "validation": 1, "test": 0}
    assert report["skipped"] == {NO_ANSWER: 1}
    assert report["skip_examples"][NO_ANSWER][0]["row"] == "line 1"
    train = next(r for r in records if r["split"] == "train")
    raw = lines(MEDMCQA_NATIVE / "train.json")[0]
    assert train["answer_idx"] == raw["cop"] - 1 and train["answer_text"] == raw["opc"]
    assert {f["file"].rsplit("/", 1)[1]: f["cop_base"] for f in report["files"]} == {"dev.json": 1, "test.json": 1, "train.json": 1}


def test_medmcqa_answer_on_a_missing_option_is_skipped(tmp_path):
    wrapped = json.loads(MEDMCQA_VAL.read_text())
    opc_nan = next(e for e in wrapped if e["data"]["opc"] == "nan")
    opd_nan = next(e for e in wrapped if e["data"]["opd"] == "nan")
    rows = [
        {"id": "w1", "data": {**opc_nan["data"], "id": "a", "cop": "3"}},  # opd, now the third option
        {"id": "w2", "data": {**opc_nan["data"], "id": "b", "cop": "2"}},  # the missing opc
        {"id": "w3", "data": {**opd_nan["data"], "id": "c", "cop": "3"}},  # the missing opd
        {"id": "w4", "data": {**opd_nan["data"], "id": "d", "cop": "nan"}},
        {"id": "w5", "data": {**opd_nan["data"], "id": "e", "cop": "7"}},
        {"id": "w6", "data": {**opd_nan["data"], "id": "f", "question": "nan"}},
    ]
    (tmp_path / "medmcqa_dev.json").write_text(json.dumps(rows, indent=4))
    for clean_text, answer_idx in ((False, 3), (True, 2)):  # "nan" kept as the harness lists it, or dropped
        _, records, report = convert(tmp_path / "medmcqa_dev.json", tmp_path / f"out-{clean_text}", clean_text=clean_text)
        assert [(r["id"], r["answer_idx"], r["answer_text"]) for r in records] == [("medmcqa:a", answer_idx, opc_nan["data"]["opd"])]
        assert report["skipped"] == {MISSING_OPTION: 2, NO_ANSWER: 1, NOT_AMONG_OPTIONS: 1, EMPTY_QUESTION: 1}
        assert [e["row"] for e in report["skip_examples"][MISSING_OPTION]] == ["index 1", "index 2"]


def test_medmcqa_cop_base_override_and_conflicting_evidence(tmp_path):
    _, records, report = convert(MEDMCQA_NATIVE / "dev.json", tmp_path / "a", medmcqa_cop_base=0)
    assert records == [] and report["skipped"] == {NOT_AMONG_OPTIONS: 1}  # cop 4 read 0-based
    assert report["files"][0]["cop_base_from"] == "QAConfig.medmcqa_cop_base"

    native = lines(MEDMCQA_NATIVE / "dev.json")[0]
    mixed = write_jsonl(tmp_path / "mixed_dev.jsonl", [native, {**native, "id": "x", "cop": 0}])
    with pytest.raises(QAFormatError) as e:
        convert_qa(QAConfig(source=str(mixed)), tmp_path / "b")
    assert str(e.value).startswith(f"{mixed}, line 1: cop 4 here, but cop 0 or -1 at line 2")
    assert not (tmp_path / "b" / RECORDS_FILE).exists()


def _medmcqa_hub_row(d: dict) -> dict:
    """A CSV-derived row as the openlifescienceai/medmcqa hub copy has it (cop int 0-3, nulls)."""
    missing = lambda v: None if v == "nan" else v  # noqa: E731
    row = {"id": d["id"], "question": d["question"], **{o: missing(d[o]) for o in ("opa", "opb", "opc", "opd")}}
    return {**row, "cop": int(d["cop"]), "choice_type": d["choice_type"], "exp": "" if d["exp"] == "nan" else d["exp"],
            "subject_name": d["subject_name"], "topic_name": missing(d["topic_name"])}


def test_medmcqa_hugging_face_copies_give_the_original_records(tmp_path):
    """Compared cleaned: the hub copy has null where the CSV-derived file has "nan"."""
    raw = [e["data"] for e in json.loads(MEDMCQA_VAL.read_text())]
    _, original, _ = convert(MEDMCQA_VAL, tmp_path / "orig", clean_text=True)
    validation = datasets.Dataset.from_list([_medmcqa_hub_row(d) for d in raw])
    test = datasets.Dataset.from_list([{**_medmcqa_hub_row(raw[0]), "id": "unlabelled", "cop": -1}])
    datasets.DatasetDict({"validation": validation, "test": test}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    validation.to_parquet(str(tmp_path / "pq" / "validation-00000-of-00001.parquet"))

    for source in (tmp_path / "saved", tmp_path / "pq"):
        summary, records, report = convert(source, tmp_path / f"out-{source.name}", clean_text=True)
        assert without_format(records) == without_format(original)
        assert {f["cop_base"] for f in report["files"]} == {0}
    assert report["files"][0]["container"] == "parquet"
    summary, _, report = convert(tmp_path / "saved", tmp_path / "out-saved2")
    assert report["skipped"] == {NO_ANSWER: 1} and summary["encodings"] == ["hf-save-to-disk/medmcqa-hf"]
    # Without a cop 0 in the file, only the container says 0-based (as JSON lines it would be 1-based).
    no_zero = validation.filter(lambda row: row["cop"] != 0)
    no_zero.to_parquet(str(tmp_path / "dev.parquet"))
    _, records, report = convert(tmp_path / "dev.parquet", tmp_path / "out-no-zero", clean_text=True)
    assert report["files"][0]["cop_base_from"] == "a Hugging Face dataset: 0-based"
    kept = {r["id"] for r in records}
    assert without_format(records) == [r for r in without_format(original) if r["id"] in kept] and len(kept) == len(no_zero)


# -- MedQA ---------------------------------------------------------------------------------------


def test_medqa_4_and_5_options_agree_on_the_answer(tmp_path):
    _, four, r4 = convert(MEDQA_4, tmp_path / "4")
    _, five, r5 = convert(MEDQA_5, tmp_path / "5")
    raw4 = lines(MEDQA_4)
    assert len(four) == len(five) == len(raw4) == 45
    assert {r["split"] for r in four + five} == {"test"}
    for a, b, raw in zip(four, five, raw4):
        assert a["question"] == b["question"] == raw["question"]
        assert a["answer_text"] == b["answer_text"] == raw["answer"]
        assert a["answer_idx"] == ord(raw["answer_idx"]) - ord("A")
        assert len(a["options"]) == 4 and len(b["options"]) == 5 and a["id"] != b["id"]
    assert any("\n" in r["question"] for r in four) and any(r["question"].endswith('"') for r in four)
    assert json.loads(four[40]["meta"]) == {"format": "jsonl/medqa-options-dict", "meta_info": "stfep2&3", "n_options": 4}  # line 50
    assert json.loads(five[40]["meta"])["meta_info"] == "step2&3"


def test_medqa_skip_reasons_are_counted_with_examples(tmp_path):
    raw = lines(MEDQA_4)[:8]
    other = next(k for k in "ABCD" if k != raw[0]["answer_idx"])
    rows = [
        raw[0],
        {**raw[1], "answer_idx": next(k for k in "ABCD" if k != raw[1]["answer_idx"])},  # line 2: disagree
        {**raw[2], "answer": "Something else"},  # line 3: text not among options
        {**raw[3], "answer_idx": "E"},  # line 4: letter not among options
        {k: v for k, v in raw[4].items() if k not in ("answer", "answer_idx")},  # line 5: no answer
        {**raw[5], "question": "  \n"},  # line 6: empty question
        raw[0],  # line 7: duplicate
        {k: v for k, v in raw[6].items() if k != "answer_idx"},  # from the text alone
        {k: v for k, v in raw[7].items() if k != "answer"},  # from the letter alone
        {**raw[0], "answer_idx": other},  # line 10: disagree
        {**raw[0], "answer": raw[0]["options"][other]},  # line 11: disagree
    ]
    summary, records, report = convert(write_jsonl(tmp_path / "medqa_test.jsonl", rows), tmp_path / "out")
    assert report["skipped"] == {DISAGREE: 3, NOT_AMONG_OPTIONS: 2, NO_ANSWER: 1, EMPTY_QUESTION: 1, DUPLICATE_ID: 1}
    assert set(report["skip_examples"]) <= set(SKIP_REASONS)
    assert summary["skipped"] == 8 and summary["rows_read"] == 11
    assert [e["row"] for e in report["skip_examples"][DISAGREE]] == ["line 2", "line 10", "line 11"]
    assert report["skip_examples"][DUPLICATE_ID][0]["excerpt"] == raw[0]["question"][:100]
    assert [r["answer_text"] for r in records] == [raw[0]["answer"], raw[6]["answer"], raw[7]["answer"]]


def test_medqa_option_layouts_give_the_same_records(tmp_path):
    raw = lines(MEDQA_5)
    as_list = [{**r, "options": list(r["options"].values())} for r in raw]
    bigbio = [{**r, "options": [{"key": k, "value": v} for k, v in reversed(r["options"].items())]} for r in raw]
    _, original, _ = convert(MEDQA_5, tmp_path / "dict")
    _, from_list, _ = convert(write_jsonl(tmp_path / "list_test.jsonl", as_list), tmp_path / "list")
    _, from_bigbio, report = convert(write_jsonl(tmp_path / "bigbio_test.jsonl", bigbio), tmp_path / "bigbio")
    assert without_format(from_list) == without_format(from_bigbio) == without_format(original)
    assert report["summary"]["encodings"] == ["jsonl/medqa-bigbio-source"]


def test_medqa_hugging_face_copies_give_the_original_records(tmp_path):
    """GBaker/MedQA-USMLE-4-options-hf: sent1, sent2, ending0..3, label."""
    raw = lines(MEDQA_4)
    swag = [
        {"id": f"test-{i:05d}", "sent1": r["question"], "sent2": "",
         **{f"ending{k}": r["options"][letter] for k, letter in enumerate("ABCD")}, "label": "ABCD".index(r["answer_idx"])}
        for i, r in enumerate(raw)
    ]
    ds = datasets.Dataset.from_list(swag)
    ds.save_to_disk(str(tmp_path / "test"))
    ds.to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    _, original, _ = convert(MEDQA_4, tmp_path / "orig")
    expected = [{**r, "meta": {"meta_info": None, "n_options": 4}} for r in without_format(original)]
    for source in (tmp_path / "test", tmp_path / "test-00000-of-00001.parquet"):
        _, records, report = convert(source, tmp_path / f"out-{source.suffix}")
        assert without_format(records) == expected
    assert report["summary"]["encodings"] == ["parquet/medqa-hf-swag"]


def test_split_comes_from_the_name_or_the_config(tmp_path):
    shutil.copy(MEDQA_5, tmp_path / "usmle.jsonl")
    with pytest.raises(QAFormatError, match="usmle.jsonl: cannot tell the split from the name"):
        convert_qa(QAConfig(source=str(tmp_path / "usmle.jsonl")), tmp_path / "a")
    summary, _, _ = convert(tmp_path / "usmle.jsonl", tmp_path / "b", split="dev", source_name="medqa5")
    assert summary["records"] == {"train": 0, "validation": 45, "test": 0}
    assert read_records(tmp_path / "b")[0]["id"].startswith("medqa5:")


# -- instruction data ----------------------------------------------------------------------------


def test_instruction_data_alpaca_and_dialogue_aliases(tmp_path):
    alpaca = json.loads((INSTRUCTIONS / "chatdoctor5k_head.json").read_text())
    summary, records, _ = convert(INSTRUCTIONS, tmp_path / "a")
    assert summary["records"] == {"train": 8, "validation": 0, "test": 0}
    head = records[:5]
    assert [(r["question"], r["context"], r["answer_text"]) for r in head] == [
        (a["instruction"], [a["input"]], a["output"]) for a in alpaca
    ]
    assert all(r["options"] == [] and r["answer_idx"] is None and r["explanation"] is None for r in records)
    dialogue = {r["id"]: r for r in records[5:]}
    assert dialogue["instructions:chatdoctor5k-6"]["question"].startswith("Doctor, I've been having discomfort")
    by_fields = {tuple(json.loads(r["meta"])["fields"]): r for r in records[5:]}
    assert set(by_fields) == {("Patient", "Doctor"), ("question", "answer"), ("input", "output")}
    assert by_fields[("input", "output")]["context"] == []  # without "instruction", input is the question
    # The same items as JSON lines: the same records, ids stable across runs and layouts.
    write_jsonl(tmp_path / "head.jsonl", alpaca)
    _, again, _ = convert(tmp_path / "head.jsonl", tmp_path / "b")
    assert [r["id"] for r in again] == [r["id"] for r in head] and len({r["id"] for r in head}) == 5
    _, renamed, _ = convert(tmp_path / "head.jsonl", tmp_path / "c", source_name="chatdoctor")
    assert renamed[0]["id"] == "chatdoctor:" + head[0]["id"].split(":")[1] and renamed[0]["source"] == "chatdoctor"


def test_instruction_rows_without_answer_or_question_are_skipped(tmp_path):
    alpaca = json.loads((INSTRUCTIONS / "chatdoctor5k_head.json").read_text())
    rows = [alpaca[0], {**alpaca[1], "output": " "}, {**alpaca[2], "instruction": ""}, alpaca[0]]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    _, records, report = convert(tmp_path / "data.json", tmp_path / "out")
    assert len(records) == 1 and report["skipped"] == {NO_ANSWER: 1, EMPTY_QUESTION: 1, DUPLICATE_ID: 1}


# -- errors, output files, reader ----------------------------------------------------------------


def test_malformed_file_raises_naming_file_row_and_field(tmp_path):
    raw = lines(MEDQA_4)[:4]
    bad = write_jsonl(tmp_path / "x_test.jsonl", [raw[0], raw[1], {k: v for k, v in raw[2].items() if k != "question"}, raw[3]])
    out = tmp_path / "out"
    with pytest.raises(QAFormatError) as e:
        convert_qa(QAConfig(source=str(bad)), out)
    assert str(e.value).startswith(f"{bad}, line 3: no field 'question' or 'sent1' (fields: answer, answer_idx, meta_info")
    assert str(e.value).endswith("expected MedQA records: question, options (or option_A, option_B, ...), answer_idx and/or answer (or the hub's sent1, ending0.., label) (the file was read as medqa)")
    assert (e.value.path, e.value.row) == (str(bad), "line 3")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing that looks complete is left


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a_test.jsonl", b'{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n{"question": \n', "line 2: not valid JSON"),
        ("b_test.json", b'[{"question": "q", "options": ["x"], "answer_idx": "A"}, 3]', "index 1: the record is a JSON number, not an object"),
        ("c_test.jsonl", b'{"title": "q", "body": "x"}\n', "line 1: no field 'question' or 'QUESTION' or 'sent1' or 'instruction' or 'Patient' or 'input' (fields: body, title); expected PubMedQA, MedMCQA, MedQA or instruction data records"),
        ("d.json", b'{"123": {"QUESTION": "q", "CONTEXTS": "not a list", "final_decision": "yes"}}', "key 123: field 'CONTEXTS' is not a list of text"),
        ("e_test.jsonl", b'{"question": "q", "options": {"A": "x"}, "answer_idx": 0}\n', "line 1: field 'answer_idx' is a JSON number; expected text"),
        ("f_test.jsonl", b"", "no records"),
        ("g_test.jsonl", b"\x1f\x8b\x08\x00\xff\xfe", "line 1: not UTF-8 text (byte 2 of the line)"),
        ("k_test.jsonl", b'{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n' * 3000 + b'{"question": "\xe9"}\n', "line 3001: not UTF-8 text"),
        ("h_test.json", b'"just a string"', "the file is one JSON string that is not a list of records"),
        ("j_test.jsonl", b'{"question": "q", "options": {"1": "x", "2": "y"}, "answer_idx": "1"}\n', "line 1: an option key that is not one capital letter; expected option letters A, B, C"),
        ("i_dev.jsonl", b'{"question": "q", "opa": "x", "opb": "y", "opc": "z", "opd": "w", "cop": 1}\n', "line 1: no field 'id'"),
    ],
)
def test_files_in_no_accepted_format_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(QAFormatError) as e:
        convert_qa(QAConfig(source=str(path)), tmp_path / "out")
    assert str(e.value).startswith(f"{path}") and message in str(e.value)


def test_records_parquet_and_jsonl_hold_the_same_rows(tmp_path):
    convert_qa(QAConfig(source=str(PUBMEDQA)), tmp_path)
    records = read_records(tmp_path / RECORDS_FILE)
    assert pq.read_schema(tmp_path / RECORDS_FILE).equals(QA_SCHEMA)
    assert records == lines(tmp_path / RECORDS_JSONL)
    assert "\\u" not in (tmp_path / RECORDS_JSONL).read_text(encoding="utf-8")  # ensure_ascii=False
    assert any(not c.isascii() for r in records for c in "".join(r["context"]))
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a QA records file"):
        read_records(tmp_path / "other.parquet")


def test_hub_dataset_is_loaded_with_datasets_load_dataset(tmp_path, monkeypatch):
    """The wiring only: load_dataset is replaced by a local PubMedQA copy in the hub's layout."""
    raw = json.loads((PUBMEDQA / "ori_pqal.json").read_text())
    hub_rows = [
        {"pubid": int(pmid), "question": it["QUESTION"],
         "context": {"contexts": it["CONTEXTS"], "labels": it["LABELS"], "meshes": it["MESHES"]},
         "long_answer": it["LONG_ANSWER"], "final_decision": it["final_decision"]}
        for pmid, it in raw.items()
    ]
    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(hub_rows)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    truth = str(PUBMEDQA / "test_ground_truth.json")
    summary, records, report = convert(None, tmp_path / "hub", hub_dataset="qiaojin/PubMedQA", hub_config="pqa_labeled", pubmedqa_ground_truth=truth)
    assert calls == [("qiaojin/PubMedQA", "pqa_labeled")] and report["source"] == "hf://qiaojin/PubMedQA"
    _, original, _ = convert(PUBMEDQA, tmp_path / "orig")
    expected = without_format(original)
    for r in expected:  # what the hub copy does not carry
        r["meta"].update(year=None, reasoning_required_pred=None, reasoning_free_pred=None)
    assert without_format(records) == expected
    assert summary["encodings"] == ["hf-hub/pubmedqa-hf"]
    with pytest.raises(ValueError, match="not both or neither"):
        QAConfig(source=str(PUBMEDQA), hub_dataset="qiaojin/PubMedQA")


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="format"):
        QAConfig(source=str(MEDQA_4), format="csv")
    with pytest.raises(ValueError, match="medmcqa_cop_base"):
        QAConfig(source=str(MEDQA_4), medmcqa_cop_base=2)
    with pytest.raises(ValueError, match="split"):
        QAConfig(source=str(MEDQA_4), split="holdout")


def test_the_qa_stage_is_keyed_by_the_bytes_not_the_path(tmp_path):
    from storage import Store
    from tasks.qa import QA, qa_report

    store = Store(tmp_path / "store")
    first = QA.run(store, {}, QAConfig(source=str(MEDQA_4)))
    moved = tmp_path / "elsewhere" / MEDQA_4.name
    moved.parent.mkdir()
    shutil.copyfile(MEDQA_4, moved)
    assert QA.run(store, {}, QAConfig(source=str(moved))).ref == first.ref  # same bytes, same name: same artifact
    edited = tmp_path / "edited" / MEDQA_4.name
    edited.parent.mkdir()
    edited.write_text(MEDQA_4.read_text().replace("?", "? ", 1))
    assert QA.run(store, {}, QAConfig(source=str(edited))).ref != first.ref
    assert first.summary["records"]["test"] == len(read_records(first.path)) and first.label == MEDQA_4.name
    assert {"what": "records in test", "count": first.summary["records"]["test"]} in qa_report(first)


# -- a dataset is read as what it is given as, from inside its folder ------------------------------

MULTIMEDQA = DATA / "multimedqa" / "medqa_test.json"


def test_multimedqa_option_fields_are_medqa_and_refused_as_instructions(tmp_path):
    raw = [e["data"] for e in json.loads(MULTIMEDQA.read_text())]
    summary, records, report = convert(MULTIMEDQA, tmp_path / "medqa", format="medqa")
    assert summary["records"] == {"train": 0, "validation": 0, "test": len(raw)} and summary["skipped"] == 0
    for d, r in zip(raw, records, strict=True):
        assert r["options"] == [d[f"option_{letter}"] for letter in "ABCD"]  # option_E "nan": a 4-option question
        assert r["answer_text"] == d["answer"] and "ABCD"[r["answer_idx"]] == d["answer_idx"] and r["question"] == d["question"]
    assert summary["encodings"] == ["json-array/medqa-option-fields"]
    _, detected, _ = convert(MULTIMEDQA, tmp_path / "auto")  # told from its fields (it used to become instructions)
    assert detected == records
    # The questions the original MedQA file also has are the same records, ids included.
    original = {r["id"]: r for r in convert(MEDQA_4, tmp_path / "original")[1]}
    shared = [r for r in records if r["id"] in original]
    assert len(shared) == 5
    for r in shared:
        assert {k: v for k, v in r.items() if k != "meta"} == {k: v for k, v in original[r["id"]].items() if k != "meta"}
    with pytest.raises(QAFormatError) as e:
        convert_qa(QAConfig(source=str(MULTIMEDQA), format="instructions"), tmp_path / "as-instructions")
    assert str(e.value).startswith(f"{MULTIMEDQA}, index 0: a multiple-choice record (fields: answer, answer_idx, meta_info, option_A")
    assert "give this file as PubMedQA, MedMCQA or MedQA" in str(e.value)


def test_a_file_given_as_one_dataset_is_read_as_that_dataset_or_refused(tmp_path):
    from tasks.qa import QASources

    sources = QASources(pubmedqa=str(PUBMEDQA), medmcqa=str(MEDMCQA_VAL), medqa=str(MEDQA_4), instructions=(str(INSTRUCTIONS / "dialogues.jsonl"),))
    assert {name: c.format for name, c in sources.configs().items()} == {
        "pubmedqa": "pubmedqa", "medmcqa": "medmcqa", "medqa": "medqa", "dialogues": "instructions"}
    # MedQA rows without options: as auto-detected data they would be instructions (question + answer).
    no_options = write_jsonl(tmp_path / "medqa_test.jsonl", [{k: v for k, v in r.items() if k != "options"} for r in lines(MEDQA_4)[:3]])
    assert convert(no_options, tmp_path / "auto")[0]["format"] == "instructions"
    with pytest.raises(QAFormatError) as e:
        convert_qa(QASources(medqa=str(no_options)).configs()["medqa"], tmp_path / "as-medqa")
    assert str(e.value) == (
        f"{no_options}, line 1: no field 'options' or 'option_A' (fields: answer, answer_idx, meta_info, metamap_phrases, question); "
        "expected MedQA records: question, options (or option_A, option_B, ...), answer_idx and/or answer "
        "(or the hub's sent1, ending0.., label) (the file was read as medqa)"
    )
    assert (e.value.path, e.value.row) == (str(no_options), "line 1")
    with pytest.raises(QAFormatError, match=r"index 0: no field 'options' or 'option_A' .*\(the file was read as medqa\)"):
        convert_qa(QAConfig(source=str(MEDMCQA_VAL), format="medqa"), tmp_path / "medmcqa-as-medqa")
    with pytest.raises(QAFormatError, match=r"line 1: no field 'id' .*expected MedMCQA records"):
        convert_qa(QAConfig(source=str(MEDQA_4), format="medmcqa"), tmp_path / "medqa-as-medmcqa")


def test_outer_whitespace_is_kept_as_the_harness_keeps_it_unless_clean_text(tmp_path):
    raw = lines(MEDQA_4)
    _, as_given, _ = convert(MEDQA_4, tmp_path / "as-given")
    _, clean, _ = convert(MEDQA_4, tmp_path / "clean", clean_text=True)
    padded = [i for i, r in enumerate(raw) if r["question"] != r["question"].strip() or any(o != o.strip() for o in r["options"].values())]
    assert len(padded) == 4
    for i in padded:
        assert as_given[i]["question"] == raw[i]["question"] and as_given[i]["options"] == list(raw[i]["options"].values())
        assert clean[i]["question"] == raw[i]["question"].strip() and clean[i]["options"] == [o.strip() for o in raw[i]["options"].values()]
        assert as_given[i]["id"] == clean[i]["id"] and as_given[i]["answer_idx"] == clean[i]["answer_idx"]


def _saved_medmcqa(folder: Path) -> Path:
    raw = [e["data"] for e in json.loads(MEDMCQA_VAL.read_text())][:5]
    datasets.Dataset.from_list([_medmcqa_hub_row(d) for d in raw]).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_reads_nothing_outside_its_folder_and_its_key_covers_what_it_reads(tmp_path, monkeypatch):
    from tasks.qa import QA

    saved = _saved_medmcqa(tmp_path / "medmcqa_dev")
    [data_file] = json.loads((saved / "state.json").read_text())["_data_files"]
    # state.json naming a file outside the folder (datasets would open it): refused, naming the entry.
    state = json.loads((saved / "state.json").read_text())
    (saved / data_file["filename"]).rename(tmp_path / "outside.arrow")
    state["_data_files"][0]["filename"] = "../outside.arrow"
    (saved / "state.json").write_text(json.dumps(state))
    with pytest.raises(QAFormatError) as e:
        convert_qa(QAConfig(source=str(saved)), tmp_path / "out")
    assert str(e.value).startswith(f"{saved / 'state.json'}, _data_files[0]: not a plain name of something in this folder")
    assert "outside.arrow" not in str(e.value)  # what the file says is never quoted

    # A data file that is a link: keyed by what it points at, and refused outside the data roots.
    linked = _saved_medmcqa(tmp_path / "linked" / "medmcqa_dev")
    target = tmp_path / "elsewhere" / "data.arrow"
    target.parent.mkdir()
    (linked / data_file["filename"]).rename(target)
    (linked / data_file["filename"]).symlink_to(target)
    config = QAConfig(source=str(linked))
    key = QA.spec({}, config).key
    assert convert(linked, tmp_path / "out-linked")[0]["records"]["validation"] == 5
    other = _saved_medmcqa(tmp_path / "other")  # the same layout, other rows
    target.write_bytes(next(other.glob("*.arrow")).read_bytes().replace(b"Physiology", b"Physiologx"))
    assert QA.spec({}, config).key != key
    monkeypatch.setenv("MEDLM_DATA_ROOTS", str(tmp_path / "linked"))
    with pytest.raises(PermissionError, match=r"\.arrow \(a link leading out of them\) is outside the folders this process may read \(MEDLM_DATA_ROOTS="):
        QA.spec({}, config)
    with pytest.raises(PermissionError, match="MEDLM_DATA_ROOTS"):
        convert_qa(config, tmp_path / "out-refused")


def test_pubmedqa_ground_truth_beside_a_file_is_in_the_key(tmp_path):
    from tasks.qa import QA

    folder = tmp_path / "pubmedqa"
    shutil.copytree(PUBMEDQA, folder)
    config = QAConfig(source=str(folder / "ori_pqal.json"))
    key = QA.spec({}, config).key
    truth = json.loads((folder / "test_ground_truth.json").read_text())
    truth.popitem()
    (folder / "test_ground_truth.json").write_text(json.dumps(truth))
    assert QA.spec({}, config).key != key  # the split it decides is read, so it is keyed


@pytest.mark.usefixtures("prefect_server")
def test_the_qa_flow_lets_every_conversion_finish_and_names_each_that_failed(tmp_path, store):
    """The first source fails at once; the flow still waits for the others (on main it raised at
    the first failure, and the CLI printed a CancelledError traceback for the one still running)."""
    from flows.qa import qa
    from tasks.qa import QASources

    state = qa(qa=QASources(pubmedqa=str(MEDQA_4), medmcqa=str(MEDMCQA_VAL)), return_state=True)
    assert state.is_failed() and state.message.endswith(
        f"{MEDQA_4}, line 1: no field 'QUESTION' or 'pubid' (fields: answer, answer_idx, meta_info, metamap_phrases, options, question); "
        "expected PubMedQA records: QUESTION, CONTEXTS, final_decision (or the hub's pubid, question, context) (the file was read as pubmedqa)"), state.message
    assert [a.label for a in store.ls("qa")] == [MEDMCQA_VAL.name]  # the other conversion finished, and is kept
    state = qa(qa=QASources(pubmedqa=str(MEDQA_4), medqa=str(MEDMCQA_VAL)), return_state=True)
    assert state.is_failed() and "2 QA sources failed: pubmedqa: " in state.message and "; medqa: " in state.message


@pytest.mark.parametrize("dataset", DATASETS, ids=lambda d: d.name)
def test_every_registered_dataset_reads_its_sample_and_refuses_the_others(tmp_path, dataset):
    """A dataset is one module and one line in tasks/qa/registry.py; this asks it for a sample
    in tests/data/<name>/, detected as it and read the same when named, and for a clear refusal
    of every other dataset's sample given as it."""
    sample = DATA / dataset.name
    assert sample.is_dir(), f"add a sample of {dataset.title} as tests/data/{dataset.name}/"
    summary, records, _ = convert(sample, tmp_path / "auto")
    assert summary["format"] == dataset.name and records and summary["skipped"] == 0
    assert convert(sample, tmp_path / "named", format=dataset.name)[1] == records
    for other in DATASETS:
        if other is not dataset:
            with pytest.raises(QAFormatError) as e:
                convert(DATA / other.name, tmp_path / other.name, format=dataset.name)
            what = dataset.expected.split(":")[0]  # e.g. "MedQA records"
            assert e.value.path.startswith(str(DATA / other.name)) and e.value.row and e.value.expected.startswith(what)
