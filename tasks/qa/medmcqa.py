"""MedMCQA (``opa``): native JSON lines (``cop`` 1-4, test rows without ``cop``), Hugging Face
copies (``cop`` 0-3, -1 unlabelled), the CSV-derived array of ``{"id", "data": {...}}`` (``cop``
"0"-"3", missing values "nan").

null, "" and "nan" count as missing; a missing option is dropped and ``answer_idx`` re-indexed.
The first option's ``cop`` (the base) is decided per file (``_cop_base``), or by
``config.medmcqa_cop_base``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from tasks.qa.containers import HF_CONTAINERS, Pos, Unit, unwrap
from tasks.qa.errors import QAFormatError
from tasks.qa.records import (
    MISSING_OPTION,
    NO_ID,
    NOT_AMONG_OPTIONS,
    Benchmark,
    Dataset,
    Normaliser,
    Prompting,
    Provenance,
    Skip,
    qualified_id,
    record,
    require,
    text_field,
)

if TYPE_CHECKING:
    from tasks.qa.stage import QAConfig

NAME = "medmcqa"
_OPTIONS = ("opa", "opb", "opc", "opd")


def detect(row: dict) -> bool:
    return "opa" in row


def normaliser(unit: Unit, config: QAConfig, info: dict) -> Normaliser:
    base, evidence, csv = _cop_base(unit, config)
    encoding = "csv-derived" if csv else "native" if base == 1 else "hf"
    info.update(encoding=encoding, cop_base=base, cop_base_from=evidence)

    def text(row: dict, pos: Pos, field: str) -> str | None:
        return text_field(row.get(field), unit, pos, field, missing=("", "nan"))

    def normalise(row: dict, pos: Pos) -> dict:
        require(row, unit, pos, "id", "question", *_OPTIONS)
        native_id = text(row, pos, "id")
        if native_id is None:
            raise Skip(NO_ID)
        record_id = qualified_id(config, NAME, native_id)
        cop = _cop(row.get("cop"))
        gold = None if cop is None else cop - base
        if gold is not None and not 0 <= gold < len(_OPTIONS):
            raise Skip(NOT_AMONG_OPTIONS, record_id)
        options, answer_idx = [], None
        for k, field in enumerate(_OPTIONS):
            if k == gold and text(row, pos, field) is None:
                raise Skip(MISSING_OPTION, record_id)
            # The harness lists every option it is given ("D. nan" where the CSV export left one
            # empty): dropped only with clean_text, or when null.
            option = text(row, pos, field) if config.clean_text else text_field(row.get(field), unit, pos, field, missing=())
            if option is None:
                continue
            if k == gold:
                answer_idx = len(options)
            options.append(option)
        meta = {field: text(row, pos, field) for field in ("subject_name", "topic_name", "choice_type")}
        return record(
            unit, config, NAME, encoding, native_id=native_id, split=None,
            question=text(row, pos, "question"), context=[], options=options, answer_idx=answer_idx,
            answer_text=None, explanation=text(row, pos, "exp"), meta=meta,
        )

    return normalise


def _cop(value: Any) -> int | None:
    """A ``cop`` as an int; None when unlabelled (absent, null, "", "nan", NaN, -1); -99 when unreadable."""
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in ("", "nan"):
            return None
        value = int(value) if re.fullmatch(r"-?\d+", value) else -99
    elif isinstance(value, float):
        if math.isnan(value):
            return None
        value = int(value) if value.is_integer() else -99
    elif value is None:
        return None
    elif isinstance(value, bool) or not isinstance(value, int):
        return -99
    return None if value == -1 else value


def _cop_base(unit: Unit, config: QAConfig) -> tuple[int, str, bool]:
    """The ``cop`` of the first option in this file, why, and whether it is the CSV-derived release.

    One row cannot tell 1-4 from 0-3, so the whole file decides, in this order:
    ``config.medmcqa_cop_base``; a cop 0 or -1 anywhere -> 0; a cop 4 anywhere -> 1 (both: error);
    string cops or ``{"id", "data"}`` rows (the CSV-derived release) -> 0; a Hugging Face
    container (Parquet, save_to_disk, hub) -> 0; otherwise (JSON, integer cops 1-3 or none, as
    the native release is published; its test split has no cop) -> 1.
    """
    zero = four = None
    csv = False
    for pos, row in unit.rows():
        row, wrapped = unwrap(row)
        if not isinstance(row, dict):
            continue  # the conversion pass reports it
        raw = row.get("cop")
        csv = csv or wrapped or isinstance(raw, str)
        cop = _cop(raw)
        if cop == 0 or raw in (-1, "-1"):
            zero = zero or pos
        elif cop == 4:
            four = four or pos
    if config.medmcqa_cop_base != "auto":
        return config.medmcqa_cop_base, "QAConfig.medmcqa_cop_base", csv
    if zero and four:
        raise QAFormatError(
            unit.name, four, f"cop 4 here, but cop 0 or -1 at {zero}",
            "one cop encoding per file: 1-4 (native) or 0-3 (Hugging Face, CSV-derived); or set QAConfig.medmcqa_cop_base",
        )
    if zero:
        return 0, f"cop 0 or -1 at {zero}", csv
    if four:
        return 1, f"cop 4 at {four}", csv
    if csv:
        return 0, "string cops or {id, data} rows: the CSV-derived release, 0-based", csv
    if unit.container in HF_CONTAINERS:
        return 0, "a Hugging Face dataset: 0-based", csv
    return 1, "JSON without cop 0, -1 or 4, integer cops: the native release, 1-based", csv


DATASET = Dataset(
    name=NAME,
    title="MedMCQA",
    expected="MedMCQA records: id, question, opa, opb, opc, opd, cop",
    detect=detect,
    normaliser=normaliser,
    question_fields=("question",),
    data_help="MedMCQA: JSON lines, the CSV-derived array, or a Hugging Face copy (the validation split is scored).",
    marks=("opa",),
    prompting=Prompting(options_heading="Choices:"),
    # Its test split has no labels: the validation split is scored.
    benchmarks=(Benchmark("medmcqa", NAME, "validation", None, ("letters", "cloze"), "constant", "openlifescienceai/medmcqa", "MedMCQA"),),
    preference=True,
    provenance=Provenance(
        "MedMCQA", "openlifescienceai/medmcqa", "MIT (https://github.com/medmcqa/medmcqa, LICENSE.md; the Hub copy's card says apache-2.0)",
        "Pal, Umapathi and Sankarasubbu. MedMCQA: A Large-scale Multi-Subject Multi-Choice Dataset for Medical domain Question Answering. CHIL 2022, PMLR 174:248-260",
        "Indian medical entrance exams (AIIMS, NEET PG), so Indian practice, drug names and epidemiology",
    ),
)
