"""QAFormatError: input in no accepted format, named by file, row, problem and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXPECTED = "the records of a dataset tasks/qa/registry.py lists"


class QAFormatError(ValueError):
    """The input is not one of the accepted formats.

    The message names the file, the row (when there is one), the problem and what was expected;
    the same facts are on ``path``, ``row`` and ``expected``.
    """

    def __init__(self, path: Path | str, row: object, problem: str, expected: str = EXPECTED):
        self.path = str(path)
        self.row = None if row is None else str(row)
        self.problem = problem
        self.expected = expected
        where = f"{self.path}, {self.row}" if self.row is not None else self.path
        super().__init__(f"{where}: {problem}; expected {expected}")


def json_type(value: Any) -> str:
    """What a value is, in JSON's words: errors say this, never the value (it is the file's content)."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
