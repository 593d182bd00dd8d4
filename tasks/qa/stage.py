"""The qa stage: medical QA datasets -> one canonical record format.

``convert_qa(config, out_dir)`` reads one source (``containers.py``), tells its dataset from the
first record's fields unless ``config.format`` names one (``registry.py``), normalises every row
(one module per dataset), and writes ``records.parquet`` (``storage.formats.qa_schema()``, zstd),
``records.jsonl`` (the same rows, UTF-8, one object a line) and ``report.json`` into ``out_dir``.
``storage.formats.read_records`` reads the Parquet back for evaluation and fine-tuning. The
artifact's key is the source's content (sha256 of its files), not its path.

Split: ``config.split``, else the dataset's rule (PubMedQA's test_ground_truth.json), else the
dataset split / the file name (a word train, dev, validation, val, valid or test; MedMCQA "dev"
is "validation"), else "train" for PubMedQA and instruction data; a MedMCQA or MedQA file with no
split in its name is an error.

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
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from storage import Artifact, Stage, sha256_file
from storage.access import DataPath, readable, readable_files
from storage.config import config_dataclass
from storage.formats import QA_SPLITS as SPLITS
from storage.formats import RECORDS_FILE, RECORDS_JSONL
from tasks.qa.containers import Unit, units, unwrap
from tasks.qa.errors import EXPECTED, QAFormatError, json_type
from tasks.qa.pubmedqa import GROUND_TRUTH_FILE
from tasks.qa.records import DUPLICATE_ID, QA_SCHEMA, Skip
from tasks.qa.registry import BY_NAME, DATASETS, FORMATS, QUESTION_FIELDS, SIDE_FILES, detect

REPORT_FILE = "report.json"
_BATCH_ROWS = 1000
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
    format: Literal[("auto", *FORMATS)] = Field("auto", description="Which reader to use: a file that is not in that format is an error (auto: told from the first record's fields).")
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


def _configs(self) -> dict[str, QAConfig]:
    """name -> the qa stage's config for each source given, read as the dataset it is given as:
    a dataset's name, or for one given as several files (instruction data) each file's stem."""
    return {name: QAConfig(source=path, format=dataset, clean_text=self.clean_text) for dataset in FORMATS for name, path in _given(self, dataset).items()}


def _given(self, dataset: str) -> dict:
    """name -> path of what is given of ``dataset`` (nothing when unset)."""
    value = getattr(self, dataset)
    return {Path(p).stem: p for p in value} if BY_NAME[dataset].many else {dataset: value} if value else {}


def _names(self, dataset: str) -> list[str]:
    """The names ``configs`` gives ``dataset``'s data (a curriculum's source -> the qa artifacts it trains on)."""
    return list(_given(self, dataset))


def _sources_class() -> type:
    """QASources: one field per registered dataset, named as it (a path, or several for a dataset
    given as many files), then clean_text; built from the registry, so the CLI's options, the run
    configuration's [qa] table and the UI form follow a new dataset."""
    fields = {d.name: (tuple[DataPath, ...], Field((), description=d.data_help)) if d.many else (DataPath | None, Field(None, description=d.data_help))
              for d in DATASETS}
    fields["clean_text"] = (bool, Field(False, description=CLEAN_TEXT))
    namespace = {
        "__doc__": "Where the QA datasets are: a file or folder each, in any layout the qa stage reads (unset: not used).",
        "__module__": __name__, "__qualname__": "QASources",
        "__annotations__": {name: kind for name, (kind, _) in fields.items()},
        **{name: default for name, (_, default) in fields.items()},
        "configs": _configs, "names": _names,
    }
    return config_dataclass(type("QASources", (), namespace))


QASources = _sources_class()


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
        for field in QUESTION_FIELDS:
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
            for unit in units(
                None if source is None else Path(source), Path(tmp),
                hub_dataset=config.hub_dataset, hub_config=config.hub_config, side_files=SIDE_FILES,
            ):
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


def _convert_unit(unit: Unit, config: QAConfig, output: _Output, seen: set[str], report: dict) -> None:
    """Normalise one file's rows: write the good ones, count and exemplify the skipped ones."""
    rows = unit.rows()
    first = next(rows, None)
    rows.close()
    if first is None:
        raise QAFormatError(unit.name, None, "no records")
    dataset = BY_NAME[config.format] if config.format != "auto" else detect(unwrap(first[1])[0], unit, first[0])
    info: dict = {"file": unit.name, "container": unit.container, "format": dataset.name}
    normalise = dataset.normaliser(unit, config, info)
    encodings: Counter[str] = Counter()
    rows = 0
    for pos, raw in unit.rows():
        rows += 1
        row, _ = unwrap(raw)
        if not isinstance(row, dict):
            raise QAFormatError(unit.name, pos, f"the record is a JSON {json_type(row)}, not an object")
        try:
            record = normalise(row, pos)
            if record["id"] in seen:
                raise Skip(DUPLICATE_ID, record["id"])
        except QAFormatError as e:
            if e.expected != EXPECTED:
                raise
            raise QAFormatError(e.path, e.row, e.problem, f"{dataset.expected} (the file was read as {dataset.name})") from None
        except Skip as skip:
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
