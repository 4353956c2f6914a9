"""Rendering rows as table, json, csv or markdown."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
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
        if value.is_integer() and abs(value) >= 1e4:
            return f"{int(value):,}"  # counts such as parameters read better whole
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def make_console(stderr: bool = False) -> Any:
    """A rich console; when not writing to a terminal, wide enough not to fold table cells."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=240)
    return console


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
    from rich.table import Table

    console = make_console()
    # A column with one value in every row says nothing per row: move it to the title.
    constant = [c for c in columns if title and len(rows) > 1
                and c in ("sweep", "model", "dataset") and len({cell(r.get(c)) for r in rows}) == 1]
    if constant:
        title += " — " + ", ".join(f"{c} {cell(rows[0].get(c))}" for c in constant)
    table = Table(title=title)
    shown = [c for c in columns if c not in constant]
    for column in shown:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in shown))
    console.print(table)
    return None
