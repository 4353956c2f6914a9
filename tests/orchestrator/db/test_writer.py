"""The driver's batched writer (orchestrator/db/writer.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from orchestrator.db.engine import session_scope
from orchestrator.db.models import Metric, Sweep, Trial
from orchestrator.db.store import register_sweep
from orchestrator.db.writer import ResultWriter, _Event, _segments

SPEC = {"name": "w"}
ResultFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def keys(engine: Engine, trial_rows: Callable[..., list[dict[str, Any]]]) -> list[str]:
    rows = trial_rows(11)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "w", SPEC, None, rows)
    return [r["trial_key"] for r in rows]


def _trials(engine: Engine) -> dict[str, tuple[str, int, str | None]]:
    with session_scope(engine) as session:
        return {t.trial_key: (t.status, t.attempts, t.host) for t in session.scalars(
            select(Trial).join(Sweep).where(Sweep.name == "w"))}


class _Gate:
    """An ``on_committed`` that holds the writer thread until released, so that the events
    queued meanwhile go into the writer's next transactions together."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        assert self.release.wait(timeout=60)


def test_events_queued_during_a_write_are_committed_together(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    gate = _Gate()
    committed: list[str] = []
    with ResultWriter(engine, "w") as writer:
        writer.started(keys[0])
        writer.finished(keys[0], make_result(), on_committed=gate)
        assert gate.reached.wait(timeout=60)
        for key in keys[1:]:
            writer.started(key, host="gpu-3")
            writer.finished(key, make_result(host="gpu-7"),
                            on_committed=lambda key=key: committed.append(key))
        gate.release.set()
        writer.flush()
        assert writer.batches == 2  # the first event pair, then the 20 queued meanwhile
    assert committed == keys[1:]
    trials = _trials(engine)
    assert trials[keys[0]] == ("done", 1, "node-1")
    assert {trials[k] for k in keys[1:]} == {("done", 1, "gpu-7")}
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Metric)) == len(keys)


def test_a_batch_never_exceeds_max_batch(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    gate = _Gate()
    with ResultWriter(engine, "w", max_batch=3) as writer:
        writer.finished(keys[0], make_result(), on_committed=gate)
        assert gate.reached.wait(timeout=60)
        for key in keys[1:]:  # 10 results: batches of 3, 3, 3, 1
            writer.finished(key, make_result())
        gate.release.set()
    assert writer.batches == 5
    assert {status for status, _, _ in _trials(engine).values()} == {"done"}


def test_a_lone_event_is_written_without_waiting_for_more(
    engine: Engine, keys: list[str]
) -> None:
    with ResultWriter(engine, "w") as writer:
        writer.started(keys[3], host="gpu-1")
        writer.flush()
        assert _trials(engine)[keys[3]] == ("running", 1, "gpu-1")
        assert writer.batches == 1


def test_a_failed_write_keeps_the_others_and_reaches_the_driver(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    gate = _Gate()
    committed: list[str] = []
    writer = ResultWriter(engine, "w")
    writer.finished(keys[0], make_result(), on_committed=gate)
    assert gate.reached.wait(timeout=60)
    # Queued together, so they share a transaction until the unknown trial breaks it.
    writer.finished(keys[1], make_result(), on_committed=lambda: committed.append(keys[1]))
    writer.finished("no-such-trial", make_result(),
                    on_committed=lambda: committed.append("no-such-trial"))
    writer.finished(keys[2], {"status": "finished"},
                    on_committed=lambda: committed.append(keys[2]))
    writer.started(keys[3])
    gate.release.set()
    with pytest.raises(LookupError, match="no trial 'no-such-trial' in sweep 'w'"):
        writer.flush()
    # Only the first error is raised; the result file of each failed one stays.
    assert committed == [keys[1]]
    trials = _trials(engine)
    assert trials[keys[1]][0] == "done" and trials[keys[2]][0] == "pending"
    assert trials[keys[3]] == ("running", 1, None)
    # The error was handed over once; the writer goes on.
    writer.finished(keys[4], make_result())
    writer.close()
    assert _trials(engine)[keys[4]][0] == "done"


def test_the_next_event_raises_a_failed_write(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    """Tune's callback hears of a failed write at its next event, as it did when it wrote."""
    gate = _Gate()
    writer = ResultWriter(engine, "w")
    writer.finished(keys[0], {"status": "finished"})
    writer.finished(keys[1], make_result(), on_committed=gate)  # written after the failure
    assert gate.reached.wait(timeout=60)
    gate.release.set()
    with pytest.raises(ValueError, match="result status"):
        writer.started(keys[2])
    writer.close()
    trials = _trials(engine)
    assert trials[keys[1]][0] == "done"
    assert trials[keys[0]][0] == trials[keys[2]][0] == "pending"  # refused, not queued


def test_close_writes_what_is_queued_and_refuses_more(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    writer = ResultWriter(engine, "w")
    for key in keys:
        writer.started(key)
        writer.finished(key, make_result())
    writer.close()
    writer.close()  # idempotent
    assert {t[0] for t in _trials(engine).values()} == {"done"}
    with pytest.raises(RuntimeError, match="closed"):
        writer.started(keys[0])


def test_leaving_with_an_error_keeps_that_error_and_stores_the_events(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(engine, "w") as writer:
            writer.started(keys[0])
            writer.finished(keys[0], make_result())
            writer.finished("no-such-trial", make_result())
            raise KeyboardInterrupt
    assert _trials(engine)[keys[0]] == ("done", 1, "node-1")


def test_a_retry_in_one_batch_counts_both_attempts(
    engine: Engine, keys: list[str], make_result: ResultFactory
) -> None:
    gate = _Gate()
    with ResultWriter(engine, "w") as writer:
        writer.started(keys[1])
        writer.finished(keys[1], make_result(), on_committed=gate)
        assert gate.reached.wait(timeout=60)
        key = keys[0]
        writer.started(key, host="a")
        writer.finished(key, make_result(status="failed", host="a",
                                         error={"type": "E", "message": "m", "traceback": "t"}))
        writer.started(key, host="b")
        writer.finished(key, make_result(host="b"))
        gate.release.set()
    assert writer.batches == 2
    assert _trials(engine)[keys[0]] == ("done", 2, "b")


def test_segments_split_only_where_a_trial_restarts_after_its_result() -> None:
    events = [_Event("a"), _Event("b"), _Event("a", {"status": "done"}), _Event("c"),
              _Event("a"), _Event("b", {"status": "done"}), _Event("a", {"status": "done"})]
    assert [[(e.key, e.result is None) for e in s] for s in _segments(events)] == [
        [("a", True), ("b", True), ("a", False), ("c", True)],
        [("a", True), ("b", False), ("a", False)],
    ]


def test_max_batch_must_be_positive(engine: Engine) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        ResultWriter(engine, "w", max_batch=0)
