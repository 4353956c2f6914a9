"""Rendering rows as table, json, csv or markdown."""

from __future__ import annotations

import csv
import io
import json
import math
from enum import StrEnum
from typing import Any


class Format(StrEnum):
    """Output formats of every read command."""

    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


def cell(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def render(rows: list[dict[str, Any]], columns: list[str], fmt: Format, *,
           title: str | None = None, json_payload: Any = None) -> str | None:
    """Render ``rows`` (flat dicts) in ``fmt``; ``json_payload`` overrides the JSON shape.

    Table output is printed directly through rich (returns None); the other formats
    return text for stdout.
    """
    if fmt is Format.json:
        return json.dumps(rows if json_payload is None else json_payload, indent=2, default=str)
    if fmt is Format.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
        return buffer.getvalue().rstrip("\n")
    if fmt is Format.markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(cell(row.get(c)).replace("|", "\\|")
                                            for c in columns) + " |")
        return "\n".join(lines)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    Console().print(table)
    return None
