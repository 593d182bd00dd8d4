"""The figures README.md and docs/*.md print, each read from a recorded result under benchmarks/results/.

A figure is the printed number followed at once by a comment that says where it comes from: a
result file and a dotted path into it (list items by index; `min` or `max` of a list of rounds,
the spread), or two paths `P / Q` for a ratio, and `* N` when the README prints it N times over
(`* 100`: a share as a percentage; `* 1000`: seconds as milliseconds):

    9,900<!-- parse.json results.2.parse.articles_per_cpu_s --> articles per CPU-second

The number stands for the value rounded as printed: to its decimals, or a whole number to its
trailing zeros (9,900 holds 9,850 up to 9,950). Every result file records the commit and the
machine it was measured at. tests/test_figures.py fails when a printed figure differs from its
result; `python -m benchmarks.figures` (the end of `make bench`) rewrites the figures that differ
and says which it refreshed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from benchmarks.common import REPO

README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]  # every page that prints figures
RECORDED = REPO / "benchmarks" / "results"
REDUCERS = {"min": min, "max": max}  # a path's step into a list of rounds: its slowest or fastest
FIGURE = re.compile(r"(?P<number>\d[\d,]*(?:\.\d+)?)<!-- (?P<file>[\w.-]+\.json) (?P<path>[^\s*]+(?: / [^\s*]+)?)(?: \* (?P<scale>\d+))? -->")


@dataclass
class Figure:
    printed: str  # the number as the README prints it
    file: str  # a result file under benchmarks/results/
    path: str  # dotted, list items by index; "P / Q" a ratio
    scale: int  # the README prints the value this many times over
    line: int  # in its document, from 1
    document: str = "README.md"  # the page that prints it, relative to the repository

    @property
    def source(self) -> str:
        return f"{self.file} {self.path}" + (f" * {self.scale}" if self.scale != 1 else "")

    def value(self, results: Path = RECORDED) -> float:
        """The recorded value (a ratio when the path is ``P / Q``); an error that names the
        figure, the file and what is missing."""
        where = f"{self.document} line {self.line}: {self.source}"
        try:
            record = json.loads((results / self.file).read_text())
        except FileNotFoundError:
            raise LookupError(f"{where}: no {results / self.file}") from None
        numerator, _, denominator = self.path.partition(" / ")
        value = _number_at(record, numerator, where)
        if denominator:
            value /= _number_at(record, denominator, where)
        return value * self.scale

    def as_printed(self, value: float) -> str:
        """``value`` rounded and written as this figure is printed (decimals, trailing zeros, commas)."""
        digits = self.printed.replace(",", "")
        decimals = len(digits.partition(".")[2])
        zeros = 0 if decimals else len(digits) - len(digits.rstrip("0"))
        if zeros == len(digits):  # a printed 0 holds no trailing zeros of rounding
            zeros = 0
        rounded = Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals)) if decimals else round(Decimal(repr(value)), -zeros)
        return f"{rounded:,.{decimals}f}" if "," in self.printed else f"{rounded:.{decimals}f}"

    def stale(self, results: Path = RECORDED) -> str | None:
        """The figure as its result says it should be printed, when the README prints another."""
        expected = self.as_printed(self.value(results))
        return expected if expected != self.printed else None


def _number_at(record: dict, path: str, where: str) -> float:
    value = record
    for step in path.split("."):
        if isinstance(value, list) and step in REDUCERS:
            value = REDUCERS[step](value)
            continue
        try:
            value = value[int(step)] if isinstance(value, list) else value[step]
        except (KeyError, IndexError, ValueError, TypeError):
            raise LookupError(f"{where}: no {step!r} on the way to {path}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise LookupError(f"{where}: {path} is {value!r}, not a number")
    return value


def figures(text: str, document: str = "README.md") -> list[Figure]:
    """Every figure in ``text`` (``document``'s), in order."""
    return [_figure(match, text, document) for match in FIGURE.finditer(text)]


def _figure(match: re.Match, text: str, document: str) -> Figure:
    line = text.count("\n", 0, match.start()) + 1
    return Figure(match["number"], match["file"], match["path"], int(match["scale"] or 1), line, document)


def _name(document: Path) -> str:
    return str(document.relative_to(REPO)) if document.is_relative_to(REPO) else document.name


def provenance(file: str, results: Path = RECORDED) -> str:
    """Where a result file was measured: its commit and machine (an error when it does not say)."""
    record = json.loads((results / file).read_text())
    if not record.get("commit") or not record.get("machine"):
        raise LookupError(f"{results / file} does not record the commit and the machine it was measured at")
    cpu = record["machine"].get("cpu", "?")
    return f"commit {record['commit'][:12]}, {record['machine'].get('cores', '?')} cores ({cpu})"


def refresh(readme: Path = README, results: Path = RECORDED) -> list[str]:
    """Rewrite the figures of the page ``readme`` that differ from their results; one line per figure refreshed."""
    text = readme.read_text()
    refreshed = []

    def rewritten(match: re.Match) -> str:
        figure = _figure(match, text, _name(readme))
        expected = figure.stale(results)
        if expected is None:
            return match[0]
        refreshed.append(f"{figure.document} line {figure.line}: {figure.printed} -> {expected}  ({figure.source}, {provenance(figure.file, results)})")
        return expected + match[0][len(figure.printed):]

    new = FIGURE.sub(rewritten, text)
    if new != text:
        readme.write_text(new)
    return refreshed


def main() -> None:
    found = [f for document in DOCUMENTS for f in figures(document.read_text(), _name(document))]
    files = sorted({f.file for f in found})
    print(f"README.md and docs/ print {len(found)} figures from {len(files)} recorded results:")
    for file in files:
        print(f"  {file}: {sum(f.file == file for f in found)} figures, measured at {provenance(file)}")
    refreshed = [line for document in DOCUMENTS for line in refresh(document)]
    print(f"refreshed {len(refreshed)} figures" + (":" if refreshed else " (every one already as recorded)"))
    for line in refreshed:
        print(f"  {line}")


if __name__ == "__main__":
    main()
