"""Writes to the results database (orchestrator/db/store.py)."""

from __future__ import annotations

import math
import multiprocessing
import queue
from collections.abc import Callable
from datetime import UTC
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.db.engine import make_engine, session_scope
from orchestrator.db.models import Environment, Evidence, Metric, Sweep, Trial
from orchestrator.db.store import (
    fingerprint,
    mark_running,
    mark_running_many,
    record_result,
    record_results,
    register_sweep,
)

RowsFactory = Callable[..., list[dict[str, Any]]]
ResultFactory = Callable[..., dict[str, Any]]
SPEC = {"name": "s1", "score": {"quality_metric": "perplexity", "weight": 0.5}}


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _trial(session: Session, key: str, sweep: str = "s1") -> Trial:
    return session.scalars(
        select(Trial).join(Sweep).where(Sweep.name == sweep, Trial.trial_key == key)
    ).one()


def _metrics(session: Session, key: str) -> dict[str, tuple[float | None, str | None, str | None]]:
    trial = _trial(session, key)
    rows = session.scalars(select(Metric).where(Metric.trial_id == trial.id))
    return {m.name: (m.value, m.direction, m.note) for m in rows}


def _snapshot(session: Session, key: str) -> dict[str, Any]:
    """Everything stored about a trial's outcome, minus the write time."""
    trial = _trial(session, key)
    evidence = session.scalars(select(Evidence).where(Evidence.trial_id == trial.id)).all()
    return {
        "status": trial.status,
        "error": (trial.error_type, trial.error_message, trial.error_traceback),
        "host": trial.host,
        "duration_s": trial.duration_s,
        "environment_id": trial.environment_id,
        "metrics": _metrics(session, key),
        "evidence": [
            (e.params_before, e.params_after, e.changed_fraction, e.max_abs_dlogits, e.details)
            for e in evidence
        ],
        "environments": _count(session, Environment),
    }


@pytest.fixture
def registered(engine: Engine, trial_rows: RowsFactory) -> list[dict[str, Any]]:
    rows = trial_rows(3)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", SPEC, "sweeps/s1.yaml", rows)
    return rows


# --------------------------------------------------------------------------- register_sweep


def test_register_sweep_inserts_pending_trials(engine: Engine, trial_rows: RowsFactory) -> None:
    rows = trial_rows(3)
    with session_scope(engine, write=True) as session:
        statuses = register_sweep(session, "s1", SPEC, "sweeps/s1.yaml", rows)
    assert statuses == {r["trial_key"]: "pending" for r in rows}
    with session_scope(engine) as session:
        sweep = session.scalars(select(Sweep)).one()
        assert (sweep.name, sweep.spec, sweep.spec_path) == ("s1", SPEC, "sweeps/s1.yaml")
        trials = session.scalars(select(Trial).order_by(Trial.position)).all()
        assert [t.trial_key for t in trials] == [r["trial_key"] for r in rows]
        base = trials[0]
        assert base.is_baseline and base.method == "none" and base.rate is None
        assert trials[1].rate == pytest.approx(0.1) and trials[1].params == {"scope": "global"}
        assert trials[1].config == rows[1]["config"]
        assert all(t.attempts == 0 and t.started_at is None for t in trials)
        assert sweep.created_at.tzinfo is not None and base.created_at.tzinfo is not None


def test_register_sweep_is_idempotent_and_keeps_statuses(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory,
    trial_rows: RowsFactory,
) -> None:
    done_key = registered[1]["trial_key"]
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", done_key, make_result())
    with session_scope(engine) as session:
        first_updated = session.scalars(select(Sweep.updated_at)).one()

    new_spec = {**SPEC, "seed": 1}
    more = trial_rows(4)  # the same three plus one new trial
    with session_scope(engine, write=True) as session:
        statuses = register_sweep(session, "s1", new_spec, None, more)
    assert statuses[done_key] == "done"
    assert [statuses[r["trial_key"]] for r in more].count("pending") == 4
    with session_scope(engine) as session:
        assert _count(session, Sweep) == 1
        assert _count(session, Trial) == 5
        sweep = session.scalars(select(Sweep)).one()
        assert sweep.spec == new_spec and sweep.spec_path is None
        assert sweep.updated_at > first_updated
        assert _trial(session, done_key).status == "done"


def test_register_sweep_rejects_incomplete_trials(engine: Engine) -> None:
    with pytest.raises(ValueError, match="trial #0 lacks .*position"):
        with session_scope(engine, write=True) as session:
            register_sweep(session, "s1", SPEC, None, [{"trial_key": "k"}])


def test_trial_key_is_unique_per_sweep_only(
    engine: Engine, registered: list[dict[str, Any]], trial_rows: RowsFactory
) -> None:
    # The same grid in another sweep is fine.
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s2", SPEC, None, trial_rows(3))
    # A second row with the same key in one sweep is refused by the database itself.
    with pytest.raises(IntegrityError):
        with session_scope(engine, write=True) as session:
            sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == "s1"))
            session.add(Trial(sweep_id=sweep_id, trial_key=registered[0]["trial_key"],
                              position=99, model="m", method="none", dataset="d", params={},
                              config={}, is_baseline=True))
    with session_scope(engine) as session:
        assert _count(session, Trial) == 8


def test_status_outside_the_four_is_refused_by_the_database(
    engine: Engine, registered: list[dict[str, Any]]
) -> None:
    with pytest.raises(IntegrityError, match="ck_trials_status|check"):
        with session_scope(engine, write=True) as session:
            _trial(session, registered[0]["trial_key"]).status = "finished"


# --------------------------------------------------------------------------- trial lifecycle


def test_mark_running_counts_attempts_and_clears_errors(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[1]["trial_key"]
    with session_scope(engine, write=True) as session:
        mark_running(session, "s1", key, host="node-7")
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, make_result(
            status="failed", metrics={}, evidence=False,
            error={"type": "ValueError", "message": "bad rate", "traceback": "Traceback…"}))
    with session_scope(engine) as session:
        trial = _trial(session, key)
        assert (trial.status, trial.attempts) == ("failed", 1)
        assert (trial.error_type, trial.error_message) == ("ValueError", "bad rate")
        assert trial.error_traceback == "Traceback…"
        first_start = trial.started_at
    with session_scope(engine, write=True) as session:
        mark_running(session, "s1", key)
    with session_scope(engine) as session:
        trial = _trial(session, key)
        assert (trial.status, trial.attempts) == ("running", 2)
        assert trial.error_type is trial.error_message is trial.error_traceback is None
        assert trial.finished_at is None and trial.host is None
        assert trial.started_at is not None and first_start is not None
        assert trial.started_at >= first_start and trial.started_at.tzinfo is not None


def test_record_result_stores_everything(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[1]["trial_key"]
    with session_scope(engine, write=True) as session:
        mark_running(session, "s1", key, host="node-1")
        record_result(session, "s1", key, make_result(metrics={
            "perplexity": (12.5, "lower"), "accuracy": (0.7, "higher"), "n_tokens": (512, None)}))
    with session_scope(engine) as session:
        trial = _trial(session, key)
        assert trial.status == "done" and trial.duration_s == 3.25 and trial.host == "node-1"
        assert trial.finished_at is not None and trial.finished_at.tzinfo == UTC
        assert trial.finished_at >= trial.started_at
        assert _metrics(session, key) == {
            "perplexity": (12.5, "lower", None),
            "accuracy": (0.7, "higher", None),
            "n_tokens": (512.0, None, None),
        }
        evidence = session.scalars(select(Evidence)).one()
        assert evidence.trial_id == trial.id
        assert (evidence.params_before, evidence.params_after) == (5_000_000_000, 4_000_000_000)
        assert evidence.details == {"heads_removed": {"0": [1, 2]}}
        env = session.scalars(select(Environment)).one()
        assert trial.environment_id == env.id
        assert env.git_sha == "abc123" and env.packages == {"torch": "2.13.0"}
        assert env.hardware_fingerprint == fingerprint({"cpu": "x86_64", "gpus": []})
        assert env.fingerprint != env.hardware_fingerprint and len(env.fingerprint) == 64


def test_record_result_twice_is_idempotent(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[1]["trial_key"]
    result = make_result(metrics={"perplexity": (12.5, "lower"), "accuracy": (0.7, "higher")})
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, result)
    with session_scope(engine) as session:
        once = _snapshot(session, key)
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, result)
    with session_scope(engine) as session:
        # Same content and counts (row ids of metrics are not referenced anywhere and may be
        # renewed by a rewrite).
        assert _snapshot(session, key) == once
        assert _count(session, Metric) == 2
        assert _count(session, Evidence) == 1
        assert _count(session, Environment) == 1


def test_metrics_are_replaced_not_accumulated(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[1]["trial_key"]
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, make_result(
            metrics={"perplexity": (12.5, "lower"), "accuracy": (0.7, "higher")}))
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, make_result(
            metrics={"perplexity": (11.0, "lower"), "decode_ms_per_token": (4.0, "lower")},
            evidence=False))
    with session_scope(engine) as session:
        assert _metrics(session, key) == {
            "perplexity": (11.0, "lower", None),
            "decode_ms_per_token": (4.0, "lower", None),
        }
        assert _count(session, Evidence) == 0  # the latest attempt brought none


def test_non_finite_values_are_stored_as_null_with_a_note(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[1]["trial_key"]
    result = make_result(metrics={
        "perplexity": (math.inf, "lower"), "loss": (math.nan, "lower"), "gain": (-math.inf, None)})
    result["evidence"]["details"] = {"ratio": math.nan, "nested": [math.inf, 1.0]}
    result["evidence"]["max_abs_dlogits"] = math.nan
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, result)
    with session_scope(engine) as session:
        assert _metrics(session, key) == {
            "perplexity": (None, "lower", "inf"),
            "loss": (None, "lower", "nan"),
            "gain": (None, None, "-inf"),
        }
        evidence = session.scalars(select(Evidence)).one()
        assert evidence.max_abs_dlogits is None
        assert evidence.details == {"ratio": None, "nested": [None, 1.0]}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"status": "finished"}, "status must be one of"),
        ({"status": "done", "metrics": {"x": {"value": 1.0, "direction": "up"}}}, "direction"),
        ({"status": "done", "metrics": {"x": {"value": "1.0"}}}, "must be a number"),
        ({"status": "done", "metrics": {"x" * 101: 1.0}}, "metric name"),
    ],
)
def test_malformed_results_change_nothing(
    engine: Engine, registered: list[dict[str, Any]], result: dict[str, Any], message: str
) -> None:
    key = registered[1]["trial_key"]
    with pytest.raises(ValueError, match=message):
        with session_scope(engine, write=True) as session:
            record_result(session, "s1", key, result)
    with session_scope(engine) as session:
        assert _trial(session, key).status == "pending"


def test_unknown_trial_is_a_lookup_error(engine: Engine, registered: list[dict[str, Any]]) -> None:
    with pytest.raises(LookupError, match="no trial 'nope' in sweep 's1'"):
        with session_scope(engine, write=True) as session:
            mark_running(session, "s1", "nope")
    with pytest.raises(LookupError, match="'s9'"):
        with session_scope(engine, write=True) as session:
            record_result(session, "s9", registered[0]["trial_key"], {"status": "done"})


def test_environments_are_deduplicated_by_fingerprint(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    keys = [r["trial_key"] for r in registered]
    gpu = {"cpu": "x86_64", "gpus": ["A100"]}
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", keys[0], make_result())
        record_result(session, "s1", keys[1], make_result())  # same environment
        record_result(session, "s1", keys[2], make_result(packages={"torch": "2.14.0"}))
        record_result(session, "s1", keys[3], make_result(hardware=gpu))
    with session_scope(engine) as session:
        trials = {k: _trial(session, k) for k in keys}
        envs = {e.id: e for e in session.scalars(select(Environment))}
    assert len(envs) == 3
    assert trials[keys[0]].environment_id == trials[keys[1]].environment_id
    same_hw_new_pkgs = envs[trials[keys[2]].environment_id]
    assert same_hw_new_pkgs.id != trials[keys[0]].environment_id
    assert same_hw_new_pkgs.hardware_fingerprint == (
        envs[trials[keys[0]].environment_id].hardware_fingerprint
    )
    assert envs[trials[keys[3]].environment_id].hardware_fingerprint != (
        same_hw_new_pkgs.hardware_fingerprint
    )


def test_fingerprint_ignores_key_order() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_deleting_a_sweep_cascades_in_the_database(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", registered[1]["trial_key"], make_result())
    with session_scope(engine, write=True) as session:
        # Core DELETE: only the database's ON DELETE CASCADE (foreign keys on) can clean up.
        session.execute(delete(Sweep).where(Sweep.name == "s1"))
    with session_scope(engine) as session:
        assert [_count(session, m) for m in (Sweep, Trial, Metric, Evidence)] == [0, 0, 0, 0]
        assert _count(session, Environment) == 1  # shared; kept


# --------------------------------------------------------------------------- properties

_metric_values = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6)
)
_metric_dicts = st.dictionaries(
    st.sampled_from(["perplexity", "accuracy", "decode_ms_per_token", "loss"]),
    st.tuples(_metric_values, st.sampled_from([None, "higher", "lower"])),
    max_size=4,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=_metric_dicts, second=_metric_dicts,
       first_failed=st.booleans(), second_evidence=st.booleans())
def test_stored_outcome_depends_only_on_the_last_result(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory,
    first: dict[str, Any], second: dict[str, Any], first_failed: bool, second_evidence: bool,
) -> None:
    key = registered[2]["trial_key"]
    last = make_result(metrics=second, evidence=second_evidence)
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, last)
    with session_scope(engine) as session:
        expected = _snapshot(session, key)
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, make_result(
            status="failed" if first_failed else "done", metrics=first,
            error={"type": "E", "message": "m", "traceback": "t"} if first_failed else None,
            hardware={"cpu": "other"}))
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", key, last)
        record_result(session, "s1", key, last)  # duplicate delivery
    with session_scope(engine) as session:
        got = _snapshot(session, key)
    # The first attempt's environment row stays (environments are shared), nothing else does.
    got.pop("environments"), expected.pop("environments")
    assert got == expected


# --------------------------------------------------------------------------- batches


def _outcomes(session: Session, sweep: str) -> dict[str, Any]:
    """Everything stored per trial of ``sweep``, keyed by the key's position-free tail."""
    out: dict[str, Any] = {}
    for trial in session.scalars(select(Trial).join(Sweep).where(Sweep.name == sweep)):
        metrics = session.scalars(select(Metric).where(Metric.trial_id == trial.id)).all()
        evidence = session.scalars(select(Evidence).where(Evidence.trial_id == trial.id)).all()
        out[trial.trial_key] = (
            trial.status, trial.attempts, trial.host, trial.duration_s, trial.failure_reason,
            trial.error_type, trial.error_message, trial.environment_id,
            sorted((m.name, m.value, m.direction, m.note) for m in metrics),
            [(e.params_before, e.params_after, e.changed_fraction, e.details) for e in evidence],
        )
    return out


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(["start", "done", "failed", "nan", "bare"]),
              st.sampled_from([None, "node-a", "node-b"])),
    min_size=1, max_size=14))
def test_a_batch_stores_what_its_events_one_by_one_would(
    engine: Engine, trial_rows: RowsFactory, make_result: ResultFactory,
    events: list[tuple[int, str, str | None]],
) -> None:
    """mark_running_many / record_results over runs of events == one call per event."""
    import uuid

    one, many = f"one-{uuid.uuid4().hex[:8]}", f"many-{uuid.uuid4().hex[:8]}"
    rows = trial_rows(3)
    with session_scope(engine, write=True) as session:
        register_sweep(session, one, SPEC, None, rows)
        register_sweep(session, many, SPEC, None, rows)
    keys = [r["trial_key"] for r in rows]

    def result(kind: str, host: str | None, i: int) -> dict[str, Any]:
        if kind == "failed":
            return make_result(status="failed", host=host or "node-x",
                               error={"type": "E", "message": f"m{i}", "traceback": "t"},
                               hardware={"cpu": "other"})
        if kind == "nan":
            return make_result(metrics={"perplexity": (math.nan, "lower")}, evidence=False)
        if kind == "bare":
            bare = make_result(metrics={"acc": (0.5 + i / 100, "higher")})
            del bare["host"], bare["environment"]
            return bare
        return make_result(metrics={"perplexity": (10.0 + i, "lower"),
                                    "speed": (float(i), "lower")})

    with session_scope(engine, write=True) as session:
        for i, (k, kind, host) in enumerate(events):
            if kind == "start":
                mark_running(session, one, keys[k], host)
            else:
                record_result(session, one, keys[k], result(kind, host, i))
    # The same events as runs of starts and runs of results, each run one batch call.
    runs: list[tuple[str, list[tuple[str, Any]]]] = []
    for i, (k, kind, host) in enumerate(events):
        item = (keys[k], host if kind == "start" else result(kind, host, i))
        what = "start" if kind == "start" else "result"
        if runs and runs[-1][0] == what:
            runs[-1][1].append(item)
        else:
            runs.append((what, [item]))
    with session_scope(engine, write=True) as session:
        for what, items in runs:
            if what == "start":
                mark_running_many(session, many, items)
            else:
                record_results(session, many, items)
    with session_scope(engine) as session:
        assert _outcomes(session, many) == _outcomes(session, one)


def test_a_batch_with_one_bad_result_or_key_changes_nothing(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory,
) -> None:
    keys = [r["trial_key"] for r in registered]
    with pytest.raises(ValueError, match="status"):
        with session_scope(engine, write=True) as session:
            record_results(session, "s1", [(keys[0], make_result()),
                                           (keys[1], {"status": "finished"})])
    with pytest.raises(LookupError, match="no trial 'nope'"):
        with session_scope(engine, write=True) as session:
            mark_running_many(session, "s1", [(keys[0], None), ("nope", None)])
    with pytest.raises(LookupError, match="no trial 'nope'"):
        with session_scope(engine, write=True) as session:
            record_results(session, "s1", [(keys[0], make_result()), ("nope", make_result())])
    with session_scope(engine) as session:
        assert {(t.status, t.attempts) for t in session.scalars(select(Trial))} == {
            ("pending", 0)}
        assert _count(session, Metric) == 0 and _count(session, Environment) == 0


def test_a_batch_larger_than_one_in_list_chunk(engine: Engine, trial_rows: RowsFactory,
                                                make_result: ResultFactory) -> None:
    rows = trial_rows(1200, baseline=False)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "big", SPEC, None, rows)
    keys = [r["trial_key"] for r in rows]
    with session_scope(engine, write=True) as session:
        mark_running_many(session, "big", [(k, "n") for k in keys])
        record_results(session, "big", [(k, make_result()) for k in keys])
        record_results(session, "big", [(k, make_result(metrics={"acc": (0.5, "higher")}))
                                        for k in keys])
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Trial).where(
            Trial.status == "done", Trial.attempts == 1)) == 1200
        assert set(session.scalars(select(Metric.name))) == {"acc"}
        assert _count(session, Metric) == 1200 and _count(session, Evidence) == 1200


# --------------------------------------------------------------------------- concurrency

N_PROCESSES = 8
PER_PROCESS = 50


def _concurrent_writer(
    url: str, worker: int, keys: list[str], barrier: Any, report: Any
) -> None:
    """Runs in a spawned process: one write session per record_result, as the callback does."""
    try:
        engine = make_engine(url)
        barrier.wait(timeout=120)
        for i, key in enumerate(keys):
            result = {
                "status": "done" if i % 5 else "failed",
                "metrics": {
                    "perplexity": {"value": 10.0 + worker + i / 100, "direction": "lower"},
                    "worker": {"value": float(worker), "direction": None},
                },
                "evidence": {"params_before": 10, "params_after": 8, "details": {"i": i}},
                # Two machines: the environment get-or-create races across processes.
                "environment": {"hardware": {"node": worker % 2}, "packages": {}, "git_sha": None},
                "host": f"node-{worker % 2}",
                "duration_s": 0.01,
            }
            if i % 5 == 0:
                result["error"] = {"type": "RuntimeError", "message": f"#{i}", "traceback": "t"}
            with session_scope(engine, write=True) as session:
                record_result(session, "stress", key, result)
        report.put((worker, None))
    except BaseException as exc:  # reported to the test, which fails on it
        report.put((worker, f"{type(exc).__name__}: {exc}"))


def test_concurrent_writers_from_many_processes(
    engine: Engine, db_url: str, trial_rows: RowsFactory
) -> None:
    rows = trial_rows(N_PROCESSES * PER_PROCESS, baseline=False)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "stress", SPEC, None, rows)
    keys = [r["trial_key"] for r in rows]
    engine.dispose()  # no pooled connection may cross into the children

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROCESSES)
    report = ctx.Queue()
    processes = [
        ctx.Process(
            target=_concurrent_writer,
            args=(db_url, w, keys[w * PER_PROCESS:(w + 1) * PER_PROCESS], barrier, report),
        )
        for w in range(N_PROCESSES)
    ]
    for p in processes:
        p.start()
    outcomes: dict[int, str | None] = {}
    try:
        for _ in processes:
            worker, error = report.get(timeout=240)
            outcomes[worker] = error
    except queue.Empty:
        pass
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert outcomes == dict.fromkeys(range(N_PROCESSES)), outcomes
    assert [p.exitcode for p in processes] == [0] * N_PROCESSES

    total = N_PROCESSES * PER_PROCESS
    with session_scope(engine) as session:
        statuses = dict(
            session.execute(select(Trial.status, func.count()).group_by(Trial.status)).all()
        )
        assert statuses == {"done": total * 4 // 5, "failed": total // 5}
        assert _count(session, Metric) == 2 * total
        assert _count(session, Evidence) == total
        assert _count(session, Environment) == 2
        per_worker = dict(session.execute(
            select(Metric.value, func.count()).where(Metric.name == "worker")
            .group_by(Metric.value)).all())
        assert per_worker == {float(w): PER_PROCESS for w in range(N_PROCESSES)}
        failed = session.scalars(select(Trial).where(Trial.status == "failed")).all()
        assert all(t.error_type == "RuntimeError" and t.finished_at for t in failed)


# --------------------------------------------------------------------------- failure reasons


def test_failure_reasons_are_stored_and_cleared_by_success(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    keys = [r["trial_key"] for r in registered]
    oom = {"type": "OutOfMemoryError", "message": "at batch size 1", "reason": "out_of_memory"}
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", keys[0], make_result(status="failed", error=oom))
        record_result(session, "s1", keys[1], make_result(
            status="timed_out", error={"type": "TrialTimeout", "message": "over 5 s"}))
        record_result(session, "s1", keys[2], make_result(
            status="failed", error={"type": "ValueError", "message": "bad"}))
    with session_scope(engine) as session:
        got = [(_trial(session, k).status, _trial(session, k).failure_reason) for k in keys[:3]]
    assert got == [("failed", "out_of_memory"), ("timed_out", "timed_out"), ("failed", "error")]
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", keys[0], make_result())
    with session_scope(engine) as session:
        assert _trial(session, keys[0]).failure_reason is None


def test_unknown_failure_reason_changes_nothing(
    engine: Engine, registered: list[dict[str, Any]], make_result: ResultFactory
) -> None:
    key = registered[0]["trial_key"]
    with session_scope(engine) as session:
        before = _snapshot(session, key)
    with pytest.raises(ValueError, match="failure reason"), \
            session_scope(engine, write=True) as session:
        record_result(session, "s1", key, make_result(
            status="failed", error={"type": "X", "message": "y", "reason": "cosmic_rays"}))
    with session_scope(engine) as session:
        assert _snapshot(session, key) == before
