"""A result and its kind: every measurement returns a JSON-able dict

    {"kind", "name", ... what was run ..., "metrics": {metric: {"value", "ci95", "ci_method", "n"}},
     "baseline": {...} | None, "per_item": [...]}

and the stage writes the list of them as ``results.json``. Per-item results are kept, so
``score_subset(result, ids)`` recomputes every number on a subset (e.g. items with no overlap
with the pretraining corpus) with the same code.
"""

from __future__ import annotations

from typing import Iterable

from tasks.evaluate.generation import GENERATION
from tasks.evaluate.kinds import Kind
from tasks.evaluate.language_modelling import LANGUAGE_MODELLING
from tasks.evaluate.multiple_choice import MULTIPLE_CHOICE

RESULTS_FILE = "results.json"
KINDS: dict[str, Kind] = {kind.name: kind for kind in (MULTIPLE_CHOICE, LANGUAGE_MODELLING, GENERATION)}


def kind_of(result: dict) -> Kind:
    if result["kind"] not in KINDS:
        raise ValueError(f"unknown result kind {result['kind']!r}")
    return KINDS[result["kind"]]


def headline_metric(result: dict) -> str:
    """The metric a result is summed up by: acc, bits_per_byte or rougeL."""
    return kind_of(result).main_metric


def score_subset(result: dict, ids: Iterable[str]) -> dict:
    """The result recomputed on the items whose id is in ``ids`` (all of which must be in it)."""
    wanted = set(ids)
    known = {i["id"] for i in result["per_item"]}
    if missing := wanted - known:
        raise ValueError(f"{len(missing)} ids are not items of {result.get('name')!r}, e.g. {sorted(missing)[:3]}")
    subset = {k: v for k, v in result.items() if k not in ("metrics", "baseline")}
    subset["per_item"] = [i for i in result["per_item"] if i["id"] in wanted]
    return subset | kind_of(subset).summarise(subset)
