"""Containers: a file, a folder or a Hugging Face dataset -> units of rows, each row with its position.

``units`` takes a file, a folder of files (every ``*.json``, ``*.jsonl`` and ``*.parquet`` in it,
sorted, except the side files named), a folder written by ``datasets``' ``save_to_disk`` (it
holds ``dataset_dict.json`` or ``state.json``), or a Hugging Face hub dataset
(``datasets.load_dataset``; needs the network). The container is told from the content: Parquet by
its magic bytes; text whose first line is a complete JSON object is JSON lines (streamed), unless
that object's values are all objects; anything else is one JSON document: an array of records, or
an object keyed by id (PubMedQA). A unit's split is the dataset split's or the file name's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, NamedTuple

from storage.access import readable
from tasks.qa.errors import QAFormatError, json_type

SPLIT_WORDS = {"train": "train", "dev": "validation", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
HF_CONTAINERS = ("parquet", "hf-save-to-disk", "hf-hub")


class Pos(NamedTuple):
    """Where a row is: ("line", 3), ("index", 0), ("key", "21645374") or ("row", 7)."""

    kind: str
    value: int | str

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"


class Unit(NamedTuple):
    """One input: a file or one split of a dataset, its rows re-readable (MedMCQA reads twice)."""

    name: str  # for messages and the report
    container: str  # jsonl | json-array | json-object | parquet | hf-save-to-disk | hf-hub
    split: str | None  # from the dataset split or the file name
    folder: Path | None  # the data's folder, where side files such as PubMedQA's test_ground_truth.json are
    rows: Callable[[], Iterator[tuple[Pos, Any]]]


def units(source: Path | None, tmp: Path, *, hub_dataset: str | None = None, hub_config: str | None = None,
          side_files: Collection[str] = ()) -> list[Unit]:
    """The units of ``source`` (or of ``hub_dataset``); a folder's ``side_files`` are not data."""
    if hub_dataset:
        import datasets

        loaded = datasets.load_dataset(hub_dataset, hub_config)
        return _dataset_units(loaded, f"hf://{hub_dataset}", "hf-hub", None)
    source = readable(source, "QA data")
    if source.is_dir():
        if (source / "dataset_dict.json").is_file() or (source / "state.json").is_file():
            return _dataset_units(_load_saved_dataset(source), str(source), "hf-save-to-disk", source)
        files = sorted(
            readable(p, "QA data") for p in source.iterdir()
            if p.is_file() and p.suffix in (".json", ".jsonl", ".parquet") and p.name not in side_files
        )
        if not files:
            raise QAFormatError(source, None, "the folder holds no .json, .jsonl or .parquet file")
        return [_file_unit(p, tmp) for p in files]
    return [_file_unit(source, tmp)]


class _Duplicates(dict):
    """A JSON object with a repeated key: json keeps the last value, ``pairs`` keeps them all."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    return dict(pairs) if len({k for k, _ in pairs}) == len(pairs) else _Duplicates(pairs)


def _split_from_name(name: str) -> str | None:
    """The split a name says (its last word that names one), e.g. US_test -> test, medmcqa_val -> validation."""
    words = [SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", name.lower()) if w in SPLIT_WORDS]
    return words[-1] if words else None


def _load_saved_dataset(folder: Path):
    """``datasets.load_from_disk(folder)``, once every file its metadata names is a plain name in
    its folder: ``datasets`` opens whatever path ``state.json`` or ``dataset_dict.json`` names,
    ``../outside.arrow`` included, and the artifact's key covers only the folder's own files."""
    import datasets

    splits = [folder]
    if (listing := folder / "dataset_dict.json").is_file():
        names = json_document(listing)
        names = names.get("splits") if isinstance(names, dict) else None
        splits = [_file_in(folder, name, listing, f"splits[{i}]") for i, name in enumerate(names if isinstance(names, list) else [None])]
    for split in splits:
        state = json_document(split / "state.json")
        entries = state.get("_data_files") if isinstance(state, dict) else None
        for i, entry in enumerate(entries if isinstance(entries, list) else [None]):
            _file_in(split, entry.get("filename") if isinstance(entry, dict) else None, split / "state.json", f"_data_files[{i}]")
    return datasets.load_from_disk(str(folder))


def _file_in(folder: Path, name: Any, listed_in: Path, entry: str) -> Path:
    """``folder / name`` when ``name`` is a plain file or folder name, else QAFormatError."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise QAFormatError(listed_in, entry, "not a plain name of something in this folder", "names of the dataset's own files, e.g. data-00000-of-00001.arrow")
    return readable(folder / name, "QA data")


def _dataset_units(loaded, name: str, container: str, folder: Path | None) -> list[Unit]:
    """One unit per split of a ``DatasetDict``, or one for a ``Dataset``."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return [_dataset_unit(ds, f"{name}[{key}]", container, _split_from_name(key), folder) for key, ds in loaded.items()]
    split = _split_from_name(str(loaded.split)) if loaded.split else _split_from_name(Path(name).name)
    return [_dataset_unit(loaded, name, container, split, folder)]


def _dataset_unit(ds, name: str, container: str, split: str | None, folder: Path | None) -> Unit:
    return Unit(name, container, split, folder, lambda: ((Pos("row", i), row) for i, row in enumerate(ds)))


def _file_unit(path: Path, tmp: Path) -> Unit:
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
        return Unit(str(path), "jsonl", split, path.parent, lambda: _jsonl_rows(path))
    doc = json_document(path)
    if isinstance(doc, list):
        return Unit(str(path), "json-array", split, path.parent, lambda: ((Pos("index", i), r) for i, r in enumerate(doc)))
    if isinstance(doc, dict) and _is_keyed(doc):
        items = doc.pairs if isinstance(doc, _Duplicates) else doc.items()
        return Unit(str(path), "json-object", split, path.parent, lambda: ((Pos("key", k), r) for k, r in items))
    raise QAFormatError(path, None, f"the file is one JSON {json_type(doc)} that is not a list of records or an object of records")


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


def json_document(path: Path) -> Any:
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


def _jsonl_rows(path: Path) -> Iterator[tuple[Pos, Any]]:
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
                yield Pos("line", n), row
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


def unwrap(row: Any) -> tuple[Any, bool]:
    """``{"id": ..., "data": {...}}`` (the CSV-derived MedMCQA release) -> the inner record."""
    if isinstance(row, dict) and len(row) == 2 and isinstance(row.get("data"), dict) and "id" in row:
        return row["data"], True
    return row, False
