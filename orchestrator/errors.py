"""Domain exceptions, each carrying the one-line message the CLI prints and its exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SweepError(Exception):
    """Base of every error the CLI reports as one line (no traceback unless --debug).

    ``exit_code`` is 2 for bad input and 1 for failures.
    """

    exit_code: int = 1


class SpecError(SweepError):
    """A sweep spec with one or more problems; each problem names its YAML path."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in problems))


class BadInput(SweepError):
    """Bad command-line input (unknown sweep, unknown metric, bad option)."""

    exit_code = 2


class NoDatabase(SweepError):
    """No results database where one was expected (a read command before any launch)."""

    exit_code = 2


class SchemaOutOfDate(SweepError):
    """The results database is at an older schema revision; `sweep db upgrade` fixes it."""

    exit_code = 1


class UnknownSchema(SweepError):
    """The database holds tables this version cannot vouch for (a newer or foreign schema)."""

    exit_code = 1


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when ``name`` is close to one of ``choices``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
