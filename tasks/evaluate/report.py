"""Results as people read them: ``report.md`` (a table per benchmark, every metric) and row
tables of headline metrics (one evaluation, or several side by side)."""

from __future__ import annotations

import json
from typing import Sequence

from tasks.evaluate.results import RESULTS_FILE, headline_metric, kind_of
from tasks.evaluate.statistics import format_value

REPORT_FILE = "report.md"


def _interval(metric: str, m: dict) -> str:
    return f"{format_value(metric, m['ci95'][0])} – {format_value(metric, m['ci95'][1])}"


def _baseline(result: dict, metric: str) -> str | None:
    base = (result["baseline"] or {}).get(metric)
    return f"{format_value(metric, base['value'])} ({base['name']})" if base else None


def render_markdown(results: Sequence[dict]) -> str:
    """One table per benchmark: metric, value, 95% CI, n, baseline."""
    tables: dict[str, list[str]] = {}
    for r in results:
        kind = kind_of(r)
        rows = tables.setdefault(kind.title(r), ["| metric | value | 95% CI | n | baseline |", "| --- | --- | --- | --- | --- |"])
        for metric, m in r["metrics"].items():
            base = _baseline(r, metric) or "–"
            rows.append(f"| {metric} ({kind.setting(r)}) | {format_value(metric, m['value'])} | {_interval(metric, m)} | {m['n']} | {base} |")
    return "\n\n".join(f"### {title}\n\n" + "\n".join(rows) for title, rows in tables.items()) + "\n"


def _headline_columns(result: dict) -> dict:
    """The first columns of a row: the benchmark, how it was scored, its headline metric."""
    return {"benchmark": result["name"], "how": kind_of(result).how(result), "metric": headline_metric(result)}


def evaluation_rows(artifact) -> list[dict]:
    """The results as table rows: benchmark, metric, value, 95% CI, n, baseline, and the clean score."""
    rows = []
    for r in json.loads(artifact.file(RESULTS_FILE).read_text()):
        row = _headline_columns(r)
        metric = row["metric"]
        m = r["metrics"][metric]
        row |= {"value": format_value(metric, m["value"]), "ci95": _interval(metric, m), "n": m["n"], "baseline": _baseline(r, metric) or ""}
        if "contamination" in r:
            c = r["contamination"]
            clean = c.get("clean", {}).get("metrics", {}).get(metric)
            row["in pretraining corpus"] = c["overlapping_items"]
            row["clean value"] = f"{format_value(metric, clean['value'])} (n={clean['n']})" if clean else "–"
        rows.append(row)
    return rows


def comparison_rows(columns: Sequence[tuple[str, object]]) -> list[dict]:
    """Evaluations side by side (the base model, then each fine-tuning stage): a row per benchmark
    and way of scoring it, its main metric under each column's label, then the baseline (the
    best constant answer, or PubMedQA's majority class) of the same items. ``columns``: (label, evaluate artifact)."""
    rows: dict[tuple, dict] = {}
    for label, artifact in columns:
        for r in json.loads(artifact.file(RESULTS_FILE).read_text()):
            first = _headline_columns(r)
            metric = first["metric"]
            row = rows.setdefault(tuple(first.values()), first)
            row[label] = format_value(metric, r["metrics"][metric]["value"])
            row.setdefault("baseline", _baseline(r, metric) or "–")
    labels = [label for label, _ in columns]
    return [{k: row.get(k, "–") for k in ("benchmark", "how", "metric", *labels, "baseline")} for row in rows.values()]


def rows_markdown(rows: Sequence[dict]) -> str:
    """Table rows (dicts) as a markdown table: a column for every key any row has, "–" where a row has none."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(k, "–")) for k in keys) + " |" for row in rows]) + "\n"
