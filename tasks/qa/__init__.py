"""QA stage: medical QA datasets -> one canonical record format.

``convert_qa(config, out_dir)`` reads medical QA data in any of the layouts below, writes
``records.parquet`` (``storage.formats.qa_schema()``, zstd), ``records.jsonl`` (the same rows,
UTF-8, one object a line) and ``report.json`` into ``out_dir``, and returns a small summary.
``storage.formats.read_records`` reads the Parquet back for evaluation and fine-tuning. The
artifact's key is the source's content (sha256 of its files), not its path.

Record (``QA_SCHEMA``): ``id`` ("{source}:{native id}", unique in the output), ``source``,
``split`` (train | validation | test), ``question`` (outer whitespace stripped, nothing else
changed), ``context`` (list of str), ``options`` (list of str, A, B, C, ...), ``answer_idx``
(index into ``options``; null when there are none), ``answer_text``, ``explanation`` (str or
null; never part of question or context) and ``meta`` (a JSON object as a string; its
``"format"`` is the detected encoding, "{container}/{format}-{encoding}").

Inputs. ``config.source`` is a file, a folder of files (every ``*.json``, ``*.jsonl`` and ``*.parquet``
in it, sorted, except ``test_ground_truth.json``), or a folder written by ``datasets``'
``save_to_disk`` (it holds ``dataset_dict.json`` or ``state.json``); or ``config.hub_dataset``
names a Hugging Face hub dataset (``datasets.load_dataset``; needs the network). The container
is told from the content: Parquet by its magic bytes; text whose first line is a complete JSON
object is JSON lines (streamed), unless that object's values are all objects; anything else is
one JSON document: an array of records, or an object keyed by id (PubMedQA).

Formats, told from the first record's fields (``config.format`` names one instead):

- PubMedQA (``QUESTION`` + ``CONTEXTS``, PMID as the key: ``ori_pqal.json`` / ``ori_pqaa.json``;
  or the hub's ``pubid`` + ``context`` {contexts, labels, meshes}). Options yes / no / maybe, gold
  = ``final_decision``, explanation = ``LONG_ANSWER``. Split: PMIDs in ``test_ground_truth.json``
  (``config.pubmedqa_ground_truth``, else the file beside the data) are "test", checked against
  ``final_decision``, the rest "train"; without that file (PQA-A, hub copies) everything is
  "train" or the dataset's split.
- MedMCQA (``opa``): native JSON lines (``cop`` 1-4, test rows without ``cop``), Hugging Face
  copies (``cop`` 0-3, -1 unlabelled), the CSV-derived array of ``{"id", "data": {...}}`` (``cop``
  "0"-"3", missing values "nan"). null, "" and "nan" count as missing; a missing option is
  dropped and ``answer_idx`` re-indexed. The first option's ``cop`` (the base) is decided per file
  (``_cop_base``), or by ``config.medmcqa_cop_base``.
- MedQA (``question`` + ``options``; or the hub's ``sent1`` + ``ending0``... + ``label``):
  ``options`` a dict keyed by letter, a list of str, or a list of ``{"key", "value"}`` (bigbio
  "source" schema); gold from ``answer_idx`` (letter) and/or ``answer`` (text), which must agree.
  MedQA has no id: it is the first 16 hex digits of the SHA-256 of the question and the options
  (joined by U+001F), so it survives subsetting and reordering, and the 4- and 5-option variants
  of a question get different ids.
- Instruction data (JSON array or lines): question from the first present of ``instruction``,
  ``question``, ``Patient``, ``input``; answer from ``output``, ``answer``, ``Doctor``; with
  ``instruction``, a non-empty ``input`` is the context. id: the record's ``id`` if it has one,
  else the hash of question, input and answer (the answer too: medAlpaca-style data asks the
  same question, e.g. "When to seek urgent medical care?", with different answers per topic).

Split: ``config.split``, else PubMedQA's rule above, else the dataset split / the file name
(a word train, dev, validation, val, valid or test; MedMCQA "dev" is "validation"), else
"train" for instruction data; a QA file with no split in its name is an error.

Errors. Structure problems stop the conversion with ``QAFormatError`` naming the file, the row
(line N of JSON lines, index N of an array, key K of an object, row N of a dataset), the field
and what was expected: invalid JSON or UTF-8, a row that is not an object, a missing required
field, a field of the wrong type, no records, an unknown layout. Content problems skip the row
with a reason, counted in the report with the first examples: ``SKIP_REASONS``. Nothing is left
in ``out_dir`` after an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from storage import Artifact, Stage, sha256_file
from storage.access import DataPath, readable, readable_files
from storage.formats import QA_SPLITS as SPLITS
from storage.formats import RECORDS_FILE, RECORDS_JSONL, qa_schema
from storage.config import config_dataclass

REPORT_FILE = "report.json"
GROUND_TRUTH_FILE = "test_ground_truth.json"
QA_SCHEMA = qa_schema()
FORMATS = ("pubmedqa", "medmcqa", "medqa", "instructions")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]

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

_EXPECTED = "MedQA, MedMCQA, PubMedQA or instruction records (see tasks/qa.py)"
_EXPECTED_AS = {  # what a file given as one format must hold
    "pubmedqa": "PubMedQA records: QUESTION, CONTEXTS, final_decision (or the hub's pubid, question, context)",
    "medmcqa": "MedMCQA records: id, question, opa, opb, opc, opd, cop",
    "medqa": "MedQA records: question, options (or option_A, option_B, ...), answer_idx and/or answer (or the hub's sent1, ending0.., label)",
    "instructions": "instruction records: instruction, question, Patient or input, and output, answer or Doctor",
}
_SPLIT_WORDS = {"train": "train", "dev": "validation", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
_HF_CONTAINERS = ("parquet", "hf-save-to-disk", "hf-hub")
_MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")
_INSTRUCTION_QUESTION = ("instruction", "question", "Patient", "input")
_INSTRUCTION_ANSWER = ("output", "answer", "Doctor")
_BATCH_ROWS = 1000
_MCQ_FIELDS = ("options", "opa", "ending0", "option_A", "QUESTION", "CONTEXTS")  # a multiple-choice record, not an instruction
CLEAN_TEXT = (
    "Strip outer whitespace from every text and drop MedMCQA options that are empty or 'nan'. Off: texts "
    "exactly as the source has them, which is what lm-evaluation-harness scores (its prompts keep both)."
)


@config_dataclass
class QAConfig:
    """One QA dataset to convert into the canonical record format; the defaults detect everything."""

    source: DataPath | None = Field(None, description="A file or folder: PubMedQA (ori_pqal.json + test_ground_truth.json), MedMCQA, MedQA, instruction JSON/JSONL, or a Hugging Face dataset (save_to_disk folder or Parquet).")
    hub_dataset: str | None = Field(None, description="A Hugging Face hub id read with datasets.load_dataset instead of a source (needs the network).")
    hub_config: str | None = Field(None, description="The hub dataset's configuration, e.g. pqa_labeled.")
    format: Literal["auto", "pubmedqa", "medmcqa", "medqa", "instructions"] = Field("auto", description="Which reader to use: a file that is not in that format is an error (auto: told from the first record's fields).")
    source_name: str | None = Field(None, description="The records' source name and id prefix (default: the format's name).")
    split: Literal["train", "dev", "validation", "val", "valid", "test"] | None = Field(None, description="Put every record in this split (default: the dataset's or the file name's).")
    medmcqa_cop_base: Literal["auto", 0, 1] = Field("auto", description="MedMCQA `cop` of the first option: 0, 1, or auto (decided per file).")
    pubmedqa_ground_truth: DataPath | None = Field(None, description="PubMedQA's test_ground_truth.json (default: the one beside the data).")
    clean_text: bool = Field(False, description=CLEAN_TEXT)
    skip_examples: int = Field(3, ge=0, description="Examples kept in the report per skip reason.")

    # Paths say where the bytes are; the key holds their sha256 instead (content_params).
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("source", "pubmedqa_ground_truth", "skip_examples")

    def content_params(self) -> dict:
        """What the paths hold, for the artifact key: the name and sha256 of every file the
        conversion may read (a name can decide the split, e.g. US_test.jsonl), so a moved copy is
        the same artifact and a changed file is not."""
        if not self.source:
            return {}
        listing = "".join(f"{name}:{sha256_file(path)}\n" for name, path in self.files_read())
        return {"source_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def files_read(self) -> list[tuple[str, Path]]:
        """(name, path) of every file the conversion may read, each inside the data roots: the
        source (every file of a folder, so a saved dataset's data files too: none may lie outside
        it) and PubMedQA's test_ground_truth.json, given or beside a source file. Names are
        relative to the folder the given path is in."""
        given = [Path(p) for p in (self.source, self.pubmedqa_ground_truth) if p]
        if self.source and not self.pubmedqa_ground_truth and Path(self.source).is_file():
            given += [beside] if (beside := Path(self.source).with_name(GROUND_TRUTH_FILE)).is_file() else []
        found = []
        for path in given:
            path = readable(path, "QA data")
            found += [(str(f.relative_to(path.parent)), f) for f in (readable_files(path, "QA data") if path.is_dir() else [path])]
        return found

    @model_validator(mode="after")
    def _one_source(self):
        if (self.source is None) == (self.hub_dataset is None):
            raise ValueError("give either a source path or hub_dataset, not both or neither")
        return self


@config_dataclass
class QASources:
    """Where the QA datasets are: a file or folder each, in any layout the qa stage reads (unset: not used)."""

    pubmedqa: DataPath | None = Field(None, description="PubMedQA: a folder with ori_pqal.json and test_ground_truth.json, or a Hugging Face copy.")
    medmcqa: DataPath | None = Field(None, description="MedMCQA: JSON lines, the CSV-derived array, or a Hugging Face copy (the validation split is scored).")
    medqa: DataPath | None = Field(None, description="MedQA (USMLE): JSON lines with 4 or 5 options, a folder of them, MultiMedQA's option_A..E array, or a Hugging Face copy.")
    instructions: tuple[DataPath, ...] = Field((), description="Instruction data (Alpaca instruction/input/output, dialogue exports) for fine-tuning.")
    clean_text: bool = Field(False, description=CLEAN_TEXT)

    def configs(self) -> dict[str, QAConfig]:
        """name -> the qa stage's config for each source given, read as the dataset it is given as."""
        named = {"pubmedqa": ("pubmedqa", self.pubmedqa), "medmcqa": ("medmcqa", self.medmcqa), "medqa": ("medqa", self.medqa)}
        named |= {Path(p).stem: ("instructions", p) for p in self.instructions}
        return {name: QAConfig(source=path, format=kind, clean_text=self.clean_text) for name, (kind, path) in named.items() if path}


class QAFormatError(ValueError):
    """The input is not one of the accepted formats.

    The message names the file, the row (when there is one), the problem and what was expected;
    the same facts are on ``path``, ``row`` and ``expected``.
    """

    def __init__(self, path: Path | str, row: object, problem: str, expected: str = _EXPECTED):
        self.path = str(path)
        self.row = None if row is None else str(row)
        self.problem = problem
        self.expected = expected
        where = f"{self.path}, {self.row}" if self.row is not None else self.path
        super().__init__(f"{where}: {problem}; expected {expected}")


class _Pos(NamedTuple):
    """Where a row is: ("line", 3), ("index", 0), ("key", "21645374") or ("row", 7)."""

    kind: str
    value: int | str

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"


class _Skip(Exception):
    """The row is skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, record_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.record_id = record_id


class _Unit(NamedTuple):
    """One input: a file or one split of a dataset, its rows re-readable (MedMCQA reads twice)."""

    name: str  # for messages and the report
    container: str  # jsonl | json-array | json-object | parquet | hf-save-to-disk | hf-hub
    split: str | None  # from the dataset split or the file name
    folder: Path | None  # where a test_ground_truth.json beside the data would be
    rows: Callable[[], Iterator[tuple[_Pos, Any]]]


# -- reading -------------------------------------------------------------------------------------


class _Duplicates(dict):
    """A JSON object with a repeated key: json keeps the last value, ``pairs`` keeps them all."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    return dict(pairs) if len({k for k, _ in pairs}) == len(pairs) else _Duplicates(pairs)


def _split_from_name(name: str) -> str | None:
    """The split a name says (its last word that names one), e.g. US_test -> test, medmcqa_val -> validation."""
    words = [_SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", name.lower()) if w in _SPLIT_WORDS]
    return words[-1] if words else None


def _units(source: Path | None, config: QAConfig, tmp: Path) -> list[_Unit]:
    if config.hub_dataset:
        import datasets

        loaded = datasets.load_dataset(config.hub_dataset, config.hub_config)
        return _dataset_units(loaded, f"hf://{config.hub_dataset}", "hf-hub", None)
    source = readable(source, "QA data")
    if source.is_dir():
        if (source / "dataset_dict.json").is_file() or (source / "state.json").is_file():
            return _dataset_units(_load_saved_dataset(source), str(source), "hf-save-to-disk", source)
        files = sorted(
            readable(p, "QA data") for p in source.iterdir()
            if p.is_file() and p.suffix in (".json", ".jsonl", ".parquet") and p.name != GROUND_TRUTH_FILE
        )
        if not files:
            raise QAFormatError(source, None, "the folder holds no .json, .jsonl or .parquet file")
        return [_file_unit(p, tmp) for p in files]
    return [_file_unit(source, tmp)]


def _load_saved_dataset(folder: Path):
    """``datasets.load_from_disk(folder)``, once every file its metadata names is a plain name in
    its folder: ``datasets`` opens whatever path ``state.json`` or ``dataset_dict.json`` names,
    ``../outside.arrow`` included, and the artifact's key covers only the folder's own files."""
    import datasets

    splits = [folder]
    if (listing := folder / "dataset_dict.json").is_file():
        names = _json_document(listing)
        names = names.get("splits") if isinstance(names, dict) else None
        splits = [_file_in(folder, name, listing, f"splits[{i}]") for i, name in enumerate(names if isinstance(names, list) else [None])]
    for split in splits:
        state = _json_document(split / "state.json")
        entries = state.get("_data_files") if isinstance(state, dict) else None
        for i, entry in enumerate(entries if isinstance(entries, list) else [None]):
            _file_in(split, entry.get("filename") if isinstance(entry, dict) else None, split / "state.json", f"_data_files[{i}]")
    return datasets.load_from_disk(str(folder))


def _file_in(folder: Path, name: Any, listed_in: Path, entry: str) -> Path:
    """``folder / name`` when ``name`` is a plain file or folder name, else QAFormatError."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise QAFormatError(listed_in, entry, "not a plain name of something in this folder", "names of the dataset's own files, e.g. data-00000-of-00001.arrow")
    return readable(folder / name, "QA data")


def _dataset_units(loaded, name: str, container: str, folder: Path | None) -> list[_Unit]:
    """One unit per split of a ``DatasetDict``, or one for a ``Dataset``."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return [_dataset_unit(ds, f"{name}[{key}]", container, _split_from_name(key), folder) for key, ds in loaded.items()]
    split = _split_from_name(str(loaded.split)) if loaded.split else _split_from_name(Path(name).name)
    return [_dataset_unit(loaded, name, container, split, folder)]


def _dataset_unit(ds, name: str, container: str, split: str | None, folder: Path | None) -> _Unit:
    return _Unit(name, container, split, folder, lambda: ((_Pos("row", i), row) for i, row in enumerate(ds)))


def _file_unit(path: Path, tmp: Path) -> _Unit:
    split = _split_from_name(path.stem)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp))
        return _dataset_unit(ds, str(path), "parquet", split, path.parent)
    head = _first_line(path)
    if head is _BLANK:
        raise QAFormatError(path, None, "the file is empty: no records")
    if isinstance(head, dict) and not _is_keyed(head):
        return _Unit(str(path), "jsonl", split, path.parent, lambda: _jsonl_rows(path))
    doc = _json_document(path)
    if isinstance(doc, list):
        return _Unit(str(path), "json-array", split, path.parent, lambda: ((_Pos("index", i), r) for i, r in enumerate(doc)))
    if isinstance(doc, dict) and _is_keyed(doc):
        items = doc.pairs if isinstance(doc, _Duplicates) else doc.items()
        return _Unit(str(path), "json-object", split, path.parent, lambda: ((_Pos("key", k), r) for k, r in items))
    raise QAFormatError(path, None, f"the file is one JSON {_json_type(doc)} that is not a list of records or an object of records")


_BLANK = object()


def _first_line(path: Path) -> Any:
    """The first non-blank line parsed as JSON; None when it is not a complete JSON value, ``_BLANK`` when there is none."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = next((line for line in f if line.strip()), None)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if line is None:
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _is_keyed(obj: dict) -> bool:
    """An object of records keyed by id (PubMedQA's PMID -> record): every value is an object."""
    return bool(obj) and all(isinstance(v, dict) for v in obj.values())


def _json_document(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f, object_pairs_hook=_object_pairs)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as e:
        raise QAFormatError(
            path, f"line {e.lineno}", f"not valid JSON ({e.msg}, column {e.colno})",
            "a JSON array of records, a JSON object of records keyed by id, or JSON lines",
        ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[_Pos, Any]]:
    """Stream JSON lines; blank lines are skipped."""
    n = 0
    with open(path, encoding="utf-8-sig") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QAFormatError(path, f"line {n}", f"not valid JSON ({e.msg}, column {e.colno})", "one JSON object per line") from None
                yield _Pos("line", n), row
        except UnicodeDecodeError:
            raise _not_utf8(path) from None  # text files decode in blocks: line n + 1 may not be the one


def _not_utf8(path: Path) -> QAFormatError:
    """The error for a file that is not UTF-8, naming its first line that is not."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return QAFormatError(path, f"line {number}", f"not UTF-8 text (byte {e.start + 1} of the line)", "UTF-8 JSON, JSON lines or Parquet")
    raise AssertionError(f"{path} decodes as UTF-8 line by line")


def _unwrap(row: Any) -> tuple[Any, bool]:
    """``{"id": ..., "data": {...}}`` (the CSV-derived MedMCQA release) -> the inner record."""
    if isinstance(row, dict) and len(row) == 2 and isinstance(row.get("data"), dict) and "id" in row:
        return row["data"], True
    return row, False


# -- field access --------------------------------------------------------------------------------


def _require(row: dict, unit: _Unit, pos: _Pos, *fields: str | tuple[str, ...]) -> None:
    """Each field (or one of a tuple of alternatives) is present, else ``QAFormatError``."""
    for field in fields:
        names = field if isinstance(field, tuple) else (field,)
        if not any(n in row for n in names):
            wanted = " or ".join(repr(n) for n in names)
            raise QAFormatError(unit.name, pos, f"no field {wanted} (fields: {', '.join(sorted(map(str, row)))})")


def _text(value: Any, unit: _Unit, pos: _Pos, field: str, missing: tuple[str, ...] = ("",)) -> str | None:
    """A text field as the source has it; None when null, NaN or, once stripped, one of ``missing``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise QAFormatError(unit.name, pos, f"field {field!r} is a JSON {_json_type(value)}", "text")
    return None if value.strip() in missing else value


def _json_type(value: Any) -> str:
    """What a value is, in JSON's words: errors say this, never the value (it is the file's content)."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _texts(value: Any, unit: _Unit, pos: _Pos, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QAFormatError(unit.name, pos, f"field {field!r} is not a list of text", "a list of strings")
    return value


def _digest(*parts: str) -> str:
    """An id from texts, stripped: the same with or without ``clean_text``."""
    return hashlib.sha256("\x1f".join(p.strip() for p in parts).encode("utf-8")).hexdigest()[:16]


def _record_id(config: QAConfig, kind: str, native_id: str) -> str:
    return f"{config.source_name or kind}:{native_id}"


def _record(unit: _Unit, config: QAConfig, kind: str, encoding: str, *, native_id: str, split: str | None,
            question: str | None, context: list[str], options: list[str], answer_idx: int | None,
            answer_text: str | None, explanation: str | None, meta: dict) -> dict:
    """The canonical record, after the checks every format shares."""
    record_id = _record_id(config, kind, native_id)
    if not question:
        raise _Skip(EMPTY_QUESTION, record_id)
    if (options and answer_idx is None) or (not options and not answer_text):
        raise _Skip(NO_ANSWER, record_id)
    if options and not 0 <= answer_idx < len(options):
        raise _Skip(NOT_AMONG_OPTIONS, record_id)
    split = config.split or split or unit.split or ("train" if kind in ("instructions", "pubmedqa") else None)
    if split is None:
        raise QAFormatError(
            unit.name, None, "cannot tell the split from the name",
            "a word train, dev, validation, val, valid or test in the file name, or QAConfig.split",
        )
    tidy = str.strip if config.clean_text else lambda text: text
    options = [tidy(o) for o in options]
    return {
        "id": record_id,
        "source": config.source_name or kind,
        "split": _SPLIT_WORDS[split],
        "question": tidy(question),
        "context": [tidy(c) for c in context],
        "options": options,
        "answer_idx": answer_idx,
        "answer_text": options[answer_idx] if options else tidy(answer_text),
        "explanation": tidy(explanation) if explanation else None,
        "meta": json.dumps({"format": f"{unit.container}/{kind}-{encoding}", **meta}, ensure_ascii=False),
    }


# -- the normalisers: (unit, config, file report) -> a function (row, pos) -> record ---------------

Normaliser = Callable[[dict, _Pos], dict]


def _pubmedqa(unit: _Unit, config: QAConfig, info: dict) -> Normaliser:
    truth = _ground_truth(unit, config, info)

    def normalise(row: dict, pos: _Pos) -> dict:
        _require(row, unit, pos, ("QUESTION", "pubid"))
        if "QUESTION" in row:  # the original ori_pqal.json / ori_pqaa.json layout
            _require(row, unit, pos, "QUESTION", "CONTEXTS")
            if pos.kind != "key":
                _require(row, unit, pos, "pubid")
            encoding, pmid = "original", str(row.get("pubid", pos.value))
            question, contexts, long_answer = row["QUESTION"], row["CONTEXTS"], row.get("LONG_ANSWER")
            labels, meshes, year = row.get("LABELS"), row.get("MESHES"), row.get("YEAR")
            preds = row
        else:  # the hub's qiaojin/PubMedQA
            _require(row, unit, pos, "pubid", "question", "context")
            ctx = row["context"]
            if not isinstance(ctx, dict) or "contexts" not in ctx:
                raise QAFormatError(unit.name, pos, "field 'context' has no 'contexts'", "context: {contexts, labels, meshes}")
            encoding, pmid = "hf", str(row["pubid"])
            question, contexts, long_answer = row["question"], ctx["contexts"], row.get("long_answer")
            labels, meshes, year = ctx.get("labels"), ctx.get("meshes"), None
            preds = {**ctx, **row}
        decision = _text(row.get("final_decision"), unit, pos, "final_decision")
        record_id = _record_id(config, "pubmedqa", pmid)
        if decision is not None and decision not in PUBMEDQA_OPTIONS:
            raise _Skip(NOT_AMONG_OPTIONS, record_id)
        split = None if truth is None else "train"
        if truth is not None and pmid in truth:
            info["ground_truth_matched"] += 1
            split = "test"
            if decision is not None and truth[pmid] != decision:
                raise _Skip(GROUND_TRUTH_DISAGREES, record_id)
        meta = {
            "context_labels": _texts(labels, unit, pos, "LABELS"),
            "meshes": _texts(meshes, unit, pos, "MESHES"),
            "year": year,
            "reasoning_required_pred": preds.get("reasoning_required_pred"),
            "reasoning_free_pred": preds.get("reasoning_free_pred"),
        }
        return _record(
            unit, config, "pubmedqa", encoding, native_id=pmid, split=split,
            question=_text(question, unit, pos, "question"), context=_texts(contexts, unit, pos, "CONTEXTS"),
            options=list(PUBMEDQA_OPTIONS),
            answer_idx=None if decision is None else PUBMEDQA_OPTIONS.index(decision),
            answer_text=decision, explanation=_text(long_answer, unit, pos, "LONG_ANSWER"), meta=meta,
        )

    return normalise


def _ground_truth(unit: _Unit, config: QAConfig, info: dict) -> dict[str, str] | None:
    """PMID -> label from ``config.pubmedqa_ground_truth`` or the test_ground_truth.json beside the data."""
    if config.pubmedqa_ground_truth:
        path = Path(config.pubmedqa_ground_truth)
    elif unit.folder is not None and (unit.folder / GROUND_TRUTH_FILE).is_file():
        path = unit.folder / GROUND_TRUTH_FILE
    else:
        info["test_ground_truth"] = None
        return None
    truth = _json_document(path)
    if not isinstance(truth, dict):
        raise QAFormatError(path, None, f"the file is a JSON {_json_type(truth)}", 'an object PMID -> "yes" | "no" | "maybe"')
    for pmid, label in truth.items():
        if label not in PUBMEDQA_OPTIONS:
            raise QAFormatError(path, f"key {pmid}", "a label that is not yes, no or maybe", '"yes", "no" or "maybe"')
    info.update(test_ground_truth=str(path), ground_truth_pmids=len(truth), ground_truth_matched=0)
    return truth


def _medmcqa(unit: _Unit, config: QAConfig, info: dict) -> Normaliser:
    base, evidence, csv = _cop_base(unit, config)
    encoding = "csv-derived" if csv else "native" if base == 1 else "hf"
    info.update(encoding=encoding, cop_base=base, cop_base_from=evidence)

    def text(row: dict, pos: _Pos, field: str) -> str | None:
        return _text(row.get(field), unit, pos, field, missing=("", "nan"))

    def normalise(row: dict, pos: _Pos) -> dict:
        _require(row, unit, pos, "id", "question", *_MEDMCQA_OPTIONS)
        native_id = text(row, pos, "id")
        if native_id is None:
            raise _Skip(NO_ID)
        record_id = _record_id(config, "medmcqa", native_id)
        cop = _cop(row.get("cop"))
        gold = None if cop is None else cop - base
        if gold is not None and not 0 <= gold < len(_MEDMCQA_OPTIONS):
            raise _Skip(NOT_AMONG_OPTIONS, record_id)
        options, answer_idx = [], None
        for k, field in enumerate(_MEDMCQA_OPTIONS):
            if k == gold and text(row, pos, field) is None:
                raise _Skip(MISSING_OPTION, record_id)
            # The harness lists every option it is given ("D. nan" where the CSV export left one
            # empty): dropped only with clean_text, or when null.
            option = text(row, pos, field) if config.clean_text else _text(row.get(field), unit, pos, field, missing=())
            if option is None:
                continue
            if k == gold:
                answer_idx = len(options)
            options.append(option)
        meta = {field: text(row, pos, field) for field in ("subject_name", "topic_name", "choice_type")}
        return _record(
            unit, config, "medmcqa", encoding, native_id=native_id, split=None,
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


def _cop_base(unit: _Unit, config: QAConfig) -> tuple[int, str, bool]:
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
        row, wrapped = _unwrap(row)
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
    if unit.container in _HF_CONTAINERS:
        return 0, "a Hugging Face dataset: 0-based", csv
    return 1, "JSON without cop 0, -1 or 4, integer cops: the native release, 1-based", csv


def _medqa(unit: _Unit, config: QAConfig, info: dict) -> Normaliser:
    def normalise(row: dict, pos: _Pos) -> dict:
        _require(row, unit, pos, ("question", "sent1"))
        swag = "question" not in row
        if swag:  # the hub's GBaker/MedQA-USMLE-4-options-hf, read as the original layout
            row = _swag_as_medqa(row, unit, pos)
        _require(row, unit, pos, ("options", "option_A"))
        question = _text(row["question"], unit, pos, "question")
        encoding, letters, options = _medqa_options(row, unit, pos)
        native_id = _digest(question or "", *options)
        answer_idx = _medqa_answer(
            _text(row.get("answer_idx"), unit, pos, "answer_idx"), _text(row.get("answer"), unit, pos, "answer"),
            letters, options, _record_id(config, "medqa", native_id),
        )
        meta = {"meta_info": row.get("meta_info"), "n_options": len(options)}
        return _record(
            unit, config, "medqa", "hf-swag" if swag else encoding, native_id=native_id, split=None,
            question=question, context=[], options=options, answer_idx=answer_idx, answer_text=None,
            explanation=None, meta=meta,
        )

    return normalise


def _swag_as_medqa(row: dict, unit: _Unit, pos: _Pos) -> dict:
    """``sent1``, ``ending0``..., ``label`` (int, -1 unlabelled) -> ``question``, ``options``, ``answer_idx`` letter."""
    _require(row, unit, pos, "ending0", "label")
    label = row["label"]
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise QAFormatError(unit.name, pos, f"field 'label' is a JSON {_json_type(label)}", "an integer index into ending0, ending1, ...")
    letter = None if label is None or label == -1 else string.ascii_uppercase[label] if 0 <= label < 26 else "?"
    endings = [row[f"ending{k}"] for k in range(len(row)) if f"ending{k}" in row]
    return {"question": row["sent1"], "options": endings, "answer_idx": letter}


def _medqa_options(row: dict, unit: _Unit, pos: _Pos) -> tuple[str, list[str], list[str]]:
    """(encoding, letters, option texts) ordered by letter, from ``options`` or, in MultiMedQA's
    CSV-derived array, ``option_A``, ``option_B``, ... (where "nan" is an option the question
    does not have: every 4-option question there has option_E "nan")."""
    if "options" not in row:
        pairs = [(field[-1], value) for field, value in row.items() if re.fullmatch(r"option_[A-Z]", field)]
        pairs = [(letter, value) for letter, value in pairs if _text(value, unit, pos, f"option_{letter}", missing=("", "nan")) is not None]
        return "option-fields", [k for k, _ in pairs], [v for _, v in pairs]
    value = row["options"]
    if isinstance(value, dict):
        encoding, pairs = "options-dict", list(value.items())
    elif isinstance(value, list) and all(isinstance(v, dict) and {"key", "value"} <= set(v) for v in value):
        encoding, pairs = "bigbio-source", [(v["key"], v["value"]) for v in value]
    elif isinstance(value, list):
        encoding, pairs = "options-list", list(zip(string.ascii_uppercase, value))
    else:
        raise QAFormatError(unit.name, pos, f"field 'options' is a JSON {_json_type(value)}", "a dict letter -> text, a list of text or of {key, value}")
    pairs.sort(key=lambda kv: str(kv[0]))
    for key, _ in pairs:
        if not (isinstance(key, str) and len(key) == 1 and key in string.ascii_uppercase):
            raise QAFormatError(unit.name, pos, "an option key that is not one capital letter", "option letters A, B, C, ...")
    return encoding, [k for k, _ in pairs], [_text(v, unit, pos, f"options.{k}") or "" for k, v in pairs]


def _medqa_answer(letter: str | None, answer: str | None, letters: list[str], options: list[str], record_id: str) -> int | None:
    """The gold index from the letter and/or the text (None: neither is given); texts compare stripped."""
    letter = None if letter is None else letter.strip()
    texts = [o.strip() for o in options]
    answer = None if answer is None else answer.strip()
    if letter is not None and letter not in letters or answer is not None and answer not in texts:
        raise _Skip(NOT_AMONG_OPTIONS, record_id)
    if letter is None:
        return None if answer is None else texts.index(answer)
    if answer is not None and texts[letters.index(letter)] != answer:
        raise _Skip(DISAGREE, record_id)
    return letters.index(letter)


def _instructions(unit: _Unit, config: QAConfig, info: dict) -> Normaliser:
    def normalise(row: dict, pos: _Pos) -> dict:
        if mcq := [f for f in _MCQ_FIELDS if f in row]:
            raise QAFormatError(
                unit.name, pos, f"a multiple-choice record (fields: {', '.join(sorted(map(str, row)))}), not an instruction",
                f"instruction records; give this file as PubMedQA, MedMCQA or MedQA (it has {mcq[0]!r})",
            )
        _require(row, unit, pos, _INSTRUCTION_QUESTION, _INSTRUCTION_ANSWER)
        q_field = next(f for f in _INSTRUCTION_QUESTION if f in row)
        a_field = next(f for f in _INSTRUCTION_ANSWER if f in row)
        question = _text(row[q_field], unit, pos, q_field)
        given = _text(row.get("input"), unit, pos, "input") if q_field == "instruction" else None
        answer = _text(row[a_field], unit, pos, a_field)
        own_id = row.get("id")
        native_id = str(own_id).strip() if own_id is not None and str(own_id).strip() else _digest(question or "", given or "", answer or "")
        encoding = "alpaca" if q_field == "instruction" else f"{q_field}-{a_field}"
        return _record(
            unit, config, "instructions", encoding, native_id=native_id, split=None, question=question,
            context=[given] if given else [], options=[], answer_idx=None, answer_text=answer,
            explanation=None, meta={"fields": [q_field, a_field]},
        )

    return normalise


_NORMALISERS: dict[str, Callable[[_Unit, QAConfig, dict], Normaliser]] = {
    "pubmedqa": _pubmedqa,
    "medmcqa": _medmcqa,
    "medqa": _medqa,
    "instructions": _instructions,
}


def _detect(row: Any, unit: _Unit, pos: _Pos) -> str:
    """The format of a file from its first record's fields."""
    if not isinstance(row, dict):
        raise QAFormatError(unit.name, pos, f"the first record is a JSON {_json_type(row)}, not an object")
    if "QUESTION" in row or "pubid" in row and "context" in row:
        return "pubmedqa"
    if "opa" in row:
        return "medmcqa"
    if "question" in row and ("options" in row or "option_A" in row) or "sent1" in row and "ending0" in row:
        return "medqa"
    if any(f in row for f in _INSTRUCTION_QUESTION) and any(f in row for f in _INSTRUCTION_ANSWER):
        return "instructions"
    raise QAFormatError(
        unit.name, pos, f"no field 'question' or 'sent1' or 'QUESTION' or 'opa' or 'instruction' "
        f"(fields: {', '.join(sorted(map(str, row)))})",
    )


# -- output and report ---------------------------------------------------------------------------


class _Output:
    """records.parquet and records.jsonl, written as records arrive."""

    def __init__(self, out_dir: Path):
        self._writer = pq.ParquetWriter(out_dir / RECORDS_FILE, QA_SCHEMA, compression="zstd")
        self._jsonl = open(out_dir / RECORDS_JSONL, "w", encoding="utf-8")
        self._batch: list[dict] = []

    def write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._batch.append(record)
        if len(self._batch) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self._writer.write_table(pa.Table.from_pylist(self._batch, schema=QA_SCHEMA))
            self._batch = []

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self._flush()
        finally:
            self._writer.close()
            self._jsonl.close()


def _excerpt(row: Any) -> str:
    if isinstance(row, dict):
        for field in ("question", "QUESTION", "sent1", *_INSTRUCTION_QUESTION):
            if isinstance(row.get(field), str):
                return row[field].strip()[:100]
    return json.dumps(row, ensure_ascii=False)[:100]


# -- the pure function ---------------------------------------------------------------------------


def convert_qa(config: QAConfig, out_dir: Path) -> dict:
    """Convert ``config.source`` (or ``config.hub_dataset``) into records.parquet, records.jsonl and report.json.

    Returns the summary for the artifact manifest: ``{"format", "encodings", "rows_read",
    "records": {split: n}, "skipped"}``; the full report (files, encodings, skips by reason with
    examples) is ``out_dir/report.json``. Raises ``QAFormatError`` for input in no accepted
    format; then none of the three files is left in ``out_dir``.
    """
    source = config.source
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "source": str(source) if source is not None else f"hf://{config.hub_dataset}",
        "config": asdict(config),
        "files": [],
        "rows_read": 0,
        "records": dict.fromkeys(SPLITS, 0),
        "skipped": {},
        "skip_examples": {},
    }
    ok = False
    output = _Output(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="medlm-qa-") as tmp:
            seen: set[str] = set()
            for unit in _units(None if source is None else Path(source), config, Path(tmp)):
                _convert_unit(unit, config, output, seen, report)
        ok = True
    finally:
        output.close(ok)
        if not ok:
            for name in (RECORDS_FILE, RECORDS_JSONL, REPORT_FILE):
                (out_dir / name).unlink(missing_ok=True)
    formats = sorted({f["format"] for f in report["files"]})
    report["format"] = "+".join(formats)
    summary = {
        "format": report["format"],
        "encodings": sorted({e for f in report["files"] for e in f["encodings"]}),
        "rows_read": report["rows_read"],
        "records": report["records"],
        "skipped": sum(report["skipped"].values()),
    }
    report["summary"] = summary
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _convert_unit(unit: _Unit, config: QAConfig, output: _Output, seen: set[str], report: dict) -> None:
    """Normalise one file's rows: write the good ones, count and exemplify the skipped ones."""
    rows = unit.rows()
    first = next(rows, None)
    rows.close()
    if first is None:
        raise QAFormatError(unit.name, None, "no records")
    kind = config.format if config.format != "auto" else _detect(_unwrap(first[1])[0], unit, first[0])
    info: dict = {"file": unit.name, "container": unit.container, "format": kind}
    normalise = _NORMALISERS[kind](unit, config, info)
    encodings: Counter[str] = Counter()
    rows = 0
    for pos, raw in unit.rows():
        rows += 1
        row, _ = _unwrap(raw)
        if not isinstance(row, dict):
            raise QAFormatError(unit.name, pos, f"the record is a JSON {_json_type(row)}, not an object")
        try:
            record = normalise(row, pos)
            if record["id"] in seen:
                raise _Skip(DUPLICATE_ID, record["id"])
        except QAFormatError as e:
            if e.expected != _EXPECTED:
                raise
            raise QAFormatError(e.path, e.row, e.problem, _EXPECTED_AS[kind] + f" (the file was read as {kind})") from None
        except _Skip as skip:
            report["skipped"][skip.reason] = report["skipped"].get(skip.reason, 0) + 1
            examples = report["skip_examples"].setdefault(skip.reason, [])
            if len(examples) < config.skip_examples:
                examples.append({"file": unit.name, "row": str(pos), "id": skip.record_id, "excerpt": _excerpt(row)})
            continue
        seen.add(record["id"])
        output.write(record)
        report["records"][record["split"]] += 1
        encodings[json.loads(record["meta"])["format"]] += 1
    info.update(rows_read=rows, encodings=dict(encodings))
    report["rows_read"] += rows
    report["files"].append(info)


# -- the stage -----------------------------------------------------------------------------------


def qa_report(artifact: Artifact) -> list[dict]:
    """The conversion report as table rows: records per split, then skipped rows per reason."""
    report = json.loads(artifact.file(REPORT_FILE).read_text())
    rows = [{"what": f"records in {split}", "count": n} for split, n in report["records"].items() if n]
    rows += [
        {"what": f"skipped: {reason}", "count": n, "first": ", ".join(e["id"] or e["row"] for e in report["skip_examples"].get(reason, []))}
        for reason, n in report["skipped"].items()
    ]
    return rows


QA = Stage(
    name="qa",
    version="2",
    config=QAConfig,
    inputs={},
    build=lambda inputs, out_dir, config: convert_qa(config, out_dir),
    label=lambda inputs, config: Path(config.source).name if config.source else f"hf://{config.hub_dataset}",
    report=qa_report,
)
