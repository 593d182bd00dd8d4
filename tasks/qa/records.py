"""The canonical record, why a row is skipped, and what a dataset module declares (``Dataset``).

Record (``QA_SCHEMA``): ``id`` ("{source}:{native id}", unique in the output), ``source``,
``split`` (train | validation | test), ``question`` (outer whitespace stripped, nothing else
changed), ``context`` (list of str), ``options`` (list of str, A, B, C, ...), ``answer_idx``
(index into ``options``; null when there are none), ``answer_text``, ``explanation`` (str or
null; never part of question or context) and ``meta`` (a JSON object as a string; its
``"format"`` is the detected encoding, "{container}/{format}-{encoding}").

A row with a structure problem raises ``QAFormatError``; a row with a content problem raises
``Skip`` with one of ``SKIP_REASONS``, and the conversion counts it and goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from storage.formats import qa_schema
from tasks.qa.containers import SPLIT_WORDS, Pos, Unit
from tasks.qa.errors import QAFormatError, json_type

if TYPE_CHECKING:
    from tasks.qa.stage import QAConfig

QA_SCHEMA = qa_schema()

# Why a row is skipped (the report's keys).
NO_ANSWER = "no answer"
NOT_AMONG_OPTIONS = "answer not among options"
DISAGREE = "answer letter and text disagree"
MISSING_OPTION = "answer is a missing option"
GROUND_TRUTH_DISAGREES = "final_decision disagrees with test_ground_truth"
EMPTY_QUESTION = "empty question"
NO_ID = "no id"
DUPLICATE_ID = "duplicate id"
SKIP_REASONS = (NO_ANSWER, NOT_AMONG_OPTIONS, DISAGREE, MISSING_OPTION, GROUND_TRUTH_DISAGREES, EMPTY_QUESTION, NO_ID, DUPLICATE_ID)


class Skip(Exception):
    """The row is skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, record_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.record_id = record_id


Normaliser = Callable[[dict, Pos], dict]  # (row, pos) -> record, or Skip, or QAFormatError


@dataclass(frozen=True)
class Dataset:
    """One dataset the qa stage reads: a module in tasks/qa/ declares it, tasks/qa/registry.py lists it."""

    name: str  # QAConfig.format, the records' default source and id prefix
    title: str  # in messages
    expected: str  # what a file given as this dataset must hold, for errors
    detect: Callable[[dict], bool]  # whether a file whose first record is this one is this dataset
    normaliser: Callable[[Unit, QAConfig, dict], Normaliser]  # (unit, config, the file's report) -> Normaliser
    question_fields: tuple[str, ...]  # where a row's question is, for the report's examples
    marks: tuple[str, ...] = ()  # fields only its records have: a record with one is never instruction data


def require(row: dict, unit: Unit, pos: Pos, *fields: str | tuple[str, ...]) -> None:
    """Each field (or one of a tuple of alternatives) is present, else ``QAFormatError``."""
    for field in fields:
        names = field if isinstance(field, tuple) else (field,)
        if not any(n in row for n in names):
            wanted = " or ".join(repr(n) for n in names)
            raise QAFormatError(unit.name, pos, f"no field {wanted} (fields: {', '.join(sorted(map(str, row)))})")


def text_field(value: Any, unit: Unit, pos: Pos, field: str, missing: tuple[str, ...] = ("",)) -> str | None:
    """A text field as the source has it; None when null, NaN or, once stripped, one of ``missing``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise QAFormatError(unit.name, pos, f"field {field!r} is a JSON {json_type(value)}", "text")
    return None if value.strip() in missing else value


def text_list(value: Any, unit: Unit, pos: Pos, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QAFormatError(unit.name, pos, f"field {field!r} is not a list of text", "a list of strings")
    return value


def digest(*parts: str) -> str:
    """An id from texts, stripped: the same with or without ``clean_text``."""
    return hashlib.sha256("\x1f".join(p.strip() for p in parts).encode("utf-8")).hexdigest()[:16]


def qualified_id(config: QAConfig, kind: str, native_id: str) -> str:
    """The record's id: "{source}:{native id}"."""
    return f"{config.source_name or kind}:{native_id}"


def record(unit: Unit, config: QAConfig, kind: str, encoding: str, *, native_id: str, split: str | None,
           question: str | None, context: list[str], options: list[str], answer_idx: int | None,
           answer_text: str | None, explanation: str | None, meta: dict, default_split: str | None = None) -> dict:
    """The canonical record, after the checks every format shares. Its split: ``config.split``,
    else ``split`` (the row's), else the unit's, else ``default_split``."""
    record_id = qualified_id(config, kind, native_id)
    if not question:
        raise Skip(EMPTY_QUESTION, record_id)
    if (options and answer_idx is None) or (not options and not answer_text):
        raise Skip(NO_ANSWER, record_id)
    if options and not 0 <= answer_idx < len(options):
        raise Skip(NOT_AMONG_OPTIONS, record_id)
    split = config.split or split or unit.split or default_split
    if split is None:
        raise QAFormatError(
            unit.name, None, "cannot tell the split from the name",
            "a word train, dev, validation, val, valid or test in the file name, or QAConfig.split",
        )
    tidy = str.strip if config.clean_text else lambda value: value
    options = [tidy(o) for o in options]
    return {
        "id": record_id,
        "source": config.source_name or kind,
        "split": SPLIT_WORDS[split],
        "question": tidy(question),
        "context": [tidy(c) for c in context],
        "options": options,
        "answer_idx": answer_idx,
        "answer_text": options[answer_idx] if options else tidy(answer_text),
        "explanation": tidy(explanation) if explanation else None,
        "meta": json.dumps({"format": f"{unit.container}/{kind}-{encoding}", **meta}, ensure_ascii=False),
    }
