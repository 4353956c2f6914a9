"""Driver leases: which ``sweep launch`` owns which trials, and when an owner is dead.

Every launch registers a :class:`~orchestrator.db.models.Driver` row and refreshes its
heartbeat while it runs. Before scheduling, a launch *reclaims* its sweep: trials claimed
by a dead driver (heartbeat older than the lease, process gone on this host, or finished)
go back to ``pending`` — the zombies of a crashed driver never stay ``running`` — while
trials claimed by a live driver are left to it and reported as busy. Then the launch
claims what it will run, so two launches of one sweep never run a trial twice.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.db.models import Driver, Sweep, Trial, utcnow

HEARTBEAT_S = 10.0
# Six missed heartbeats: long enough for a driver stalled by a busy machine, short enough
# that a relaunch after a crash on another host does not wait long.
LEASE_S = 60.0


@dataclass(frozen=True)
class Reclaimed:
    """What :func:`reclaim` found: trials reset from dead drivers, trials live ones hold."""

    reset: int
    busy: dict[str, str]


def this_host() -> str:
    """The host name stored with drivers (and compared to tell local processes)."""
    return socket.gethostname()[:255]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A killed but unreaped process still answers kill(0); its state is Z.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def driver_alive(driver: Driver, now: datetime, lease_s: float = LEASE_S) -> bool:
    """Whether ``driver`` still holds its lease, as seen from this process."""
    if driver.finished_at is not None:
        return False
    if now - driver.heartbeat_at > timedelta(seconds=lease_s):
        return False
    if driver.host == this_host():
        # This process's own earlier plans hold nothing against it.
        return driver.pid != os.getpid() and pid_alive(driver.pid)
    return True


def describe(driver: Driver) -> str:
    """``host pid N`` of a driver, for messages."""
    return f"{driver.host} pid {driver.pid}"


def start_driver(session: Session, sweep_name: str) -> int:
    """Register this process as a driver of ``sweep_name``; returns the driver id."""
    sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == sweep_name))
    if sweep_id is None:
        raise LookupError(f"no sweep {sweep_name!r}")
    driver = Driver(sweep_id=sweep_id, host=this_host(), pid=os.getpid())
    session.add(driver)
    session.flush()
    return driver.id


def heartbeat(session: Session, driver_id: int) -> None:
    """Refresh the lease of ``driver_id``."""
    session.execute(update(Driver).where(Driver.id == driver_id).values(heartbeat_at=utcnow()))


def finish_driver(session: Session, driver_id: int) -> None:
    """End a driver's lease and release the trials it claimed but did not start."""
    session.execute(update(Driver).where(Driver.id == driver_id).values(finished_at=utcnow()))
    session.execute(
        update(Trial)
        .where(Trial.driver_id == driver_id, Trial.status == "pending")
        .values(driver_id=None)
    )


def reclaim(session: Session, sweep_name: str, lease_s: float = LEASE_S) -> Reclaimed:
    """Free the sweep's trials held by dead drivers; report those live drivers hold.

    A ``running`` trial of a dead driver (or of no driver: written before leases existed)
    becomes ``pending`` again: its attempt was interrupted and it must run again.
    """
    sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == sweep_name))
    if sweep_id is None:
        return Reclaimed(0, {})
    now = utcnow()
    drivers = {d.id: d for d in session.scalars(select(Driver).where(Driver.sweep_id == sweep_id))}
    alive = {i for i, d in drivers.items() if driver_alive(d, now, lease_s)}
    held = session.execute(
        select(Trial.id, Trial.trial_key, Trial.status, Trial.driver_id)
        .where(Trial.sweep_id == sweep_id, Trial.status.in_(("pending", "running")))
    ).all()
    busy: dict[str, str] = {}
    stale_running: list[int] = []
    stale_claims: list[int] = []
    for trial_id, key, status, driver_id in held:
        if driver_id in alive:
            busy[key] = describe(drivers[driver_id])
        elif status == "running":
            stale_running.append(trial_id)
        elif driver_id is not None:
            stale_claims.append(trial_id)
    if stale_running:
        session.execute(update(Trial).where(Trial.id.in_(stale_running))
                        .values(status="pending", started_at=None, driver_id=None))
    if stale_claims:
        session.execute(update(Trial).where(Trial.id.in_(stale_claims)).values(driver_id=None))
    # Dead drivers' rows are kept (they are the history of who ran what) but marked ended.
    dead = [i for i, d in drivers.items() if i not in alive and d.finished_at is None]
    if dead:
        session.execute(update(Driver).where(Driver.id.in_(dead)).values(finished_at=now))
    session.flush()
    return Reclaimed(len(stale_running), busy)


def claim(session: Session, sweep_name: str, driver_id: int, trial_keys: list[str]) -> None:
    """Mark ``trial_keys`` of the sweep as claimed by ``driver_id``."""
    sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == sweep_name))
    for start in range(0, len(trial_keys), 500):  # stay below bound-parameter limits
        chunk = trial_keys[start:start + 500]
        session.execute(update(Trial).where(Trial.sweep_id == sweep_id,
                                            Trial.trial_key.in_(chunk))
                        .values(driver_id=driver_id))
    session.flush()
