"""User-facing errors.

Every error caused by bad input (a file, a row, an id, a config value) is an
`IloraError`. The CLI prints it as one line and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class IloraError(Exception):
    """An error the user can fix: bad input, bad config, missing file."""


class DataError(IloraError):
    """A dataset file is malformed. The message names the file, the row and the id."""

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        row: int | None = None,
        item: int | None = None,
        expected: str | None = None,
        line: int | None = None,
    ) -> None:
        where = str(path) if path is not None else "<data>"
        if row is not None:
            where += f", row {row}"
        if line is not None:  # a text file's 1-based line, where it differs from the row
            where += f" (line {line})"
        if item is not None:
            where += f", id {item}"
        text = f"{where}: {problem}"
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)
        self.path = None if path is None else Path(path)
        self.row = row
        self.item = item
        self.line = line


class ConfigError(IloraError):
    """A configuration value or combination is invalid."""
