"""Writes to the results database, by the driver only: ``launch.plan`` (the sweep, its
trials, recovered results) and the writer thread behind its Tune callback (trial events).

Every function takes an open session (from ``session_scope(engine, write=True)``) and leaves
committing to it. Each write is idempotent: Tune may deliver an event twice, and a relaunch
registers the same sweep again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update
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
MAX_GPUS = 64  # characters of trials.gpus

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


# The writes below carry every trial event of the driver. They are plain SQL statements,
# built once with bound parameters, on the session's connection: no unit-of-work flush and no
# statement construction per call. They take whole batches of events: the statements per
# batch stay the same (one executemany per table), which is what lets the driver's writer
# keep up when many trials end at once (``orchestrator.db.writer``). Afterwards the
# session's loaded objects are expired, so none shadows the write.
_TRIALS = Trial.__table__
_SWEEPS = Sweep.__table__
_METRICS = Metric.__table__
_EVIDENCE = Evidence.__table__
_TRIAL_IDS = (
    select(_TRIALS.c.trial_key, _TRIALS.c.id)
    .join(_SWEEPS, _TRIALS.c.sweep_id == _SWEEPS.c.id)
    .where(_SWEEPS.c.name == bindparam("sweep"),
           _TRIALS.c.trial_key.in_(bindparam("keys", expanding=True)))
)
_BY_ID = _TRIALS.c.id == bindparam("trial_id")
_MARK_RUNNING = (
    update(_TRIALS).where(_BY_ID)
    .values(status="running", attempts=_TRIALS.c.attempts + 1, started_at=bindparam("p_now"),
            finished_at=None, duration_s=None, host=bindparam("p_host"),
            gpus=bindparam("p_gpus"), error_type=None, error_message=None,
            error_traceback=None, failure_reason=None)
)
# Where a running trial's worker is, as it announced: only a row still running takes it (an
# announcement that arrives after its result, or for a reset trial, is stale).
_RECORD_PLACEMENT = (
    update(_TRIALS).where(_BY_ID, _TRIALS.c.status == "running")
    .values(host=func.coalesce(bindparam("p_host", type_=_TRIALS.c.host.type), _TRIALS.c.host),
            gpus=bindparam("p_gpus", type_=_TRIALS.c.gpus.type))
)
_RESULT_FIELDS = ("status", "finished_at", "duration_s", "error_type", "error_message",
                  "error_traceback", "failure_reason", "environment_id")
_RECORD_RESULT = (
    update(_TRIALS).where(_BY_ID)
    .values({
        **{f: bindparam(f"p_{f}") for f in _RESULT_FIELDS},
        # A result names its host only when it knows it; otherwise the start's host stays.
        "host": func.coalesce(bindparam("p_host", type_=_TRIALS.c.host.type), _TRIALS.c.host),
        # A result without a start event (callback restarted mid-trial) is one attempt.
        "attempts": case((_TRIALS.c.attempts == 0, 1), else_=_TRIALS.c.attempts),
    })
)
_DELETE_METRICS = delete(_METRICS).where(
    _METRICS.c.trial_id.in_(bindparam("trial_ids", expanding=True)))
_DELETE_EVIDENCE = delete(_EVIDENCE).where(
    _EVIDENCE.c.trial_id.in_(bindparam("trial_ids", expanding=True)))
_INSERT_METRIC = insert(_METRICS)
_INSERT_EVIDENCE = insert(_EVIDENCE)
_ENVIRONMENTS = Environment.__table__
_ENVIRONMENT_ID = select(_ENVIRONMENTS.c.id).where(
    _ENVIRONMENTS.c.fingerprint == bindparam("fingerprint"))
# Bound parameters per statement stay far below SQLite's limit (32,766) and PostgreSQL's.
_IN_CHUNK = 500


def _trial_ids(conn: Connection, sweep_name: str, keys: Iterable[str]) -> dict[str, int]:
    """``{trial_key: id}`` for ``keys``; LookupError naming the first key the sweep lacks."""
    wanted = list(dict.fromkeys(keys))
    ids: dict[str, int] = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        ids.update(conn.execute(
            _TRIAL_IDS, {"sweep": sweep_name, "keys": wanted[start:start + _IN_CHUNK]}).all())
    for key in wanted:
        if key not in ids:
            raise LookupError(f"no trial {key!r} in sweep {sweep_name!r}")
    return ids


def mark_running(
    session: Session, sweep_name: str, trial_key: str, host: str | None = None,
    gpus: str | None = None,
) -> None:
    """Record that a trial (re)started: status running, one more attempt, errors cleared."""
    mark_running_many(session, sweep_name, [(trial_key, host, gpus)])


# (trial_key, host) or (trial_key, host, gpus)
TrialStart = tuple[str, str | None] | tuple[str, str | None, str | None]


def mark_running_many(session: Session, sweep_name: str, starts: Sequence[TrialStart]) -> None:
    """:func:`mark_running` for each ``(trial_key, host[, gpus])``, in one statement per batch.

    A key given twice counts two attempts, as two start events would.
    """
    if not starts:
        return
    conn = session.connection()
    ids = _trial_ids(conn, sweep_name, (start[0] for start in starts))
    now = utcnow()
    # A retry may land on another node; a host or GPUs left from the last attempt would
    # mislead, so a start without them clears them.
    conn.execute(_MARK_RUNNING, [
        {"trial_id": ids[start[0]], "p_now": now, "p_host": _host(start[1]),
         "p_gpus": _gpus(start[2] if len(start) > 2 else None)}
        for start in starts
    ])
    session.expire_all()


def record_placements(
    session: Session, sweep_name: str, placements: Sequence[tuple[str, str | None, str | None]]
) -> None:
    """Record where running trials run: each ``(trial_key, host, gpus)`` as the trial's
    worker announced it, in one statement per batch.

    Neither a new attempt nor a new start time: the trial was marked running when Tune
    started it, and only its host (when given) and GPUs change. A trial that is no longer
    running keeps what it has (the announcement is stale).
    """
    if not placements:
        return
    conn = session.connection()
    ids = _trial_ids(conn, sweep_name, (key for key, _, _ in placements))
    conn.execute(_RECORD_PLACEMENT, [
        {"trial_id": ids[key], "p_host": _host(host), "p_gpus": _gpus(gpus)}
        for key, host, gpus in placements
    ])
    session.expire_all()


def _host(host: str | None) -> str | None:
    return None if host is None else str(host)[:255]


def _gpus(gpus: str | None) -> str | None:
    return None if gpus is None else str(gpus)[:MAX_GPUS]


def record_result(
    session: Session, sweep_name: str, trial_key: str, result: Mapping[str, Any]
) -> None:
    """Store a worker's result dict as the outcome of the trial's latest attempt.

    The stored metrics, evidence and environment become exactly those of ``result``
    (metrics missing from it are deleted, absent evidence removes stale evidence), so a
    duplicate delivery changes nothing and a rerun leaves no leftovers of the previous one.
    Everything is validated before the first write, so a malformed result changes nothing.
    """
    record_results(session, sweep_name, [(trial_key, result)])


def record_results(
    session: Session, sweep_name: str, results: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """:func:`record_result` for each ``(trial_key, result)``, a few statements per batch.

    All results are validated before the first write: one malformed result changes
    nothing. When a key comes twice, the outcome is that of recording them in order: the
    last result, on the host of the last one that names a host.
    """
    parsed: dict[str, _ParsedResult] = {}
    for key, result in results:
        row = _parse_result(result)
        if key in parsed and row.values["host"] is None:
            row.values["host"] = parsed[key].values["host"]  # as a result without a host
        parsed[key] = row
    if not parsed:
        return
    environments: dict[str, int] = {}
    for row in parsed.values():
        if row.environment is not None:
            full = row.environment["fingerprint"]
            if full not in environments:
                environments[full] = _environment_id(session, row.environment)
            row.values["environment_id"] = environments[full]
    conn = session.connection()
    ids = _trial_ids(conn, sweep_name, parsed)
    finished_at = utcnow()
    conn.execute(_RECORD_RESULT, [
        {"trial_id": ids[key], "p_finished_at": finished_at,
         **{f"p_{name}": value for name, value in row.values.items()}}
        for key, row in parsed.items()
    ])
    trial_ids = [ids[key] for key in parsed]
    for start in range(0, len(trial_ids), _IN_CHUNK):
        chunk = trial_ids[start:start + _IN_CHUNK]
        conn.execute(_DELETE_METRICS, {"trial_ids": chunk})
        conn.execute(_DELETE_EVIDENCE, {"trial_ids": chunk})
    metrics = [
        {"trial_id": ids[key], "name": name, "value": value, "direction": direction,
         "note": note}
        for key, row in parsed.items()
        for name, (value, direction, note) in row.metrics.items()
    ]
    if metrics:
        conn.execute(_INSERT_METRIC, metrics)
    evidence = [{"trial_id": ids[key], **row.evidence}
                for key, row in parsed.items() if row.evidence is not None]
    if evidence:
        conn.execute(_INSERT_EVIDENCE, evidence)
    session.expire_all()


@dataclass
class _ParsedResult:
    values: dict[str, Any]  # the trials row's result columns, environment_id still None
    metrics: dict[str, _MetricRow]
    evidence: dict[str, Any] | None
    environment: dict[str, Any] | None  # hardware, packages, git_sha and their fingerprint


def _parse_result(result: Mapping[str, Any]) -> _ParsedResult:
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
        "duration_s": None if duration is None else _finite_or_none(float(duration)),
        "error_type": None if error is None else _opt_str(error.get("type"), MAX_ERROR_TYPE),
        "error_message": None if error is None else _opt_str(error.get("message")),
        "error_traceback": None if error is None else _opt_str(error.get("traceback")),
        "failure_reason": reason,
        "environment_id": None,
        "host": None if result.get("host") is None else str(result["host"])[:255],
    }
    environment = result.get("environment") or None
    return _ParsedResult(values, metrics, evidence,
                         None if environment is None else _environment_values(environment))


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


def _environment_values(environment: Mapping[str, Any]) -> dict[str, Any]:
    hardware = json_safe(environment.get("hardware") or {})
    packages = json_safe(environment.get("packages") or {})
    git_sha = environment.get("git_sha")
    git_sha = None if git_sha is None else str(git_sha)
    return {"hardware": hardware, "packages": packages, "git_sha": git_sha,
            "fingerprint": fingerprint(
                {"hardware": hardware, "packages": packages, "git_sha": git_sha})}


def _environment_id(session: Session, environment: Mapping[str, Any]) -> int:
    """Id of the environments row of ``environment`` (from :func:`_environment_values`)."""
    full = environment["fingerprint"]
    conn = session.connection()
    found = conn.execute(_ENVIRONMENT_ID, {"fingerprint": full}).scalar()
    if found is not None:
        return int(found)
    hardware = environment["hardware"]
    # Two writers may meet here on PostgreSQL (SQLite's BEGIN IMMEDIATE serialises them);
    # the savepoint lets the loser read the winner's row instead of aborting its transaction.
    try:
        with session.begin_nested():
            return int(session.execute(
                insert(Environment).values(
                    fingerprint=full, hardware_fingerprint=fingerprint(hardware),
                    hardware=hardware, packages=environment["packages"],
                    git_sha=environment["git_sha"], created_at=utcnow(),
                ).returning(Environment.id)
            ).scalar_one())
    except IntegrityError:
        found = session.connection().execute(_ENVIRONMENT_ID, {"fingerprint": full}).scalar()
        if found is None:
            raise
        return int(found)
