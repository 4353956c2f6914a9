"""``sweep status --watch``: a live view of running sweeps, redrawn after each poll.

Each poll is one short read-only transaction (:func:`orchestrator.live.watch_snapshot`);
between polls no connection is in a transaction, so the view never holds a lock or a
snapshot that a ``sweep launch`` writing the same database (SQLite WAL or PostgreSQL) would
wait for. The view is a rich ``Live`` redrawn in place once per poll (no auto refresh: a
redraw without new data only flickers). It ends by itself once no watched sweep has
pending or running trials, and quietly on Ctrl-C; it writes nothing, anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.cli.render import cell, make_console

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.1
MAX_RUNNING_ROWS = 20  # the longest-running ones; the rest are counted
MAX_MESSAGE = 80
MAX_NAME = 40


def check_interval(interval: float) -> float:
    """``interval`` if it is a usable refresh period; BadInput naming the fix otherwise."""
    import math

    from orchestrator.errors import BadInput

    if not math.isfinite(interval) or interval < MIN_INTERVAL_S:
        raise BadInput(f"--interval must be a number of seconds of at least {MIN_INTERVAL_S:g} "
                       f"(not {interval:g}); for example --interval 2")
    return interval


def duration_text(seconds: float | None) -> str:
    """``1h02m03s`` / ``4m05s`` / ``12s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _gpus_text(gpus: str | None) -> str:
    # NULL: the worker has not announced itself yet; "": it runs on CPU.
    if gpus is None:
        return "-"
    return gpus or "cpu"


def _time_text(moment: datetime | None) -> str:
    # UTC, as every time the results database holds and the header says.
    return "-" if moment is None else moment.astimezone(UTC).strftime("%H:%M:%S")


def _name_text(name: str) -> str:
    # Model ids and dataset paths can be long; the rest of a row matters more.
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1] + "…"


@dataclass(frozen=True)
class _Column:
    """A column of the view. ``drop`` orders which columns go first when the terminal is
    too narrow for all of them on one line (0: never); ``wrap`` columns (free text) may
    take several lines instead, down to ``WRAP_MIN`` characters."""

    name: str
    justify: str = "left"
    drop: int = 0
    wrap: bool = False


BAR_WIDTH = 20
WRAP_MIN = 24


def _text_width(value: Any) -> int:
    return BAR_WIDTH if not isinstance(value, str) else len(value)


def _fit(columns: list[_Column], rows: list[list[Any]], width: int) -> list[int]:
    """Indices of the columns that fit ``width`` with every row on one line (dropping
    columns in their ``drop`` order; never-dropped columns stay even if they overflow)."""

    def column_width(i: int) -> int:
        natural = max([len(columns[i].name), *(_text_width(row[i]) for row in rows)])
        return (min(natural, WRAP_MIN) if columns[i].wrap else natural) + 3  # padding, rule

    keep = list(range(len(columns)))
    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop):
        if sum(column_width(j) for j in keep) + 1 <= width:
            break
        keep.remove(i)
    return keep


def _table(title: str, columns: list[_Column], rows: list[list[Any]], width: int) -> Any:
    from rich.table import Table

    keep = _fit(columns, rows, width)
    table = Table(title=title, title_justify="left", expand=False)
    for i in keep:
        # One line per row in a live view (a row that wraps makes the view jump about);
        # only free text may wrap, and rich narrows wrapping columns first.
        table.add_column(columns[i].name, justify=columns[i].justify,  # type: ignore[arg-type]
                         no_wrap=not columns[i].wrap, overflow="ellipsis")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def _sweeps_table(snapshot: dict[str, Any], width: int) -> Any:
    from rich.progress_bar import ProgressBar

    from orchestrator.db.models import TRIAL_STATUSES

    columns = [_Column("sweep"), *(_Column(s, "right") for s in TRIAL_STATUSES),
               _Column("total", "right"), _Column("progress", drop=4),
               _Column("finished", "right", drop=3), _Column("per min", "right", drop=2),
               _Column("ETA", "right"), _Column("note", drop=1, wrap=True)]
    rows = []
    for sweep in snapshot["sweeps"]:
        progress = sweep["progress"]
        note = ""
        if sweep["stalled"]:
            note = "stalled: no live launch"
        elif not sweep["active"]:
            note = "finished"
        rate = sweep["throughput_per_min"]
        rows.append([
            sweep["name"], *(str(sweep["counts"][s]) for s in TRIAL_STATUSES),
            str(sweep["total"]),
            ProgressBar(total=max(sweep["total"], 1), completed=sweep["finished"],
                        width=BAR_WIDTH),
            f"{sweep['finished']}/{sweep['total']}"
            + ("" if progress is None else f" {progress:.0%}"),
            "-" if rate is None else f"{rate:.2g}" if rate < 10 else f"{rate:.0f}",
            duration_text(sweep["eta_s"]),
            note,
        ])
    return _table("sweeps", columns, rows, width)


def _running_table(snapshot: dict[str, Any], max_rows: int, width: int) -> Any:
    running = snapshot["running"]
    shown = running[:max_rows]
    title = f"running trials ({len(running)})"
    if len(running) > len(shown):
        title += f", the {len(shown)} running longest"
    several = len(snapshot["sweeps"]) > 1  # name the sweep when it is not the only one
    columns = [*([_Column("sweep", drop=4)] if several else []), _Column("model"),
               _Column("method"), _Column("rate", "right"), _Column("dataset", drop=2),
               _Column("host"), _Column("GPU"), _Column("elapsed", "right"),
               _Column("attempt", "right", drop=3), _Column("trial", drop=1)]
    rows = []
    for row in shown:
        elapsed = duration_text(row["elapsed_s"])
        if not row["live"]:
            elapsed += " stalled"
        rows.append([
            *([row["sweep"]] if several else []),
            _name_text(row["model"]), row["method"], cell(row["rate"]),
            _name_text(row["dataset"]), row["host"] or "-", _gpus_text(row["gpus"]), elapsed,
            str(row["attempt"]), row["trial_key"][:12],
        ])
    return _table(title, columns, rows, width)


def _failures_table(snapshot: dict[str, Any], width: int) -> Any:
    failures = snapshot["failures"]
    several = len(snapshot["sweeps"]) > 1
    columns = [_Column("at", drop=4), *([_Column("sweep", drop=5)] if several else []),
               _Column("model", drop=2), _Column("method"), _Column("rate", "right"),
               _Column("dataset", drop=1), _Column("status", drop=3), _Column("reason"),
               _Column("error", wrap=True)]
    rows = []
    for row in failures:
        message = row["message"] or ""
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 1] + "…"
        error = ": ".join(part for part in (row["error_type"], message) if part)
        rows.append([
            _time_text(row["finished_at"]), *([row["sweep"]] if several else []),
            _name_text(row["model"]), row["method"], cell(row["rate"]),
            _name_text(row["dataset"]), row["status"], row["reason"] or "-", error or "-",
        ])
    return _table(f"latest failures ({len(failures)} newest)", columns, rows, width)


class _View:
    """The watch view of one snapshot; laid out for the width it is drawn at."""

    def __init__(self, snapshot: dict[str, Any], interval: float | None, error: str | None,
                 max_running: int) -> None:
        self.snapshot = snapshot
        self.interval = interval
        self.error = error
        self.max_running = max_running

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        snapshot, width = self.snapshot, options.max_width
        header = (f"sweep status at "
                  f"{snapshot['now'].astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC")
        if self.interval is not None:
            header += f", refreshed every {self.interval:g} s (Ctrl-C to stop)"
        yield Text(header, style="bold")
        if self.error is not None:
            yield Text(f"could not read the database: {self.error}; retrying", style="red")
        if not snapshot["sweeps"]:
            yield Text("no sweeps in this database yet")
            return
        yield _sweeps_table(snapshot, width)
        stalled = [s["name"] for s in snapshot["sweeps"] if s["stalled"]]
        if stalled:
            # Their trials stay pending or running until a launch takes them back.
            yield Text(f"stalled (no live `sweep launch`): {', '.join(stalled)}; launch the "
                       "same spec again to resume", style="yellow")
        if snapshot["running"]:
            yield _running_table(snapshot, self.max_running, width)
        if snapshot["failures"]:
            yield _failures_table(snapshot, width)


def render_snapshot(snapshot: dict[str, Any], *, interval: float | None = None,
                    error: str | None = None, max_running: int = MAX_RUNNING_ROWS) -> Any:
    """The watch view of one snapshot as a rich renderable.

    ``error`` is a failed poll's one-line reason (the view then shows the last snapshot
    that could be read). In a narrow terminal the least useful columns are left out so
    that each row stays on one line.
    """
    return _View(snapshot, interval, error, max_running)


def summary_line(snapshot: dict[str, Any]) -> str:
    """The one line printed when the watch ends because nothing is left to run."""
    sweeps = snapshot["sweeps"]
    if not sweeps:
        return "no sweeps in this database yet: nothing to watch"
    counts = {status: sum(s["counts"][status] for s in sweeps)
              for status in ("done", "failed", "timed_out")}
    total = sum(s["total"] for s in sweeps)
    what = f"sweep {sweeps[0]['name']}" if len(sweeps) == 1 else f"{len(sweeps)} sweeps"
    return (f"{what} finished: {counts['done']} done, {counts['failed']} failed, "
            f"{counts['timed_out']} timed out of {total} trials")


def poll(engine: Any, sweep: str | None) -> dict[str, Any]:
    """One snapshot in one short read-only transaction.

    On PostgreSQL the transaction is REPEATABLE READ, so counts, running trials and
    failures come from one consistent snapshot (a read-only transaction there never waits
    for writers nor fails on their account); SQLite's WAL readers see one snapshot anyway.
    """
    from orchestrator.db.engine import session_scope
    from orchestrator.live import watch_snapshot

    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ",
                                          postgresql_readonly=True)
    with session_scope(engine) as session:
        return watch_snapshot(session, sweep)


def watch(db_url: str, sweep: str | None, interval: float, console: Any = None,
          max_polls: int | None = None) -> int:
    """Show the live view until nothing is left to run, Ctrl-C, or ``max_polls`` polls.

    Returns the exit code: 0 in each of those cases. A missing database or an unknown
    sweep raise (BadInput / NoDatabase) before the view starts; a poll that fails later
    (a PostgreSQL restart, a locked SQLite file) is shown in the view and retried.
    """
    from sqlalchemy.exc import DBAPIError

    from orchestrator.db.engine import ensure_schema

    console = console or make_console()
    try:
        engine = ensure_schema(db_url, create=False)
        snapshot = poll(engine, sweep)
        polls = 1
        from rich.live import Live

        with Live(render_snapshot(snapshot, interval=interval), console=console,
                  auto_refresh=False, screen=False, transient=False) as live:
            next_poll = time.monotonic() + interval
            while snapshot["active"] and (max_polls is None or polls < max_polls):
                time.sleep(max(next_poll - time.monotonic(), 0.0))
                next_poll = time.monotonic() + interval
                error = None
                try:
                    snapshot = poll(engine, sweep)
                except DBAPIError as exc:
                    detail = str(exc.orig).strip().splitlines()
                    error = detail[0] if detail else type(exc.orig).__name__
                polls += 1
                live.update(render_snapshot(snapshot, interval=interval, error=error),
                            refresh=True)
        if not snapshot["active"]:
            if not console.is_terminal:
                console.line()  # Live leaves its last view unterminated outside a terminal
            console.print(summary_line(snapshot))
        return 0
    except KeyboardInterrupt:
        # Ctrl-C is how a user leaves a live view: not an error, nothing to report.
        return 0
