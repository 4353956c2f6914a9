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
from typing import Any

from sqlalchemy import select
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


def _get_trial(session: Session, sweep_name: str, trial_key: str) -> Trial:
    trial = session.scalars(
        select(Trial)
        .join(Sweep, Trial.sweep_id == Sweep.id)
        .where(Sweep.name == sweep_name, Trial.trial_key == trial_key)
    ).one_or_none()
    if trial is None:
        raise LookupError(f"no trial {trial_key!r} in sweep {sweep_name!r}")
    return trial


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


def mark_running(
    session: Session, sweep_name: str, trial_key: str, host: str | None = None
) -> None:
    """Record that a trial (re)started: status running, one more attempt, errors cleared."""
    trial = _get_trial(session, sweep_name, trial_key)
    trial.status = "running"
    trial.attempts += 1
    trial.started_at = utcnow()
    trial.finished_at = None
    trial.duration_s = None
    # A retry may land on another node; a host left from the last attempt would mislead.
    trial.host = None if host is None else host[:255]
    trial.error_type = None
    trial.error_message = None
    trial.error_traceback = None
    session.flush()


def record_result(
    session: Session, sweep_name: str, trial_key: str, result: Mapping[str, Any]
) -> None:
    """Store a worker's result dict as the outcome of the trial's latest attempt.

    The stored metrics, evidence and environment become exactly those of ``result``
    (metrics missing from it are deleted, absent evidence removes stale evidence), so a
    duplicate delivery changes nothing and a rerun leaves no leftovers of the previous one.
    """
    status = result.get("status")
    if status not in RESULT_STATUSES:
        raise ValueError(f"result status must be one of {RESULT_STATUSES}, not {status!r}")
    metrics = _parse_metrics(result.get("metrics") or {})
    reason = _failure_reason(status, result.get("error"))

    trial = _get_trial(session, sweep_name, trial_key)
    trial.status = status
    trial.finished_at = utcnow()
    if trial.attempts == 0:
        # A result without a start event (callback restarted mid-trial) is still one attempt.
        trial.attempts = 1
    duration = result.get("duration_s")
    trial.duration_s = None if duration is None else _finite_or_none(float(duration))
    if result.get("host") is not None:
        trial.host = str(result["host"])[:255]

    error = result.get("error") or None
    if isinstance(error, str):
        error = {"message": error}
    if error is not None:
        trial.error_type = _opt_str(error.get("type"), MAX_ERROR_TYPE)
        trial.error_message = _opt_str(error.get("message"))
        trial.error_traceback = _opt_str(error.get("traceback"))
    else:
        trial.error_type = trial.error_message = trial.error_traceback = None
    trial.failure_reason = reason

    _replace_metrics(session, trial, metrics)
    _replace_evidence(session, trial, result.get("evidence") or None)
    environment = result.get("environment") or None
    trial.environment_id = (
        None if environment is None else _environment_id(session, environment)
    )
    session.flush()


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


def _replace_metrics(
    session: Session,
    trial: Trial,
    metrics: dict[str, _MetricRow],
) -> None:
    # Rows are updated in place rather than deleted and re-inserted: the unit of work
    # inserts before it deletes, which would trip the (trial_id, name) unique constraint.
    rows = session.scalars(select(Metric).where(Metric.trial_id == trial.id))
    existing = {m.name: m for m in rows}
    for name, (value, direction, note) in metrics.items():
        row = existing.pop(name, None)
        if row is None:
            session.add(
                Metric(trial_id=trial.id, name=name, value=value, direction=direction, note=note)
            )
        else:
            row.value, row.direction, row.note = value, direction, note
    for stale in existing.values():
        session.delete(stale)


def _replace_evidence(session: Session, trial: Trial, evidence: Mapping[str, Any] | None) -> None:
    row = session.scalars(select(Evidence).where(Evidence.trial_id == trial.id)).one_or_none()
    if evidence is None:
        if row is not None:
            session.delete(row)
        return
    values = {
        "params_before": _opt_int(evidence.get("params_before")),
        "params_after": _opt_int(evidence.get("params_after")),
        "changed_fraction": _opt_float(evidence.get("changed_fraction")),
        "max_abs_dlogits": _opt_float(evidence.get("max_abs_dlogits")),
        "details": json_safe(evidence.get("details") or {}),
    }
    if row is None:
        session.add(Evidence(trial_id=trial.id, **values))
    else:
        for field, value in values.items():
            setattr(row, field, value)


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
            row = Environment(
                fingerprint=full,
                hardware_fingerprint=fingerprint(hardware),
                hardware=hardware,
                packages=packages,
                git_sha=git_sha,
            )
            session.add(row)
        return row.id
    except IntegrityError:
        found = session.scalar(query)
        if found is None:
            raise
        return found
