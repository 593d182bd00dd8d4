"""QA datasets (PubMedQA, MedMCQA, MedQA, instruction data) -> one canonical record format.

- ``containers.py``: a file, a folder or a Hugging Face dataset -> units of rows with positions;
- ``records.py``: the record, the skip reasons, the field helpers and ``Dataset``, what a dataset
  module declares (with its ``Prompting``, ``Benchmark``s and ``Provenance``);
- ``pubmedqa.py``, ``medmcqa.py``, ``medqa.py``, ``instructions.py``: one dataset each, whole:
  its detection, its normaliser, how it is prompted, scored, trained on and licensed;
- ``registry.py``: the datasets, in detection order, and every list of them the rest derives;
- ``stage.py``: ``QAConfig``, ``QASources``, ``convert_qa`` and the ``QA`` stage.
"""

from storage.formats import RECORDS_FILE, RECORDS_JSONL
from tasks.qa.errors import QAFormatError
from tasks.qa.pubmedqa import GROUND_TRUTH_FILE, PUBMEDQA_OPTIONS
from tasks.qa.records import (
    DISAGREE,
    DUPLICATE_ID,
    EMPTY_QUESTION,
    GROUND_TRUTH_DISAGREES,
    MISSING_OPTION,
    NO_ANSWER,
    NO_ID,
    NOT_AMONG_OPTIONS,
    QA_SCHEMA,
    SKIP_REASONS,
)
from tasks.qa.registry import FORMATS
from tasks.qa.stage import CLEAN_TEXT, QA, REPORT_FILE, QAConfig, QASources, convert_qa, qa_report

__all__ = [
    "CLEAN_TEXT", "DISAGREE", "DUPLICATE_ID", "EMPTY_QUESTION", "FORMATS", "GROUND_TRUTH_DISAGREES", "GROUND_TRUTH_FILE",
    "MISSING_OPTION", "NO_ANSWER", "NO_ID", "NOT_AMONG_OPTIONS", "PUBMEDQA_OPTIONS", "QA", "QA_SCHEMA", "RECORDS_FILE",
    "RECORDS_JSONL", "REPORT_FILE", "SKIP_REASONS", "QAConfig", "QAFormatError", "QASources", "convert_qa", "qa_report",
]
