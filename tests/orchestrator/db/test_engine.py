"""Engine configuration, session scope and the schema check (orchestrator/db/engine.py)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError

from orchestrator.db import engine as engine_module
from orchestrator.db.engine import (
    SQLITE_BUSY_TIMEOUT_S,
    current_revision,
    default_url,
    ensure_schema,
    head_revision,
    make_engine,
    redact_url,
    session_scope,
    sqlite_path,
)
from orchestrator.db.models import Sweep
from orchestrator.errors import NoDatabase, SweepError, UnknownSchema


def _raw(db_url: str, timeout: float = 0.0) -> sqlite3.Connection:
    """A second, independent connection that does not wait for locks (autocommit mode)."""
    path = sqlite_path(db_url)
    assert path is not None
    return sqlite3.connect(path, timeout=timeout, isolation_level=None)


def _add_sweep(engine: Engine, name: str) -> None:
    with session_scope(engine, write=True) as session:
        session.add(Sweep(name=name, spec={}))


# --------------------------------------------------------------------------- URLs


def test_default_url_is_env_or_local_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWEEP_DB_URL", raising=False)
    assert default_url() == "sqlite:///sweeps.db"
    monkeypatch.setenv("SWEEP_DB_URL", "postgresql://u:pw@db.example/sweeps")
    assert default_url() == "postgresql://u:pw@db.example/sweeps"


def test_redact_url_hides_password_only() -> None:
    url = "postgresql+psycopg://alice:s3cr%40t@db.example:5432/sweeps"
    shown = redact_url(url)
    assert "s3cr" not in shown
    assert shown == "postgresql+psycopg://alice:***@db.example:5432/sweeps"
    assert redact_url("sqlite:///sweeps.db") == "sqlite:///sweeps.db"


def test_engine_is_cached_per_url(db_url: str, tmp_path: Path) -> None:
    assert make_engine(db_url) is make_engine(db_url)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert make_engine(other) is not make_engine(db_url)


# --------------------------------------------------------------------------- SQLite settings


@pytest.mark.usefixtures("sqlite_only")
def test_every_sqlite_connection_gets_wal_busy_timeout_and_foreign_keys(engine: Engine) -> None:
    # Two connections held at once, so the pool cannot hand back the same one twice.
    with engine.connect() as first, engine.connect() as second:
        for conn in (first, second):
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
            assert busy == int(SQLITE_BUSY_TIMEOUT_S * 1000) == 30_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            # The driver must not emit BEGINs of its own; the engine's listener does.
            assert conn.connection.driver_connection.isolation_level is None


@pytest.mark.usefixtures("sqlite_only")
def test_new_sqlite_file_is_private(db_url: str) -> None:
    path = sqlite_path(db_url)
    assert path is not None and not path.exists()
    old_umask = os.umask(0o022)  # the usual umask, which would give 0644
    try:
        ensure_schema(db_url, create=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600


@pytest.mark.usefixtures("sqlite_only")
def test_new_sqlite_file_gets_its_directory_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results' / 'nested' / 'sweeps.db'}"
    ensure_schema(url, create=True)
    assert (tmp_path / "results" / "nested" / "sweeps.db").is_file()


@pytest.mark.usefixtures("sqlite_only")
def test_write_session_holds_the_write_lock_from_its_start(engine: Engine, db_url: str) -> None:
    other = _raw(db_url)
    try:
        with session_scope(engine, write=True):
            # Nothing executed yet in the session, and still no one else may write.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # released at the end of the block
        other.execute("ROLLBACK")
    finally:
        other.close()


@pytest.mark.usefixtures("sqlite_only")
def test_read_session_does_not_block_writers(engine: Engine, db_url: str) -> None:
    other = _raw(db_url)
    try:
        with session_scope(engine) as session:
            assert session.scalar(select(func.count()).select_from(Sweep)) == 0
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO sweeps (name, spec, created_at, updated_at) "
                          "VALUES ('x', '{}', '2026-01-01', '2026-01-01')")
            other.execute("COMMIT")
    finally:
        other.close()


@pytest.mark.usefixtures("sqlite_only")
def test_deferred_read_then_write_fails_where_immediate_waits(engine: Engine) -> None:
    """Why write sessions use BEGIN IMMEDIATE: the busy timeout cannot save a deferred one."""
    _add_sweep(engine, "seed")

    # Deferred: read, let another writer commit, then write -> locked at once, no waiting.
    started = time.monotonic()
    with pytest.raises(OperationalError, match="locked"):
        with session_scope(engine) as session:
            session.scalar(select(func.count()).select_from(Sweep))
            _add_sweep(engine, "concurrent")
            session.add(Sweep(name="late", spec={}))
            session.flush()
    assert time.monotonic() - started < SQLITE_BUSY_TIMEOUT_S / 2

    # Immediate: the concurrent writer queues behind the session instead.
    finished: list[float] = []

    def concurrent_writer() -> None:
        _add_sweep(engine, "queued")
        finished.append(time.monotonic())

    with session_scope(engine, write=True) as session:
        session.scalar(select(func.count()).select_from(Sweep))
        writer = threading.Thread(target=concurrent_writer)
        writer.start()
        time.sleep(0.3)
        assert not finished, "the concurrent writer should wait for the write session"
        session.add(Sweep(name="on-time", spec={}))
        committed_before = time.monotonic()
    writer.join(timeout=10)
    assert finished and finished[0] >= committed_before
    with session_scope(engine) as session:
        names = set(session.scalars(select(Sweep.name)))
    assert names == {"seed", "concurrent", "on-time", "queued"}


# --------------------------------------------------------------------------- session scope


def test_session_scope_commits_on_success(engine: Engine) -> None:
    with session_scope(engine, write=True) as session:
        session.add(Sweep(name="kept", spec={"a": 1}))
    with session_scope(engine) as session:
        assert session.scalars(select(Sweep.spec).where(Sweep.name == "kept")).one() == {"a": 1}


def test_session_scope_rolls_back_on_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with session_scope(engine, write=True) as session:
            session.add(Sweep(name="discarded", spec={}))
            session.flush()
            raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0


def test_objects_stay_readable_after_the_scope(engine: Engine) -> None:
    with session_scope(engine, write=True) as session:
        sweep = Sweep(name="detached", spec={})
        session.add(sweep)
    assert sweep.name == "detached" and sweep.id is not None
    assert sweep.created_at.utcoffset() is not None


# --------------------------------------------------------------------------- schema check


@pytest.mark.usefixtures("sqlite_only")
def test_missing_database_is_not_created_by_a_read(db_url: str) -> None:
    path = sqlite_path(db_url)
    assert path is not None
    with pytest.raises(NoDatabase) as caught:
        ensure_schema(db_url, create=False)
    assert isinstance(caught.value, SweepError)
    assert caught.value.exit_code == 2
    assert str(caught.value) == (
        f"no results database at {redact_url(db_url)} — run `sweep launch SPEC` first or "
        "pass --db"
    )
    assert not path.exists()


def test_empty_database_is_no_database_for_a_read(db_url: str) -> None:
    make_engine(db_url).connect().close()  # the database exists but has no tables
    with pytest.raises(NoDatabase, match="sweep launch"):
        ensure_schema(db_url, create=False)


def test_ensure_schema_creates_then_accepts(db_url: str) -> None:
    engine = ensure_schema(db_url, create=True)
    assert current_revision(db_url) == head_revision() == "0003_trial_gpus"
    assert ensure_schema(db_url, create=False) is engine
    assert ensure_schema(db_url, create=True) is engine


def test_unknown_revision_is_refused(engine: Engine, db_url: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(UnknownSchema, match="9999_future.*upgrade compress-sweep"):
        ensure_schema(db_url, create=False)


def test_foreign_tables_are_refused(db_url: str) -> None:
    with make_engine(db_url).begin() as conn:
        conn.execute(text("CREATE TABLE inventory (id INTEGER PRIMARY KEY)"))
    with pytest.raises(UnknownSchema, match="no compress-sweep schema revision"):
        ensure_schema(db_url, create=True)


def test_script_location_is_the_migrations_package() -> None:
    location = Path(engine_module.script_location())
    assert (location / "env.py").is_file()
    assert (location / "versions" / "0001_initial.py").is_file()


def test_database_layer_imports_nothing_heavy() -> None:
    """`sweep status` must start fast: no torch, ray or transformers behind the DB layer."""
    code = (
        "import sys\n"
        "import orchestrator.db.engine, orchestrator.db.models, orchestrator.db.store\n"
        "import orchestrator.queries\n"
        "import migrations\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(top & {'torch', 'ray', 'transformers'})\n"
        "print(','.join(heavy))\n"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == ""


@pytest.mark.usefixtures("sqlite_only")
def test_a_file_that_is_not_a_database_is_one_line(db_url: str) -> None:
    path = sqlite_path(db_url)
    assert path is not None
    path.write_text("name,score\nfoo,1\n" * 200)
    with pytest.raises(SweepError, match=r"^cannot open the results database at .*: file is not"):
        ensure_schema(db_url, create=False)

