"""Driver leases: a dead driver's trials are reclaimed, a live driver's are left alone."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from orchestrator.db.engine import session_scope
from orchestrator.db.leases import (
    LEASE_S,
    claim,
    finish_driver,
    heartbeat,
    pid_alive,
    reclaim,
    start_driver,
)
from orchestrator.db.models import Driver, Trial, utcnow
from orchestrator.db.store import mark_running, record_result, register_sweep


@pytest.fixture
def keys(engine: Engine, trial_rows: Callable[..., list[dict[str, Any]]]) -> list[str]:
    rows = trial_rows(3)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", {}, None, rows)
    return [r["trial_key"] for r in rows]


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    """A live process on this host that is not the test process."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def _driver(engine: Engine, **values: Any) -> int:
    """A driver row of another launch, with the given host/pid/heartbeat/finished_at."""
    with session_scope(engine, write=True) as session:
        driver_id = start_driver(session, "s1")
        session.execute(update(Driver).where(Driver.id == driver_id).values(**values))
    return driver_id


def _run_under(engine: Engine, driver_id: int, key: str) -> None:
    with session_scope(engine, write=True) as session:
        claim(session, "s1", driver_id, [key])
        mark_running(session, "s1", key)


def _states(engine: Engine) -> dict[str, tuple[str, int | None]]:
    with session_scope(engine) as session:
        rows = session.execute(select(Trial.trial_key, Trial.status, Trial.driver_id)).all()
    return {k: (s, d) for k, s, d in rows}


def test_a_running_trial_without_a_driver_is_reset(engine: Engine, keys: list[str]) -> None:
    with session_scope(engine, write=True) as session:
        mark_running(session, "s1", keys[0])
    with session_scope(engine, write=True) as session:
        found = reclaim(session, "s1")
    assert (found.reset, found.busy) == (1, {})
    assert _states(engine)[keys[0]] == ("pending", None)


def test_a_live_local_driver_keeps_its_trials(
    engine: Engine, keys: list[str], other_process: subprocess.Popen
) -> None:
    driver_id = _driver(engine, pid=other_process.pid)
    _run_under(engine, driver_id, keys[0])
    with session_scope(engine, write=True) as session:
        claim(session, "s1", driver_id, [keys[1]])  # claimed, not started yet
    with session_scope(engine, write=True) as session:
        found = reclaim(session, "s1")
    assert found.reset == 0
    assert set(found.busy) == {keys[0], keys[1]}
    assert f"pid {other_process.pid}" in found.busy[keys[0]]
    states = _states(engine)
    assert states[keys[0]] == ("running", driver_id)
    assert states[keys[1]] == ("pending", driver_id)


def test_a_killed_local_driver_loses_its_trials_at_once(
    engine: Engine, keys: list[str], other_process: subprocess.Popen
) -> None:
    driver_id = _driver(engine, pid=other_process.pid)
    _run_under(engine, driver_id, keys[0])
    other_process.kill()  # kill -9; the heartbeat is still fresh
    other_process.wait()
    assert not pid_alive(other_process.pid)
    with session_scope(engine, write=True) as session:
        found = reclaim(session, "s1")
    assert (found.reset, found.busy) == (1, {})
    assert _states(engine)[keys[0]] == ("pending", None)
    with session_scope(engine) as session:
        assert session.get(Driver, driver_id).finished_at is not None


def test_a_remote_driver_holds_its_lease_until_the_heartbeat_is_stale(
    engine: Engine, keys: list[str]
) -> None:
    driver_id = _driver(engine, host="node-elsewhere", pid=1)
    _run_under(engine, driver_id, keys[0])
    with session_scope(engine, write=True) as session:
        assert set(reclaim(session, "s1").busy) == {keys[0]}
    stale = utcnow() - timedelta(seconds=LEASE_S + 1)
    with session_scope(engine, write=True) as session:
        session.execute(update(Driver).where(Driver.id == driver_id).values(heartbeat_at=stale))
    with session_scope(engine, write=True) as session:
        found = reclaim(session, "s1")
    assert (found.reset, found.busy) == (1, {})
    # A heartbeat renews the lease.
    driver_id = _driver(engine, host="node-elsewhere", pid=1, heartbeat_at=stale)
    _run_under(engine, driver_id, keys[1])
    with session_scope(engine, write=True) as session:
        heartbeat(session, driver_id)
    with session_scope(engine, write=True) as session:
        assert set(reclaim(session, "s1").busy) == {keys[1]}


def test_finishing_releases_claims_and_keeps_results(
    engine: Engine, keys: list[str], make_result: Callable[..., dict[str, Any]]
) -> None:
    driver_id = _driver(engine, host="node-elsewhere", pid=1)
    _run_under(engine, driver_id, keys[0])
    with session_scope(engine, write=True) as session:
        record_result(session, "s1", keys[0], make_result())
        claim(session, "s1", driver_id, [keys[1]])
        finish_driver(session, driver_id)
    states = _states(engine)
    assert states[keys[0]] == ("done", driver_id)
    assert states[keys[1]] == ("pending", None)
    with session_scope(engine, write=True) as session:
        assert reclaim(session, "s1").busy == {}


def test_this_process_never_waits_for_itself(engine: Engine, keys: list[str]) -> None:
    with session_scope(engine, write=True) as session:
        driver_id = start_driver(session, "s1")
    _run_under(engine, driver_id, keys[0])
    with session_scope(engine, write=True) as session:
        found = reclaim(session, "s1")
    assert (found.reset, found.busy) == (1, {})


def test_unknown_sweep_reclaims_nothing(engine: Engine) -> None:
    with session_scope(engine, write=True) as session:
        assert reclaim(session, "nope").reset == 0
