"""``sweep export``: copy results from the database into other tools (MLflow for now)."""

from __future__ import annotations

import sys

import typer


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""
    app.command()(export)


def export(
    ctx: typer.Context,
    mlflow_uri: str = typer.Option(
        None, "--mlflow", metavar="URI",
        help="MLflow tracking URI to export to: http(s)://server, sqlite:///mlflow.db, or a "
             "directory / file: URI for MLflow's file store. Needs the mlflow extra of "
             "compress-sweep."),
    sweeps: list[str] = typer.Option(
        None, "--sweep", metavar="NAME",
        help="Only this sweep; repeatable (default: every sweep)."),
    experiment: str = typer.Option(
        None, "--experiment", metavar="NAME",
        help="MLflow experiment for every run (default: one experiment per sweep, named "
             "after it)."),
    include_failed: bool = typer.Option(
        True, "--include-failed/--done-only", help="Also export failed and timed-out trials "
                                                   "(as FAILED runs), or only finished ones."),
) -> None:
    """Export each finished trial as an MLflow run (params, metrics, evidence, environment);
    re-exporting updates the runs of earlier exports instead of adding new ones, pending and
    running trials are skipped. Prints how many runs were created, updated and unchanged."""
    from orchestrator.errors import BadInput

    if mlflow_uri is None:
        raise BadInput("nothing to export to: give --mlflow URI (e.g. --mlflow "
                       "sqlite:///mlflow.db)")
    from orchestrator.cli.results import read_session
    from orchestrator.export_mlflow import export_to_mlflow, require_mlflow

    # Checked before the database is opened: the missing extra is the first thing to fix.
    require_mlflow()
    with read_session(ctx.obj["db"]) as session:
        summary = export_to_mlflow(session, mlflow_uri, sweeps=sweeps or None,
                                   experiment=experiment, include_failed=include_failed)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    for line in summary.lines():
        print(line)
