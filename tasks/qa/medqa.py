"""MedQA (``question`` + ``options``; or the hub's ``sent1`` + ``ending0``... + ``label``).

``options`` a dict keyed by letter, a list of str, or a list of ``{"key", "value"}`` (bigbio
"source" schema), or MultiMedQA's ``option_A``, ``option_B``, ...; gold from ``answer_idx``
(letter) and/or ``answer`` (text), which must agree. MedQA has no id: it is the first 16 hex
digits of the SHA-256 of the question and the options (joined by U+001F), so it survives
subsetting and reordering, and the 4- and 5-option variants of a question get different ids.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING

from tasks.qa.containers import Pos, Unit
from tasks.qa.errors import QAFormatError, json_type
from tasks.qa.records import (
    DISAGREE,
    NOT_AMONG_OPTIONS,
    Benchmark,
    Dataset,
    Normaliser,
    Provenance,
    Skip,
    digest,
    qualified_id,
    record,
    require,
    text_field,
)

if TYPE_CHECKING:
    from tasks.qa.stage import QAConfig

NAME = "medqa"


def detect(row: dict) -> bool:
    return "question" in row and ("options" in row or "option_A" in row) or "sent1" in row and "ending0" in row


def normaliser(unit: Unit, config: QAConfig, info: dict) -> Normaliser:
    def normalise(row: dict, pos: Pos) -> dict:
        require(row, unit, pos, ("question", "sent1"))
        swag = "question" not in row
        if swag:  # the hub's GBaker/MedQA-USMLE-4-options-hf, read as the original layout
            row = _swag_as_original(row, unit, pos)
        require(row, unit, pos, ("options", "option_A"))
        question = text_field(row["question"], unit, pos, "question")
        encoding, letters, options = _options(row, unit, pos)
        native_id = digest(question or "", *options)
        answer_idx = _answer(
            text_field(row.get("answer_idx"), unit, pos, "answer_idx"), text_field(row.get("answer"), unit, pos, "answer"),
            letters, options, qualified_id(config, NAME, native_id),
        )
        meta = {"meta_info": row.get("meta_info"), "n_options": len(options)}
        return record(
            unit, config, NAME, "hf-swag" if swag else encoding, native_id=native_id, split=None,
            question=question, context=[], options=options, answer_idx=answer_idx, answer_text=None,
            explanation=None, meta=meta,
        )

    return normalise


def _swag_as_original(row: dict, unit: Unit, pos: Pos) -> dict:
    """``sent1``, ``ending0``..., ``label`` (int, -1 unlabelled) -> ``question``, ``options``, ``answer_idx`` letter."""
    require(row, unit, pos, "ending0", "label")
    label = row["label"]
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise QAFormatError(unit.name, pos, f"field 'label' is a JSON {json_type(label)}", "an integer index into ending0, ending1, ...")
    letter = None if label is None or label == -1 else string.ascii_uppercase[label] if 0 <= label < 26 else "?"
    endings = [row[f"ending{k}"] for k in range(len(row)) if f"ending{k}" in row]
    return {"question": row["sent1"], "options": endings, "answer_idx": letter}


def _options(row: dict, unit: Unit, pos: Pos) -> tuple[str, list[str], list[str]]:
    """(encoding, letters, option texts) ordered by letter, from ``options`` or, in MultiMedQA's
    CSV-derived array, ``option_A``, ``option_B``, ... (where "nan" is an option the question
    does not have: every 4-option question there has option_E "nan")."""
    if "options" not in row:
        pairs = [(field[-1], value) for field, value in row.items() if re.fullmatch(r"option_[A-Z]", field)]
        pairs = [(letter, value) for letter, value in pairs if text_field(value, unit, pos, f"option_{letter}", missing=("", "nan")) is not None]
        return "option-fields", [k for k, _ in pairs], [v for _, v in pairs]
    value = row["options"]
    if isinstance(value, dict):
        encoding, pairs = "options-dict", list(value.items())
    elif isinstance(value, list) and all(isinstance(v, dict) and {"key", "value"} <= set(v) for v in value):
        encoding, pairs = "bigbio-source", [(v["key"], v["value"]) for v in value]
    elif isinstance(value, list):
        encoding, pairs = "options-list", list(zip(string.ascii_uppercase, value))
    else:
        raise QAFormatError(unit.name, pos, f"field 'options' is a JSON {json_type(value)}", "a dict letter -> text, a list of text or of {key, value}")
    pairs.sort(key=lambda kv: str(kv[0]))
    for key, _ in pairs:
        if not (isinstance(key, str) and len(key) == 1 and key in string.ascii_uppercase):
            raise QAFormatError(unit.name, pos, "an option key that is not one capital letter", "option letters A, B, C, ...")
    return encoding, [k for k, _ in pairs], [text_field(v, unit, pos, f"options.{k}") or "" for k, v in pairs]


def _answer(letter: str | None, answer: str | None, letters: list[str], options: list[str], record_id: str) -> int | None:
    """The gold index from the letter and/or the text (None: neither is given); texts compare stripped."""
    letter = None if letter is None else letter.strip()
    texts = [o.strip() for o in options]
    answer = None if answer is None else answer.strip()
    if letter is not None and letter not in letters or answer is not None and answer not in texts:
        raise Skip(NOT_AMONG_OPTIONS, record_id)
    if letter is None:
        return None if answer is None else texts.index(answer)
    if answer is not None and texts[letters.index(letter)] != answer:
        raise Skip(DISAGREE, record_id)
    return letters.index(letter)


DATASET = Dataset(
    name=NAME,
    title="MedQA",
    expected="MedQA records: question, options (or option_A, option_B, ...), answer_idx and/or answer (or the hub's sent1, ending0.., label)",
    detect=detect,
    normaliser=normaliser,
    question_fields=("question", "sent1"),
    data_help="MedQA (USMLE): JSON lines with 4 or 5 options, a folder of them, MultiMedQA's option_A..E array, or a Hugging Face copy.",
    marks=("options", "ending0", "option_A"),
    benchmarks=(
        Benchmark("medqa_4options", NAME, "test", 4, ("letters", "cloze"), "constant", "GBaker/MedQA-USMLE-4-options-hf", "MedQA (USMLE, 4 options)"),
        Benchmark("medqa_5options", NAME, "test", 5, ("letters", "cloze"), "constant", "bigbio/med_qa", "MedQA (USMLE, 5 options)"),
    ),
    preference=True,
    provenance=Provenance(
        "MedQA (USMLE)", "GBaker/MedQA-USMLE-4-options-hf", "MIT (https://github.com/jind11/MedQA, LICENSE)",
        "Jin, Pan, Oufattole, Weng, Fang and Szolovits. What Disease does this Patient Have? A Large-scale Open Domain Question Answering Dataset from Medical Exams. arXiv:2009.13081",
        "US medical licensing exams (USMLE), so US practice",
    ),
)
