"""``sweep show TRIAL_KEY_PREFIX``: one trial in full, from the database only."""

from __future__ import annotations

import json
from typing import Any

import typer

from orchestrator.cli.render import Format, cell, make_console


def register(app: typer.Typer) -> None:
    """Add the ``show`` command to ``app``."""
    app.command()(show)


def show(
    ctx: typer.Context,
    key_prefix: str = typer.Argument(..., metavar="TRIAL_KEY_PREFIX",
                                     help="The first characters (4 or more) of a trial key."),
    sweep: str = typer.Option(None, "--sweep", help="Only look in this sweep."),
    fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
) -> None:
    """Everything stored about one trial: identity, config, metrics, evidence, environment."""
    from orchestrator import queries
    from orchestrator.cli.results import read_session
    from orchestrator.errors import BadInput

    if fmt not in (Format.table, Format.json):
        raise BadInput(f"sweep show supports --format table or json, not {fmt.value}")
    with read_session(ctx.obj["db"]) as session:
        detail = queries.trial_detail(session, key_prefix, sweep)
    if fmt is Format.json:
        print(json.dumps(detail, indent=2, default=str))
        return
    print_detail(detail)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def print_detail(detail: dict[str, Any]) -> None:
    """Print a :func:`orchestrator.queries.trial_detail` dict as rich tables."""
    from rich.table import Table
    from rich.text import Text

    console = make_console()

    def fields(title: str, pairs: list[tuple[str, Any]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for name, value in pairs:
            text = _json(value) if isinstance(value, dict | list) else cell(value)
            # Text, not markup: stored strings may contain [brackets].
            table.add_row(name, Text(text))
        console.print(table)

    fields(f"trial {detail['trial_key']}", [
        ("sweep", detail["sweep"]), ("trial_key", detail["trial_key"]),
        ("model", detail["model"]), ("method", detail["method"]),
        ("params", detail["params"]), ("rate", detail["rate"]),
        ("dataset", detail["dataset"]), ("baseline", "yes" if detail["is_baseline"] else "no"),
        ("status", detail["status"]), ("attempts", detail["attempts"]),
        ("host", detail["host"]), ("gpus", "cpu" if detail["gpus"] == "" else detail["gpus"]),
        ("created_at", detail["created_at"]),
        ("started_at", detail["started_at"]), ("finished_at", detail["finished_at"]),
        ("duration_s", detail["duration_s"]),
    ])

    metrics = Table(title="metrics", title_justify="left")
    for column in ("name", "value", "direction", "note"):
        metrics.add_column(column, overflow="fold")
    for metric in detail["metrics"]:
        metrics.add_row(*(Text(cell(metric[c])) for c in ("name", "value", "direction", "note")))
    if not detail["metrics"]:
        metrics.add_row("-", "-", "-", "-")
    console.print(metrics)

    evidence = detail["evidence"]
    if evidence is None:
        console.print("evidence: none", markup=False, highlight=False)
    else:
        fields("evidence", list(evidence.items()))

    environment = detail["environment"]
    if environment is None:
        console.print("environment: none", markup=False, highlight=False)
    else:
        fields("environment", [(k, environment[k])
                               for k in ("hardware", "packages", "git_sha", "fingerprint")])

    fields("config", [("config", detail["config"])])

    error = detail["error"]
    if error is not None:
        fields("error", [("reason", error.get("reason")), ("type", error["type"]),
                        ("message", error["message"])])
        if error.get("traceback"):
            console.print("traceback:", markup=False, highlight=False)
            console.print(Text(error["traceback"].rstrip("\n")), soft_wrap=True)
