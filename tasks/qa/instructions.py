"""Instruction data (JSON array or lines): Alpaca's instruction/input/output and dialogue exports.

Question from the first present of ``instruction``, ``question``, ``Patient``, ``input``; answer
from ``output``, ``answer``, ``Doctor``; with ``instruction``, a non-empty ``input`` is the
context. id: the record's ``id`` if it has one, else the hash of question, input and answer (the
answer too: medAlpaca-style data asks the same question, e.g. "When to seek urgent medical
care?", with different answers per topic). Split: the file name's, else "train".

Any record with a question and an answer fits, multiple-choice ones too: a record with a field
that marks it as another dataset's (``Dataset.marks``) is refused, so such a file given as instruction
data is an error, never training rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.qa.containers import Pos, Unit
from tasks.qa.errors import QAFormatError
from tasks.qa.records import Dataset, Normaliser, digest, record, require, text_field

if TYPE_CHECKING:
    from tasks.qa.stage import QAConfig

NAME = "instructions"
_QUESTION = ("instruction", "question", "Patient", "input")
_ANSWER = ("output", "answer", "Doctor")


def detect(row: dict) -> bool:
    return any(f in row for f in _QUESTION) and any(f in row for f in _ANSWER)


def normaliser(unit: Unit, config: QAConfig, info: dict) -> Normaliser:
    from tasks.qa.registry import DATASETS  # the registry imports this module: read when a file is converted

    marked = [d for d in DATASETS if d.marks]
    marks = [f for d in marked for f in d.marks]
    titles = [d.title for d in marked]
    give_as = f"{', '.join(titles[:-1])} or {titles[-1]}"

    def normalise(row: dict, pos: Pos) -> dict:
        if mcq := [f for f in marks if f in row]:
            raise QAFormatError(
                unit.name, pos, f"a multiple-choice record (fields: {', '.join(sorted(map(str, row)))}), not an instruction",
                f"instruction records; give this file as {give_as} (it has {mcq[0]!r})",
            )
        return _normalise(row, pos, unit, config)

    return normalise


def _normalise(row: dict, pos: Pos, unit: Unit, config: QAConfig) -> dict:
    require(row, unit, pos, _QUESTION, _ANSWER)
    q_field = next(f for f in _QUESTION if f in row)
    a_field = next(f for f in _ANSWER if f in row)
    question = text_field(row[q_field], unit, pos, q_field)
    given = text_field(row.get("input"), unit, pos, "input") if q_field == "instruction" else None
    answer = text_field(row[a_field], unit, pos, a_field)
    own_id = row.get("id")
    native_id = str(own_id).strip() if own_id is not None and str(own_id).strip() else digest(question or "", given or "", answer or "")
    encoding = "alpaca" if q_field == "instruction" else f"{q_field}-{a_field}"
    return record(
        unit, config, NAME, encoding, native_id=native_id, split=None, default_split="train", question=question,
        context=[given] if given else [], options=[], answer_idx=None, answer_text=answer,
        explanation=None, meta={"fields": [q_field, a_field]},
    )


DATASET = Dataset(
    name=NAME,
    title="instruction data",
    expected="instruction records: instruction, question, Patient or input, and output, answer or Doctor",
    detect=detect,
    normaliser=normaliser,
    question_fields=_QUESTION,
    data_help="Instruction data (Alpaca instruction/input/output, dialogue exports) for fine-tuning.",
    many=True,
)
