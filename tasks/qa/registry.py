"""The datasets: one module each, listed here, in the order a file's first record is tried
against them. Every list of datasets elsewhere (QASources' fields, the curriculum's names, the
benchmarks, the card's Hub ids and licences, the PMIDs hygiene drops) is derived from ``DATASETS``.

A dataset is added by one line in ``MODULES``, or, for a module outside this repository (a
plugin, a test's), by naming it in the environment variable ``MEDLM_DATASETS`` (module names,
comma-separated) of every process that runs medlm: the config classes are built from the
registry when they are imported, so a dataset must be registered before that, not by a call.
"""

from __future__ import annotations

import importlib
from typing import Any

from storage.settings import settings
from tasks.qa.containers import Pos, Unit
from tasks.qa.errors import QAFormatError, json_type
from tasks.qa.records import Benchmark, Dataset

MODULES = ("tasks.qa.pubmedqa", "tasks.qa.medmcqa", "tasks.qa.medqa")  # each declares DATASET
CATCH_ALL = "tasks.qa.instructions"  # tried last: it takes any record with a question and an answer, multiple-choice ones too
ENVIRONMENT = "MEDLM_DATASETS"


def _load(module: str) -> Dataset:
    try:
        dataset = importlib.import_module(module).DATASET
    except (ImportError, AttributeError) as e:
        raise ImportError(f"dataset module {module!r} ({ENVIRONMENT} or tasks/qa/registry.py MODULES): {e}; a dataset module declares DATASET = Dataset(...)") from None
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset module {module!r}: DATASET is a {type(dataset).__name__}, not a tasks.qa.records.Dataset")
    return dataset


def _modules() -> list[str]:
    return list(dict.fromkeys([*MODULES, *settings().datasets, CATCH_ALL]))


DATASETS = tuple(_load(m) for m in _modules())
BY_NAME = {d.name: d for d in DATASETS}
if len(BY_NAME) < len(DATASETS):
    raise ValueError(f"two datasets share a name among {[d.name for d in DATASETS]}: each needs its own")
FORMATS = tuple(BY_NAME)
QUESTION_FIELDS = tuple(dict.fromkeys(f for d in DATASETS for f in d.question_fields))
SIDE_FILES = tuple(dict.fromkeys(f for d in DATASETS for f in d.side_files))
BENCHMARKS: dict[str, Benchmark] = {b.name: b for d in DATASETS for b in d.benchmarks}
TRAINED = tuple(d.name for d in DATASETS if d.trains)  # what a curriculum may fine-tune on
PREFERRED = tuple(d.name for d in DATASETS if d.preference)  # what preference tuning may pair


def detect(row: Any, unit: Unit, pos: Pos) -> Dataset:
    """The dataset of a file, from its first record's fields: the first whose ``detect`` accepts it."""
    if not isinstance(row, dict):
        raise QAFormatError(unit.name, pos, f"the first record is a JSON {json_type(row)}, not an object")
    for dataset in DATASETS:
        if dataset.detect(row):
            return dataset
    wanted = " or ".join(repr(f) for f in QUESTION_FIELDS)
    titles = [d.title for d in DATASETS]
    raise QAFormatError(unit.name, pos, f"no field {wanted} (fields: {', '.join(sorted(map(str, row)))})",
                        f"{', '.join(titles[:-1])} or {titles[-1]} records (tasks/qa/registry.py)")


def item_pmid(record: dict) -> int | None:
    """The PubMed article an evaluation item is about, where its dataset says (PubMedQA: its PMID)."""
    dataset = BY_NAME.get(record["source"])
    return dataset.pmid(record) if dataset and dataset.pmid else None


def long_answers(records: list[dict]) -> dict[str, list[dict]]:
    """The free-text sets of datasets whose explanation is the reference answer (``Prompting.long_answers``,
    PubMedQA's): name -> its test records that have one."""
    sets = {d.name: d.prompting.long_answers for d in DATASETS if d.prompting.long_answers}
    found: dict[str, list[dict]] = {}
    for r in records:
        if r["source"] in sets and r["split"] == "test" and r["explanation"]:
            found.setdefault(sets[r["source"]], []).append(r)
    return found
