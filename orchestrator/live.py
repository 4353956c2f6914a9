"""What ``sweep status --watch`` shows: one read of the results database per refresh.

:func:`watch_snapshot` reads, in the caller's (short, read-only) transaction, the trial
counts of the watched sweeps, their running trials with where they run, their latest
failures, and what the throughput and ETA need; :func:`throughput_per_min` and
:func:`eta_seconds` turn timestamps into those numbers and are pure, so they are tested on
constructed times.

ETA. Every trial still to finish is assumed to take the median wall-clock duration (start
to result) of the sweep's last :data:`DURATION_SAMPLE` finished trials. A running trial
needs that median minus what it has already run (at least nothing); the pending trials
then queue onto the running trials' slots, each taking the first slot that frees up, with
as many slots as trials run now. The ETA is when the last slot frees up. This is preferred
to "remaining ÷ throughput": a throughput needs several trials finished inside its window
(none finish in ten minutes when trials take an hour), it knows nothing of how far the
running trials are, and it ignores that the last few trials run with idle slots beside
them. Unknown ("-") until a trial has finished, and while nothing runs (then no slot will
free up unless a launch starts).

Throughput. Trials finished per minute over the last :data:`RECENT_WINDOW_S` seconds; the
window starts no earlier than the first start among the trials it counts and the trials
running now, so the first minutes of a sweep are not diluted by the idle time before it.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Driver, Sweep, Trial, utcnow

RECENT_WINDOW_S = 600.0
DURATION_SAMPLE = 20  # finished trials whose median duration stands in for the rest
RECENT_FAILURES = 5
FINISHED: tuple[str, ...] = ("done", "failed", "timed_out")
FAILED: tuple[str, ...] = ("failed", "timed_out")
# A window shorter than this gives a rate made of noise (one trial a second after start).
MIN_WINDOW_S = 1.0


def trial_duration_s(started_at: datetime | None, finished_at: datetime | None,
                     duration_s: float | None) -> float | None:
    """Wall-clock seconds from a trial's start to its result; the worker's own measure
    (which leaves out scheduling and model loading overheads) when a time is missing."""
    if started_at is not None and finished_at is not None and finished_at >= started_at:
        return (finished_at - started_at).total_seconds()
    return duration_s


def throughput_per_min(finished: Sequence[tuple[datetime | None, datetime]],
                       running_started: Sequence[datetime | None], now: datetime,
                       window_s: float = RECENT_WINDOW_S) -> float | None:
    """Trials finished per minute over the recent window (see the module docstring).

    ``finished`` are ``(started_at, finished_at)`` of finished trials (any age: those
    outside the window are ignored), ``running_started`` the start times of the trials
    running now. None when nothing started or finished inside the window, or the window is
    shorter than :data:`MIN_WINDOW_S`.
    """
    floor = now - timedelta(seconds=window_s)
    recent = [(s, f) for s, f in finished if floor <= f <= now]
    # A trial without a start time (recovered from a result file) counts from its end.
    moments = [s if s is not None else f for s, f in recent]
    moments += [s for s in running_started if s is not None]
    if not moments:
        return None
    start = max(floor, min(moments))
    span = (now - start).total_seconds()
    if span < MIN_WINDOW_S:
        return None
    return len(recent) * 60.0 / span


def eta_seconds(pending: int, running_elapsed: Sequence[float | None],
                durations: Sequence[float]) -> float | None:
    """Seconds until every pending and running trial is expected to have finished.

    ``running_elapsed`` is how long each running trial has run (None when unknown: counted
    as just started), ``durations`` the durations of recently finished trials. 0 when
    nothing is left; None when no trial has finished yet or none is running.
    """
    if pending <= 0 and not running_elapsed:
        return 0.0
    if not durations or not running_elapsed:
        return None
    median = statistics.median(durations)
    slots = [max(median - (elapsed or 0.0), 0.0) for elapsed in running_elapsed]
    heapq.heapify(slots)
    for _ in range(pending):
        heapq.heappush(slots, heapq.heappop(slots) + median)
    return max(slots)


def watch_snapshot(session: Session, sweep: str | None, *, now: datetime | None = None,
                   failures: int = RECENT_FAILURES) -> dict[str, Any]:
    """Everything one refresh of ``sweep status --watch`` shows, read in ``session``.

    ``sweep`` None watches every sweep; an unknown name raises
    :class:`~orchestrator.errors.BadInput` (as ``sweep status`` does). Returns::

        {"now", "active": any watched sweep has pending or running trials,
         "sweeps": [{"name", "counts": {status: n}, "total", "finished", "remaining",
                     "progress" (finished / total, None without trials),
                     "throughput_per_min", "eta_s", "median_duration_s",
                     "live_launches": drivers holding a lease, "active",
                     "stalled": active but no live launch (nothing will change until
                                `sweep launch` runs it again)}],
         "running": [{"sweep", "trial_key", "model", "method", "rate", "dataset", "host",
                      "gpus" ("" on CPU, None until the worker announced itself),
                      "started_at", "elapsed_s", "attempt", "live"}],   # longest first
         "failures": [{"sweep", "trial_key", "model", "method", "rate", "dataset",
                       "status", "reason", "error_type", "message" (first line),
                       "host", "finished_at"}]}                        # newest first

    Reads only, a few statements; the caller keeps the transaction short.
    """
    from orchestrator import queries
    from orchestrator.db.leases import driver_alive

    now = now or utcnow()
    summaries = queries.sweep_status(session, sweep)
    names = [s["name"] for s in summaries]
    ids: dict[str, int] = dict(
        session.execute(select(Sweep.name, Sweep.id).where(Sweep.name.in_(names))).all()
    ) if names else {}
    by_id = {sweep_id: name for name, sweep_id in ids.items()}

    live: dict[int, int] = dict.fromkeys(by_id, 0)
    live_drivers: set[int] = set()
    if by_id:
        for driver in session.scalars(select(Driver).where(
                Driver.sweep_id.in_(list(by_id)), Driver.finished_at.is_(None))):
            if driver_alive(driver, now):
                live[driver.sweep_id] += 1
                live_drivers.add(driver.id)

    running_rows = session.execute(
        select(Trial.sweep_id, Trial.trial_key, Trial.model, Trial.method, Trial.rate,
               Trial.dataset, Trial.host, Trial.gpus, Trial.started_at, Trial.attempts,
               Trial.driver_id)
        .where(Trial.sweep_id.in_(list(by_id)), Trial.status == "running")
        .order_by(Trial.started_at, Trial.position)
    ).all() if by_id else []
    running = [{
        "sweep": by_id[row.sweep_id], "trial_key": row.trial_key, "model": row.model,
        "method": row.method, "rate": row.rate, "dataset": row.dataset, "host": row.host,
        "gpus": row.gpus, "started_at": row.started_at,
        "elapsed_s": None if row.started_at is None
        else max((now - row.started_at).total_seconds(), 0.0),
        "attempt": row.attempts, "live": row.driver_id in live_drivers,
    } for row in running_rows]

    floor = now - timedelta(seconds=RECENT_WINDOW_S)
    recent: dict[int, list[tuple[datetime | None, datetime]]] = {i: [] for i in by_id}
    if by_id:
        for sweep_id, started_at, finished_at in session.execute(
                select(Trial.sweep_id, Trial.started_at, Trial.finished_at)
                .where(Trial.sweep_id.in_(list(by_id)), Trial.status.in_(FINISHED),
                       Trial.finished_at >= floor)):
            recent[sweep_id].append((started_at, finished_at))

    out: list[dict[str, Any]] = []
    for summary in summaries:
        sweep_id = ids[summary["name"]]
        counts = summary["counts"]
        total = summary["total"]
        finished = sum(counts[s] for s in FINISHED)
        remaining = counts["pending"] + counts["running"]
        mine = [r for r in running if r["sweep"] == summary["name"]]
        durations: list[float] = []
        if remaining:
            # The ETA only matters while something is left; its sample is the sweep's
            # latest finished trials, read newest first and no more than needed.
            for started_at, finished_at, duration_s in session.execute(
                    select(Trial.started_at, Trial.finished_at, Trial.duration_s)
                    .where(Trial.sweep_id == sweep_id, Trial.status.in_(FINISHED),
                           Trial.finished_at.is_not(None))
                    .order_by(Trial.finished_at.desc()).limit(DURATION_SAMPLE)):
                duration = trial_duration_s(started_at, finished_at, duration_s)
                if duration is not None:
                    durations.append(duration)
        out.append({
            "name": summary["name"], "counts": counts, "total": total,
            "finished": finished, "remaining": remaining,
            "progress": finished / total if total else None,
            "throughput_per_min": throughput_per_min(
                recent[sweep_id], [r["started_at"] for r in mine], now),
            "eta_s": eta_seconds(counts["pending"], [r["elapsed_s"] for r in mine], durations)
            if remaining else None,
            "median_duration_s": statistics.median(durations) if durations else None,
            "live_launches": live[sweep_id], "active": remaining > 0,
            "stalled": remaining > 0 and live[sweep_id] == 0,
        })

    failure_rows = session.execute(
        select(Trial.sweep_id, Trial.trial_key, Trial.model, Trial.method, Trial.rate,
               Trial.dataset, Trial.status, Trial.failure_reason, Trial.error_type,
               Trial.error_message, Trial.host, Trial.finished_at)
        .where(Trial.sweep_id.in_(list(by_id)), Trial.status.in_(FAILED))
        .order_by(Trial.finished_at.desc().nulls_last(), Trial.id.desc()).limit(failures)
    ).all() if by_id and failures > 0 else []
    recent_failures = [{
        "sweep": by_id[row.sweep_id], "trial_key": row.trial_key, "model": row.model,
        "method": row.method, "rate": row.rate, "dataset": row.dataset,
        "status": row.status, "reason": row.failure_reason, "error_type": row.error_type,
        "message": (row.error_message or "").strip().splitlines()[0]
        if (row.error_message or "").strip() else None,
        "host": row.host, "finished_at": row.finished_at,
    } for row in failure_rows]

    return {"now": now, "active": any(s["active"] for s in out), "sweeps": out,
            "running": running, "failures": recent_failures}
