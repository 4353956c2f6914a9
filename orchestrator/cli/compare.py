"""``sweep compare``: published numbers (``sweeps/references``) next to our reproduction."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli.render import Format, render


def register(app: typer.Typer) -> None:
    """Add the command of this module to ``app``."""
    app.command()(compare)


def compare(
    ctx: typer.Context,
    sweep: str = typer.Option(None, "--sweep", help="Only trials of this sweep."),
    references: list[Path] = typer.Option(
        None, "--references", help="A reference file or a directory of them (*.yaml); "
        "repeatable. Default: sweeps/references/ under the current directory."),
    only_run: bool = typer.Option(False, "--only-run", help="Leave out the entries no "
                                  "finished trial matches."),
    fail_outside: bool = typer.Option(False, "--fail-outside", help="Exit with code 1 when "
                                      "any matched entry is outside its tolerance (for CI)."),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Paper vs reproduction: each published number, ours, Δ, Δ % and ✓/✗ within tolerance.

    A report: the exit code is 0 whatever the verdicts, unless --fail-outside.
    """
    from orchestrator import compare as comparison
    from orchestrator.cli.results import read_session
    from orchestrator.errors import BadInput
    from orchestrator.references import DEFAULT_REFERENCES, load_references

    if not references:
        if not DEFAULT_REFERENCES.is_dir():
            raise BadInput(f"--references: no {DEFAULT_REFERENCES}/ in {Path.cwd()}; run from "
                           "the project root or give --references FILE_OR_DIR")
        references = [DEFAULT_REFERENCES]
    # References first: a mistake in them is reported even before any sweep has run.
    entries = load_references(references)
    with read_session(ctx.obj["db"]) as session:
        rows = comparison.compare(session, entries, sweep=sweep)
    if only_run:
        rows = [row for row in rows if row["status"] != comparison.NOT_RUN]
    _print(rows, fmt, sweep)
    if fail_outside:
        outside = comparison.summary(rows)["outside"]
        if outside:
            # A SweepError rather than typer.Exit: it also prints one line saying why.
            raise comparison.OutsideTolerance(
                f"{outside} matched entr{'y is' if outside == 1 else 'ies are'} outside "
                "tolerance (--fail-outside)")


def _print(rows: list[dict], fmt: Format, sweep: str | None) -> None:
    """Tables per source (table, markdown) with the summary line; one flat table otherwise."""
    from orchestrator.compare import COMPARE_COLUMNS, COMPARE_HEADERS, summary_line

    where = f" — sweep {sweep}" if sweep else ""
    if fmt in (Format.json, Format.csv, Format.latex):
        columns = COMPARE_COLUMNS if fmt is not Format.csv else [
            *COMPARE_COLUMNS[:-1], "tolerance_abs", "within", "sweep", "trial_key", "notes",
            "file", "entry"]
        headers = {} if fmt is Format.csv else COMPARE_HEADERS
        text = render(rows, columns, fmt, title=f"paper vs reproduction{where}: "
                      f"{summary_line(rows)}", headers=headers)
        if text is not None:
            typer.echo(text)
        return
    if not rows:
        typer.echo("no reference entry to show")
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    columns = [c for c in COMPARE_COLUMNS if c != "source"]
    for source, group in by_source.items():
        if fmt is Format.markdown:
            typer.echo(f"### {source}\n")
            typer.echo(render(group, columns, fmt, headers=COMPARE_HEADERS))
            typer.echo("")
        else:
            render(group, columns, fmt, title=f"{source}{where}", headers=COMPARE_HEADERS)
    typer.echo(summary_line(rows))
    unknown = sorted({row["method_name"] for row in rows if not row["known_method"]})
    if unknown:
        typer.echo(f"not methods of this project (never run here): {', '.join(unknown)}")
