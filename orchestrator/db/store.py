"""Writes to the results database. The driver's Tune callback is their only caller.

Every function takes an open session (from ``session_scope(engine, write=True)``) and leaves
committing to it. Each write is idempotent: Tune may deliver an event twice, and a relaunch
registers the same sweep again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.db.models import (
    DIRECTIONS,
    FAILURE_REASONS,
    Environment,
    Evidence,
    Metric,
    Sweep,
    Trial,
    utcnow,
)

TRIAL_FIELDS: tuple[str, ...] = (
    "trial_key", "position", "model", "method", "rate", "dataset", "params", "config",
    "is_baseline",
)
RESULT_STATUSES: tuple[str, ...] = ("done", "failed", "timed_out")
MAX_METRIC_NAME = 100
MAX_ERROR_TYPE = 200

# (value, direction, note) of one metric, validated.
_MetricRow = tuple[float | None, str | None, str | None]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and tuples by lists.

    Python's json writes NaN and Infinity, which are not JSON: PostgreSQL rejects them and
    other readers of the database choke on them.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON (sorted keys, no whitespace) of ``obj``."""
    canonical = json.dumps(
        json_safe(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def register_sweep(
    session: Session,
    name: str,
    spec: dict[str, Any],
    spec_path: str | None,
    trials: list[dict[str, Any]],
) -> dict[str, str]:
    """Create or update the sweep ``name`` and add the trials it does not have yet.

    The sweep's spec and spec path are replaced by the given ones. A trial whose key is
    already stored is left as it is (with its status: that is how a relaunch skips finished
    work); a new one is inserted as ``pending``. Trials the spec no longer contains are kept,
    results are never deleted. Returns ``{trial_key: status}`` for the given trials.
    """
    for index, row in enumerate(trials):
        missing = [f for f in TRIAL_FIELDS if f not in row]
        if missing:
            raise ValueError(f"trial #{index} lacks {', '.join(missing)}")

    sweep = session.scalars(select(Sweep).where(Sweep.name == name)).one_or_none()
    if sweep is None:
        sweep = Sweep(name=name, spec=json_safe(spec), spec_path=spec_path)
        session.add(sweep)
        session.flush()
    else:
        sweep.spec = json_safe(spec)
        sweep.spec_path = spec_path
        # Set explicitly: an identical spec leaves the row clean and onupdate would not fire.
        sweep.updated_at = utcnow()

    statuses: dict[str, str] = dict(
        session.execute(
            select(Trial.trial_key, Trial.status).where(Trial.sweep_id == sweep.id)
        ).all()
    )
    for row in trials:
        key = row["trial_key"]
        if key in statuses:
            continue
        session.add(
            Trial(
                sweep_id=sweep.id,
                trial_key=key,
                position=int(row["position"]),
                model=row["model"],
                method=row["method"],
                rate=None if row["rate"] is None else float(row["rate"]),
                dataset=row["dataset"],
                params=json_safe(row["params"]),
                config=json_safe(row["config"]),
                is_baseline=bool(row["is_baseline"]),
                status="pending",
                attempts=0,
            )
        )
        statuses[key] = "pending"
    session.flush()
    return {row["trial_key"]: statuses[row["trial_key"]] for row in trials}


# The writes below run once per trial event on the driver. They are plain SQL statements,
# built once with bound parameters, on the session's connection: no unit-of-work flush and
# no statement construction per call (several times faster, for the ingest target of the
# driver). Afterwards the session's loaded objects are expired, so none shadows the write.
_TRIALS = Trial.__table__
_TRIAL_ROW = (
    select(_TRIALS.c.id, _TRIALS.c.attempts)
    .join(Sweep.__table__, _TRIALS.c.sweep_id == Sweep.__table__.c.id)
    .where(Sweep.__table__.c.name == bindparam("sweep"),
           _TRIALS.c.trial_key == bindparam("key"))
)
_MARK_RUNNING = (
    update(_TRIALS).where(_TRIALS.c.id == bindparam("trial_id"))
    .values(status="running", attempts=_TRIALS.c.attempts + 1, started_at=bindparam("p_now"),
            finished_at=None, duration_s=None, host=bindparam("p_host"), error_type=None,
            error_message=None, error_traceback=None, failure_reason=None)
)
_RESULT_FIELDS = ("status", "finished_at", "duration_s", "error_type", "error_message",
                  "error_traceback", "failure_reason", "environment_id")
_DELETE_METRICS = delete(Metric.__table__).where(
    Metric.__table__.c.trial_id == bindparam("trial_id"))
_DELETE_EVIDENCE = delete(Evidence.__table__).where(
    Evidence.__table__.c.trial_id == bindparam("trial_id"))
_INSERT_METRIC = insert(Metric.__table__)
_INSERT_EVIDENCE = insert(Evidence.__table__)


def _trial_row(session: Session, sweep_name: str, trial_key: str) -> tuple[int, int]:
    """(id, attempts) of a trial; LookupError when the sweep has no such trial."""
    row = session.connection().execute(
        _TRIAL_ROW, {"sweep": sweep_name, "key": trial_key}).one_or_none()
    if row is None:
        raise LookupError(f"no trial {trial_key!r} in sweep {sweep_name!r}")
    return row[0], row[1]


def mark_running(
    session: Session, sweep_name: str, trial_key: str, host: str | None = None
) -> None:
    """Record that a trial (re)started: status running, one more attempt, errors cleared."""
    trial_id, _ = _trial_row(session, sweep_name, trial_key)
    # A retry may land on another node; a host left from the last attempt would mislead.
    session.connection().execute(_MARK_RUNNING, {
        "trial_id": trial_id, "p_now": utcnow(),
        "p_host": None if host is None else host[:255]})
    session.expire_all()


def record_result(
    session: Session, sweep_name: str, trial_key: str, result: Mapping[str, Any]
) -> None:
    """Store a worker's result dict as the outcome of the trial's latest attempt.

    The stored metrics, evidence and environment become exactly those of ``result``
    (metrics missing from it are deleted, absent evidence removes stale evidence), so a
    duplicate delivery changes nothing and a rerun leaves no leftovers of the previous one.
    Everything is validated before the first write, so a malformed result changes nothing.
    """
    status = result.get("status")
    if status not in RESULT_STATUSES:
        raise ValueError(f"result status must be one of {RESULT_STATUSES}, not {status!r}")
    metrics = _parse_metrics(result.get("metrics") or {})
    reason = _failure_reason(status, result.get("error"))
    evidence = _evidence_values(result.get("evidence") or None)
    duration = result.get("duration_s")
    error = result.get("error") or None
    if isinstance(error, str):
        error = {"message": error}
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "duration_s": None if duration is None else _finite_or_none(float(duration)),
        "error_type": None if error is None else _opt_str(error.get("type"), MAX_ERROR_TYPE),
        "error_message": None if error is None else _opt_str(error.get("message")),
        "error_traceback": None if error is None else _opt_str(error.get("traceback")),
        "failure_reason": reason,
    }
    if result.get("host") is not None:
        values["host"] = str(result["host"])[:255]
    trial_id, attempts = _trial_row(session, sweep_name, trial_key)
    environment = result.get("environment") or None
    values["environment_id"] = (
        None if environment is None else _environment_id(session, environment)
    )
    fields = list(_RESULT_FIELDS)
    if "host" in values:
        fields.append("host")
    if attempts == 0:
        # A result without a start event (callback restarted mid-trial) is still one attempt.
        values["attempts"] = 1
        fields.append("attempts")
    conn = session.connection()
    conn.execute(_update_trial(tuple(fields)),
                 {"trial_id": trial_id, **{f"p_{f}": values[f] for f in fields}})
    conn.execute(_DELETE_METRICS, {"trial_id": trial_id})
    if metrics:
        conn.execute(_INSERT_METRIC, [
            {"trial_id": trial_id, "name": name, "value": value, "direction": direction,
             "note": note}
            for name, (value, direction, note) in metrics.items()
        ])
    conn.execute(_DELETE_EVIDENCE, {"trial_id": trial_id})
    if evidence is not None:
        conn.execute(_INSERT_EVIDENCE, [{"trial_id": trial_id, **evidence}])
    session.expire_all()


@lru_cache(maxsize=8)
def _update_trial(fields: tuple[str, ...]) -> Any:
    return (update(_TRIALS).where(_TRIALS.c.id == bindparam("trial_id"))
            .values({f: bindparam(f"p_{f}") for f in fields}))


# --------------------------------------------------------------------------- helpers


def _failure_reason(status: str, error: Any) -> str | None:
    if status == "done":
        return None
    if status == "timed_out":
        return "timed_out"
    reason = error.get("reason") if isinstance(error, Mapping) else None
    if reason is None:
        return "error"
    if reason not in FAILURE_REASONS:
        raise ValueError(f"failure reason must be one of {FAILURE_REASONS}, not {reason!r}")
    return str(reason)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _opt_str(value: Any, limit: int | None = None) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text[:limit] if limit is not None else text


def _parse_metrics(raw: Mapping[str, Any]) -> dict[str, _MetricRow]:
    # Validate the whole dict before touching the database so a bad result changes nothing.
    parsed: dict[str, _MetricRow] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not name or len(name) > MAX_METRIC_NAME:
            raise ValueError(f"metric name must be 1–{MAX_METRIC_NAME} characters: {name!r}")
        if isinstance(entry, Mapping):
            value, direction = entry.get("value"), entry.get("direction")
        else:
            value, direction = entry, None
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"metric {name!r}: direction must be one of {DIRECTIONS} or None")
        note: str | None = None
        if value is not None:
            if isinstance(value, str) or not isinstance(value, int | float):
                raise ValueError(f"metric {name!r}: value must be a number or None: {value!r}")
            value = float(value)
            if not math.isfinite(value):
                # Kept as NULL so sorting and arithmetic stay sane; the note says what it was.
                note, value = str(value), None
        parsed[name] = (value, direction, note)
    return parsed


def _evidence_values(evidence: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return {
        "params_before": _opt_int(evidence.get("params_before")),
        "params_after": _opt_int(evidence.get("params_after")),
        "changed_fraction": _opt_float(evidence.get("changed_fraction")),
        "max_abs_dlogits": _opt_float(evidence.get("max_abs_dlogits")),
        "details": json_safe(evidence.get("details") or {}),
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else _finite_or_none(float(value))


def _environment_id(session: Session, environment: Mapping[str, Any]) -> int:
    hardware = json_safe(environment.get("hardware") or {})
    packages = json_safe(environment.get("packages") or {})
    git_sha = environment.get("git_sha")
    git_sha = None if git_sha is None else str(git_sha)
    full = fingerprint({"hardware": hardware, "packages": packages, "git_sha": git_sha})
    query = select(Environment.id).where(Environment.fingerprint == full)
    found = session.scalar(query)
    if found is not None:
        return found
    # Two writers may meet here on PostgreSQL (SQLite's BEGIN IMMEDIATE serialises them);
    # the savepoint lets the loser read the winner's row instead of aborting its transaction.
    try:
        with session.begin_nested():
            return int(session.execute(
                insert(Environment).values(
                    fingerprint=full, hardware_fingerprint=fingerprint(hardware),
                    hardware=hardware, packages=packages, git_sha=git_sha, created_at=utcnow(),
                ).returning(Environment.id)
            ).scalar_one())
    except IntegrityError:
        found = session.scalar(query)
        if found is None:
            raise
        return found
