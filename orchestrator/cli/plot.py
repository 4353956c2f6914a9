"""``sweep plot SWEEP``: quality vs speed with the Pareto front, and metrics vs rate, as images."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``plot`` command to ``app``."""
    app.command()(plot)


def plot(
    ctx: typer.Context,
    sweep: str = typer.Argument(..., help="The sweep to plot."),
    out: Path = typer.Option(Path("plots"), "--out", "-o", help="Directory for the images "
                             "(created if missing)."),
    formats: list[str] = typer.Option(None, "--format", help="png or svg; repeat for both "
                                      "(default: png)."),
    quality: str = typer.Option(None, "--quality", help="Quality metric on the y axis "
                                "(default: the spec's score.quality_metric, else perplexity)."),
    speed: str = typer.Option(None, "--speed", help="Speed metric on the x axis (default: "
                              "decode_ms_per_token; any stored metric, e.g. "
                              "decode_tokens_per_s)."),
    metrics: list[str] = typer.Option(None, "--metric", help="Metric to plot against the rate; "
                                      "repeatable (default: the quality metric and score)."),
) -> None:
    """Plot quality vs speed with the Pareto front, and each metric vs rate per method: one
    figure per (model, dataset) of the sweep; prints the paths written."""
    from orchestrator.cli.results import read_session
    from orchestrator.errors import BadInput
    from orchestrator.plots import FORMATS, plot_sweep

    chosen = [f.lower() for f in formats or ["png"]]
    for fmt in chosen:
        if fmt not in FORMATS:
            raise BadInput(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {out} is a file; give a directory for the images")
    skipped: list[str] = []
    with read_session(ctx.obj["db"]) as session:
        written = plot_sweep(session, sweep, out, formats=chosen, quality=quality, speed=speed,
                             metrics=metrics or None, skipped=skipped)
    if not written:
        raise BadInput(f"nothing to plot in sweep {sweep}: " + "; ".join(skipped))
    for reason in skipped:  # the figures the data could not make, and why
        print(f"note: {reason}", file=sys.stderr)
    for plot_file in written:
        print(plot_file.path)
