"""``sweep report SWEEP``: a Markdown report of one sweep, from the database only."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""
    app.command()(report)


def report(
    ctx: typer.Context,
    sweep: str = typer.Argument(..., help="The sweep to report on."),
    out: Path = typer.Option(None, "--out", "-o", help="The Markdown file to write "
                             "(default: reports/SWEEP.md); plots go next to it."),
    references: list[Path] = typer.Option(None, "--references", help="Reference files or "
                                          "directories (default: sweeps/references if present)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Render and embed the plots."),
    image_format: str = typer.Option("png", "--image-format", help="png or svg."),
) -> None:
    """Write the sweep's spec, environment, leaderboard, paper-vs-reproduction table, plots,
    failures and evidence to one Markdown file."""
    from orchestrator.cli.results import read_session
    from orchestrator.errors import BadInput
    from orchestrator.report import _slug, write_report

    if image_format not in ("png", "svg"):
        raise BadInput(f"--image-format must be png or svg, not {image_format!r}")
    for path in references or ():
        if not path.exists():
            raise BadInput(f"--references: {path} does not exist; give a reference file or "
                           "directory (see sweeps/references/)")
    target = out if out is not None else Path("reports") / f"{_slug(sweep)}.md"
    if target.exists() and target.is_dir():
        raise BadInput(f"--out: {target} is a directory; give the Markdown file to write, "
                       f"e.g. {target / (_slug(sweep) + '.md')}")
    with read_session(ctx.obj["db"]) as session:
        written = write_report(session, sweep, target, references=references or None,
                               plots=plots, image_format=image_format)
    print(written.path)
    for image in written.images:
        print(image)
