"""``sweep status``, ``sweep leaderboard`` and ``sweep list``: reads of the database only."""

from __future__ import annotations

import typer

from orchestrator.cli.render import Format, render


def register(app: typer.Typer) -> None:
    """Add the commands of this group to ``app``."""
    app.command()(status)
    app.command()(leaderboard)
    app.command(name="list")(list_sweeps)


def read_session(db_url: str):
    """A session on an existing, up-to-date results database (never creates one)."""
    from orchestrator.db.engine import ensure_schema, session_scope

    return session_scope(ensure_schema(db_url, create=False))


def status(
    ctx: typer.Context,
    sweep: str = typer.Option(None, "--sweep", help="Only this sweep."),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Trial counts per status, per sweep."""
    from orchestrator import queries
    from orchestrator.db.models import TRIAL_STATUSES

    with read_session(ctx.obj["db"]) as session:
        sweeps = queries.sweep_status(session, sweep)
    rows = [{"sweep": s["name"], **s["counts"], "total": s["total"],
             "updated": s.get("updated_at")} for s in sweeps]
    text = render(rows, ["sweep", *TRIAL_STATUSES, "total", "updated"], fmt, title="sweeps",
                  json_payload={"sweeps": sweeps})
    if text is not None:
        print(text)


def leaderboard(
    ctx: typer.Context,
    metric: str = typer.Option("score", "--metric", help="score or any stored metric."),
    sweep: str = typer.Option(None, "--sweep", help="Only this sweep."),
    top: int = typer.Option(None, "--top", min=1, help="Only the best N rows."),
    include_failed: bool = typer.Option(False, "--all", help="Also failed trials."),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Trials ranked by a metric, best first (direction-aware); the baseline is included."""
    print_leaderboard(ctx.obj["db"], metric=metric, sweep=sweep, fmt=fmt, top=top,
                      include_failed=include_failed)


def print_leaderboard(db_url: str, *, metric: str, sweep: str | None, fmt: Format,
                      top: int | None, include_failed: bool) -> None:
    """Query and print a leaderboard (shared by ``leaderboard`` and ``launch``)."""
    from orchestrator import queries

    with read_session(db_url) as session:
        # The database ranks; only the best `top` rows are read and built.
        rows = queries.leaderboard(session, metric=metric, sweep=sweep,
                                   include_failed=include_failed, limit=top)
    shown = ["perplexity", "decode_ms_per_token", "params"]
    if metric != "score" and metric not in shown:
        shown.insert(0, metric)
    flat = []
    for rank, row in enumerate(rows, start=1):
        flat.append({"rank": rank, "sweep": row["sweep"], "model": row["model"],
                     "method": row["method"] + (" (baseline)" if row["is_baseline"] else ""),
                     "rate": row["rate"], "dataset": row["dataset"], "score": row["score"],
                     "perf_norm": row.get("perf_norm"), "speed_norm": row.get("speed_norm"),
                     "status": row.get("status"), "trial_key": row["trial_key"][:12],
                     **{m: row["metrics"].get(m) for m in shown}})
    columns = ["rank", "model", "method", "rate", "dataset", "score", *shown, "trial_key"]
    if include_failed:
        columns.insert(-1, "status")
    if fmt is Format.csv:
        columns = ["rank", "sweep", "model", "method", "rate", "dataset", "score", "perf_norm",
                   "speed_norm", *shown, "trial_key"]
    title = f"leaderboard by {metric}" + (f" — sweep {sweep}" if sweep else "")
    text = render(flat, columns, fmt, title=title, json_payload=rows)
    if text is not None:
        print(text)


def list_sweeps(
    ctx: typer.Context,
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Every sweep in the database with its trial counts."""
    from orchestrator import queries
    from orchestrator.db.models import TRIAL_STATUSES

    with read_session(ctx.obj["db"]) as session:
        sweeps = queries.list_sweeps(session)
    rows = [{"sweep": s["name"], "trials": s.get("trials"),
             **{k: s.get("counts", {}).get(k, 0) for k in TRIAL_STATUSES},
             "models": ", ".join(s.get("models", [])), "methods": ", ".join(s.get("methods", [])),
             "created": s.get("created_at")} for s in sweeps]
    text = render(rows, ["sweep", "trials", *TRIAL_STATUSES, "models", "methods", "created"], fmt,
                  title="sweeps", json_payload=sweeps)
    if text is not None:
        print(text)
