"""The datasets the qa stage reads, in the order a file's first record is tried against them."""

from __future__ import annotations

from typing import Any

from tasks.qa import instructions, medmcqa, medqa, pubmedqa
from tasks.qa.containers import Pos, Unit
from tasks.qa.errors import QAFormatError, json_type
from tasks.qa.records import Dataset

MULTIPLE_CHOICE = (pubmedqa.DATASET, medmcqa.DATASET, medqa.DATASET)
# Instruction data last: it takes any record with a question and an answer, multiple-choice ones too.
DATASETS = (*MULTIPLE_CHOICE, instructions.dataset(MULTIPLE_CHOICE))

FORMATS = tuple(d.name for d in DATASETS)
BY_NAME = {d.name: d for d in DATASETS}
QUESTION_FIELDS = tuple(dict.fromkeys(f for d in DATASETS for f in d.question_fields))


def detect(row: Any, unit: Unit, pos: Pos) -> Dataset:
    """The dataset of a file, from its first record's fields: the first whose ``detect`` accepts it."""
    if not isinstance(row, dict):
        raise QAFormatError(unit.name, pos, f"the first record is a JSON {json_type(row)}, not an object")
    for dataset in DATASETS:
        if dataset.detect(row):
            return dataset
    raise QAFormatError(
        unit.name, pos, f"no field 'question' or 'sent1' or 'QUESTION' or 'opa' or 'instruction' "
        f"(fields: {', '.join(sorted(map(str, row)))})",
    )
