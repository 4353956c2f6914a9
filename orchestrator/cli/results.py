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
    watch: bool = typer.Option(False, "--watch", help="A live view, redrawn every --interval "
                               "seconds: counts, progress, throughput and ETA per sweep, the "
                               "running trials with host and GPU, the latest failures. Ends "
                               "once nothing is pending or running (or on Ctrl-C)."),
    interval: float = typer.Option(None, "--interval", help="Seconds between refreshes of "
                                   "--watch (default 2).", show_default=False),
) -> None:
    """Trial counts per status, per sweep (with --watch: a live view of running sweeps)."""
    from orchestrator import queries
    from orchestrator.db.models import TRIAL_STATUSES

    if watch:
        from orchestrator.cli import watch as live_view
        from orchestrator.errors import BadInput

        if fmt is not Format.table:
            raise BadInput(f"--format {fmt.value} cannot be watched: drop --watch for "
                           f"{fmt.value}, or drop --format for the live view")
        period = live_view.check_interval(
            live_view.DEFAULT_INTERVAL_S if interval is None else interval)
        code = live_view.watch(ctx.obj["db"], sweep, period)
        if code:
            raise typer.Exit(code)
        return
    if interval is not None:
        from orchestrator.errors import BadInput

        raise BadInput("--interval applies only to --watch; add --watch or drop --interval")
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
    metric: str = typer.Option("score", "--metric", help="score, perf_norm, speed_norm or any "
                               "stored metric; ranked best first in its direction."),
    sweep: str = typer.Option(None, "--sweep", help="Only this sweep."),
    model: str = typer.Option(None, "--model", help="Only this model id."),
    method: str = typer.Option(None, "--method", help="Only this method (its baselines stay)."),
    dataset: str = typer.Option(None, "--dataset", help="Only this dataset name."),
    top: int = typer.Option(None, "--top", min=1, help="Only the best N rows."),
    include_failed: bool = typer.Option(False, "--all", help="Also failed, invalid and "
                                        "timed-out trials, unranked, with their status."),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Trials ranked by a metric, best first (direction-aware); the baseline is marked."""
    print_leaderboard(ctx.obj["db"], metric=metric, sweep=sweep, fmt=fmt, top=top,
                      include_failed=include_failed, model=model, method=method,
                      dataset=dataset)


def leaderboard_table(rows: list[dict], metric: str, *, include_failed: bool = False,
                      fmt: Format = Format.table) -> tuple[list[dict], list[str], dict[str, str]]:
    """Flat rows, columns and headings of a leaderboard (for ``sweep leaderboard`` and
    ``sweep report``).

    The ranked metric comes first, then its change against the baseline (for ``score``,
    the change of the sweep's quality metric), PerfNorm, SpeedNorm with its timing noise,
    the time per token, parameters and size. Failed rows have no rank.
    """
    from orchestrator.queries import COMPUTED_METRICS, SPEED_METRIC

    qualities = {row["quality_metric"] for row in rows}
    quality = qualities.pop() if len(qualities) == 1 else "quality"
    compared = quality if metric in COMPUTED_METRICS else metric
    flat = []
    rank = 0
    for row in rows:
        ranked = row["status"] == "done" and (
            row[metric] if metric in COMPUTED_METRICS else row["metrics"].get(metric)
        ) is not None
        rank += ranked
        quality_value = row["metrics"].get(row["quality_metric"])
        flat.append({
            "rank": rank if ranked else None, "sweep": row["sweep"], "model": row["model"],
            "method": row["method"] + (" (baseline)" if row["is_baseline"] else ""),
            "rate": row["rate"], "dataset": row["dataset"],
            "score": row["score"], "perf_norm": row["perf_norm"],
            "speed_norm": row["speed_norm"], "speed_noise": row["speed_norm_noise"],
            "quality": quality_value, metric: row[metric] if metric in COMPUTED_METRICS
            else row["metrics"].get(metric),
            "delta": row["delta"], "delta_pct": row["delta_pct"],
            SPEED_METRIC: row["metrics"].get(SPEED_METRIC),
            "params": row["metrics"].get("params"), "size_mb": row["metrics"].get("size_mb"),
            "status": row["status"] if row["failure_reason"] is None
            else f"{row['status']} ({row['failure_reason']})",
            "trial_key": row["trial_key"][:12],
        })
    headers = {"delta": f"Δ {compared}", "delta_pct": "Δ %", "speed_noise": "± speed_norm",
               "quality": quality, SPEED_METRIC: "ms/token", "size_mb": "size MB"}
    if metric == "score":
        columns = ["rank", "model", "method", "rate", "dataset", "score", "perf_norm",
                   "speed_norm", "speed_noise", "quality", "delta", "delta_pct", SPEED_METRIC,
                   "params", "size_mb"]
    elif metric in COMPUTED_METRICS:
        columns = ["rank", "model", "method", "rate", "dataset", metric, "score", "quality",
                   "delta", "delta_pct", SPEED_METRIC, "params", "size_mb"]
    else:
        columns = ["rank", "model", "method", "rate", "dataset", metric, "delta", "delta_pct",
                   "perf_norm", "speed_norm", "params", "size_mb"]
    if include_failed:
        columns.append("status")
    columns.append("trial_key")
    if fmt is Format.csv:  # a file for other tools: every sweep named, headings as keys
        columns[1:1] = ["sweep"]
        columns.insert(columns.index("quality") + 1 if "quality" in columns else len(columns),
                       "quality_metric")
        for item, row in zip(flat, rows, strict=True):
            item["quality_metric"] = row["quality_metric"]
        headers = {}
    # Keep one column per key (the ranked metric may be one of the fixed ones).
    return flat, list(dict.fromkeys(columns)), headers


def print_leaderboard(db_url: str, *, metric: str, sweep: str | None, fmt: Format,
                      top: int | None, include_failed: bool, model: str | None = None,
                      method: str | None = None, dataset: str | None = None) -> None:
    """Query and print a leaderboard (shared by ``leaderboard`` and ``launch``)."""
    from orchestrator import queries

    with read_session(db_url) as session:
        # The database ranks; only the best `top` rows are read and built.
        rows = queries.leaderboard(session, metric=metric, sweep=sweep,
                                   include_failed=include_failed, limit=top, model=model,
                                   method=method, dataset=dataset)
    flat, columns, headers = leaderboard_table(rows, metric, include_failed=include_failed,
                                               fmt=fmt)
    chosen = [f"{name} {value}" for name, value in
              (("sweep", sweep), ("model", model), ("method", method), ("dataset", dataset))
              if value]
    title = f"leaderboard by {metric}" + (f" — {', '.join(chosen)}" if chosen else "")
    text = render(flat, columns, fmt, title=title, json_payload=rows, headers=headers)
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
