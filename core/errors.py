"""Errors a user can act on. Each names the problem and where it is (file, line, column, field)."""

from __future__ import annotations


class CamelError(Exception):
    """Base class for errors caused by user input (files, configs, flags); shown without a traceback."""


class ConfigError(CamelError):
    """A config field or command-line flag has a bad value. `field` is the dotted field name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"config field '{field}': {problem}")


class DataError(CamelError):
    """A data file is malformed. Location parts that are known are included in the message."""

    def __init__(self, path: str, problem: str, line: int | None = None, column: str | int | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        self.problem = problem
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}" if isinstance(column, str) else f", column {column}"
        super().__init__(f"{where}: {problem}")


class RunError(CamelError):
    """A run id, run folder or run state is not usable for what was asked."""
