"""Engines, session scope and the schema check of the results database.

SQLite is the default backend and the one that bites under concurrency, so it is configured
here with care: WAL (readers never block the writer), a 30 s busy timeout, foreign keys on,
and transactions begun by SQLAlchemy rather than by the pysqlite driver, so that a write
session can start with ``BEGIN IMMEDIATE``. A deferred ``BEGIN`` that reads and then writes
fails with "database is locked" as soon as another connection committed in between, and the
busy timeout does not help (SQLite refuses to upgrade a stale read snapshot).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator.errors import NoDatabase, SchemaOutOfDate, SweepError, UnknownSchema

if TYPE_CHECKING:
    from alembic.config import Config

DEFAULT_URL = "sqlite:///sweeps.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
VERSION_TABLE = "alembic_version"
# Any constant shared by every compress-sweep process ("csweep" in ASCII).
MIGRATION_LOCK_ID = 0x637377656570

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def default_url() -> str:
    """The database URL used when none is given: ``$SWEEP_DB_URL`` or ``sqlite:///sweeps.db``."""
    return os.environ.get("SWEEP_DB_URL") or DEFAULT_URL


def redact_url(url: str | URL) -> str:
    """``url`` with its password replaced by ``***``, fit for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL; None for other backends and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("uri") in ("true", "1"):
        return None
    return Path(database)


def _create_private_file(path: Path) -> None:
    # Results can name unpublished models and hosts; nobody but the owner needs to read them.
    # SQLite creates a missing file with the umask's permissions (usually world-readable), so
    # the file is created here first; SQLite gives the -wal and -shm files the same mode.
    # It is also switched to WAL before it appears: switching needs an exclusive lock, and a
    # process that opened the new file meanwhile (two launches started together) could get
    # "database is locked" without the busy timeout being applied. WAL mode is stored in the
    # file, so every later connection finds it set; the file appears atomically (a hard
    # link fails if another process won).
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        import sqlite3

        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # The driver would otherwise emit its own deferred BEGIN before DML (and none before a
    # SELECT); turning that off lets the "begin" listener choose the kind of BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching an existing file to WAL needs a lock.
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin")
    if mode is None:
        conn.exec_driver_sql("BEGIN")
    elif mode in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        conn.exec_driver_sql(f"BEGIN {mode}")
    else:
        raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE, not {mode!r}")


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``, configured for this project and cached per URL per process.

    SQLite: WAL, ``busy_timeout`` 30 s, ``foreign_keys=ON``, ``synchronous=NORMAL``, a new
    file created with mode 0600, and ``BEGIN IMMEDIATE`` for connections carrying the
    execution option ``sqlite_begin="IMMEDIATE"`` (see :func:`session_scope`). PostgreSQL:
    ``pool_pre_ping`` so a server restart between two CLI calls is survived.
    """
    parsed = make_url(url)
    # The password is part of the key so two credentials never share a pool; the cache key
    # stays in memory only.
    key = (os.getpid(), parsed.render_as_string(hide_password=False))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _build_engine(parsed)
            _engines[key] = engine
        return engine


def _build_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            _create_private_file(path)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    return create_engine(url)


def dispose_engines() -> None:
    """Close every pooled connection of this process's cached engines and forget them."""
    with _engines_lock:
        engines = [e for (pid, _), e in _engines.items() if pid == os.getpid()]
        _engines.clear()
    for engine in engines:
        engine.dispose()


@contextmanager
def session_scope(engine: Engine, write: bool = False) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    ``write=True`` is for read-then-write transactions: on SQLite the transaction starts with
    ``BEGIN IMMEDIATE`` at once, taking the write lock before the first read, so concurrent
    writers queue on the busy timeout instead of failing. Objects stay usable after the
    block (``expire_on_commit=False``).
    """
    bind = engine.execution_options(sqlite_begin="IMMEDIATE") if write else engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        if write:
            # Begin now rather than at the first statement, so the lock is held for the
            # whole block and nothing read inside it can be stale.
            session.connection()
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --------------------------------------------------------------------------- migrations


def script_location() -> str:
    """Directory of the Alembic environment (the ``migrations`` package)."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the 'migrations' package is not importable; is compress-sweep installed?"
        )
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


def alembic_config(url: str | URL, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` built in code (no alembic.ini) for ``url``.

    With ``connection`` the migrations run on it, inside the caller's transaction.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", script_location())
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    rendered = make_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    config.attributes["url"] = rendered
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration revision this code knows."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(script_location())
    heads = script.get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is stamped with; None if unversioned or empty."""
    from alembic.runtime.migration import MigrationContext

    with make_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    # Batch migrations on SQLite copy a table and drop the old one; with foreign keys on,
    # the DROP would cascade-delete every child row. The pragma is a no-op inside a
    # transaction, so it is switched on the raw connection before SQLAlchemy begins, and
    # integrity is checked explicitly before commit.
    sqlite = engine.dialect.name == "sqlite"
    with engine.execution_options(sqlite_begin="IMMEDIATE").connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None  # a checked-out connection always has one
        if sqlite:
            raw.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    # Two launches on an empty database would both create the schema (and
                    # collide in the catalog); the second waits here, then finds it at head.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                raw.execute("PRAGMA foreign_keys = ON")


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (creating the schema if empty)."""
    from alembic import command

    with _migration_connection(make_engine(url)) as conn:
        command.upgrade(alembic_config(url, conn), revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops everything)."""
    from alembic import command

    with _migration_connection(make_engine(url)) as conn:
        command.downgrade(alembic_config(url, conn), revision)


def ensure_schema(url: str | URL, create: bool) -> Engine:
    """An engine for ``url`` whose database is at the newest schema revision.

    An empty database is migrated to head when ``create`` (``sweep launch``); otherwise a
    missing or empty database raises :class:`NoDatabase`. A database at an older revision
    raises :class:`SchemaOutOfDate` naming ``sweep db upgrade``: migrating silently under
    a teammate's running sweep is not this function's call.
    """
    shown = redact_url(url)
    path = sqlite_path(url)
    if path is not None and not path.exists() and not create:
        # Checked before make_engine, which would create the file.
        raise NoDatabase(
            f"no results database at {shown} — run `sweep launch SPEC` first or pass --db"
        )
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        revision = current_revision(url)
    except DBAPIError as exc:
        # Unreachable server, wrong password, a file that is not SQLite: one line, no SQL.
        detail = str(exc.orig).strip()
        reason = detail.splitlines()[0] if detail else type(exc.orig).__name__
        raise SweepError(f"cannot open the results database at {shown}: {reason}") from exc
    if revision is None and not (tables - {VERSION_TABLE}):
        if not create:
            raise NoDatabase(
                f"no results database at {shown} (it is empty) — run `sweep launch SPEC` first "
                "or pass --db"
            )
        upgrade(url, "head")
        return engine
    head = head_revision()
    if revision == head:
        return engine
    if revision is None:
        raise UnknownSchema(
            f"{shown} has tables but no compress-sweep schema revision; "
            "point --db at a compress-sweep results database"
        )
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(script_location())
    known = {rev.revision for rev in script.iterate_revisions(head, "base")}
    if revision not in known:
        raise UnknownSchema(
            f"the results database at {shown} is at schema revision {revision!r}, which this "
            f"version of compress-sweep does not know (newest known: {head!r}); "
            "upgrade compress-sweep"
        )
    raise SchemaOutOfDate(
        f"the results database at {shown} is at schema revision {revision!r}, older than "
        f"{head!r} — run `sweep db upgrade` to migrate it"
    )
