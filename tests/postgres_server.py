"""A throwaway PostgreSQL 15 server for the tests (shared by every test that needs one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The URL of a server on which the tests may create and drop databases, e.g.
# postgresql+psycopg://postgres@127.0.0.1:5432/postgres; without it a server is started.
POSTGRES_ADMIN_URL = os.environ.get("SWEEP_TEST_POSTGRES_URL")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HAVE_POSTGRES = bool(POSTGRES_ADMIN_URL) or (PG_BIN / "initdb").exists()
def _free_port() -> int:
    # Racy in theory (another process could take it before the server binds); pg_ctl then
    # fails loudly, which is acceptable for a test fixture.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    # The server refuses to run as root; the tests usually do, so drop to the postgres user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str]) -> None:
    proc = subprocess.run(_as_postgres(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a throwaway PostgreSQL 15 server; yields its admin URL, stops and removes it."""
    # Short path: the socket path "<dir>/.s.PGSQL.<port>" must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, user="postgres", group="postgres")
        root.chmod(0o700)
        data = root / "data"
        port = _free_port()
        _run([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "-E", "UTF8", "--no-sync", "--no-instructions"])
        options = (f"-p {port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options,
              "-l", str(root / "log"), "-w", "-t", "30", "start"])
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Backends of the tests that run once per database backend (`db_url` and the like).
def backends() -> list:
    """``["sqlite", postgresql]`` as pytest params; PostgreSQL skipped with a reason when
    there is no server to use."""
    import pytest

    return [
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not HAVE_POSTGRES,
                reason=f"no PostgreSQL 15 ({PG_BIN / 'initdb'} absent, "
                       "$SWEEP_TEST_POSTGRES_URL unset)",
            ),
        ),
    ]


def fresh_database_url(request, tmp_path: Path, prefix: str = "sweep_test") -> Iterator[str]:
    """Yield the URL of a fresh, empty database on the backend ``request.param`` names (a
    file under ``tmp_path``, or a database created on the session's PostgreSQL server and
    dropped afterwards); for fixtures parametrised with :func:`backends`."""
    import uuid

    from sqlalchemy import create_engine, make_url

    from orchestrator.db.engine import dispose_engines

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        dispose_engines()
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
