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
class Prompting:
    """How a dataset's records are prompted (model/prompts.py reads it)."""

    context_label: str = "Context: "  # before the context's lines
    options_heading: str | None = None  # a line before the lettered options (MedMCQA's "Choices:")
    answer_words: bool = False  # the options are the answers themselves (yes/no/maybe): never listed, no letters, cloze only
    long_answers: str | None = None  # its explanation is the reference of a generated answer, in the free-text set of this name


PLAIN = Prompting()  # the prompt of a record of no registered dataset (instruction data, a renamed source)


@dataclass(frozen=True)
class Benchmark:
    """A multiple-choice benchmark of a dataset: which of its records are scored, how, and the Hub
    dataset lm-evaluation-harness's task reads (the card's model-index names it)."""

    name: str  # EvaluationConfig.benchmarks, the result's name
    source: str  # the records' source (the dataset's name)
    split: str  # the split that is scored
    n_options: int | None  # records with this many options only (None: any)
    styles: tuple[str, ...]  # model/prompts.py STYLES; "cloze" only where the options are the answer words
    baseline: str  # "constant" (the best constant answer) or "majority"
    hub: str
    hub_title: str


@dataclass(frozen=True)
class Provenance:
    """Where a dataset comes from, as the model card names it: the Hub id (the YAML's datasets),
    its licence or terms, a citation, and where its questions come from (for the limitations)."""

    name: str
    hub: str | None
    terms: str
    cite: str
    scope: str = ""


@dataclass(frozen=True)
class Dataset:
    """One dataset, whole: a module declares it (``DATASET``), tasks/qa/registry.py lists the
    module, and every list of datasets (the qa sources, the curriculum's names, the benchmarks,
    the card's Hub ids and licences) is derived from that registry."""

    name: str  # QAConfig.format, the records' default source and id prefix, QASources' field
    title: str  # in messages
    expected: str  # what a file given as this dataset must hold, for errors
    detect: Callable[[dict], bool]  # whether a file whose first record is this one is this dataset
    normaliser: Callable[[Unit, QAConfig, dict], Normaliser]  # (unit, config, the file's report) -> Normaliser
    question_fields: tuple[str, ...]  # where a row's question is, for the report's examples
    data_help: str  # QASources' description of the field that names its data
    marks: tuple[str, ...] = ()  # fields only its records have: a record with one is never instruction data
    side_files: tuple[str, ...] = ()  # files beside the data that are not records (PubMedQA's test_ground_truth.json)
    many: bool = False  # QASources takes several files, each converted on its own (named by its stem)
    prompting: Prompting = PLAIN  # how its records are prompted (model/prompts.py)
    benchmarks: tuple[Benchmark, ...] = ()  # what the evaluation scores of it
    trains: bool = True  # a curriculum may fine-tune on its train split
    preference: bool = False  # its train questions can become DPO pairs (gold answer over a distractor)
    provenance: Provenance | None = None  # None: the card says its terms are not known to medlm
    pmid: Callable[[dict], int] | None = None  # the PubMed article a record is about: its abstract is evaluation data

    def __post_init__(self):
        if wrong := [b.name for b in self.benchmarks if b.source != self.name]:
            raise ValueError(f"dataset {self.name}: benchmark {wrong[0]} scores source records other than its own; set its source to {self.name!r}")


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
