"""Rendering rows as table, json, csv, markdown or LaTeX."""

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
    latex = "latex"


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


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$",
                  "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"Δ": r"$\Delta$", "±": r"$\pm$", "✓": r"$\checkmark$", "✗": r"$\times$",
                  "—": "---", "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX source that prints it (special characters escaped)."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for char, replacement in _LATEX_UNICODE.items():
        out = out.replace(char, replacement)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def latex_table(rows: list[dict[str, Any]], columns: list[str], headers: dict[str, str],
                title: str | None = None) -> str:
    """A booktabs ``tabular`` (numbers right-aligned) ready to paste into a paper."""
    numeric = [any(_is_number(r.get(c)) for r in rows)
               and all(r.get(c) is None or _is_number(r.get(c)) for r in rows) for c in columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = []
    if title:
        lines.append(f"% {title}")
    lines += [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
              " & ".join(latex_escape(headers.get(c, c)) for c in columns) + r" \\",
              "\\midrule"]
    for row in rows:
        lines.append(" & ".join(latex_escape(cell(row.get(c))) for c in columns) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], columns: list[str], fmt: Format, *,
           title: str | None = None, json_payload: Any = None,
           headers: dict[str, str] | None = None) -> str | None:
    """Render ``rows`` (flat dicts) in ``fmt``; ``json_payload`` overrides the JSON shape.

    ``headers`` maps a column to the heading shown in table, markdown and LaTeX output
    (csv keeps the column names, json the keys). Table output is printed directly through
    rich (returns None); the other formats return text for stdout.
    """
    headers = headers or {}
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
    if fmt is Format.latex:
        return latex_table(rows, columns, headers, title)
    if fmt is Format.markdown:
        lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
                 "|" + "|".join("---:" if any(_is_number(r.get(c)) for r in rows) else "---"
                                for c in columns) + "|"]
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
        table.add_column(headers.get(column, column), overflow="fold",
                         justify="right" if any(_is_number(r.get(column)) for r in rows)
                         else "left")
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in shown))
    console.print(table)
    return None
