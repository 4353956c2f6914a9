"""Fixtures of the results-database tests.

``db_url`` is parametrised by backend so every test runs once per backend. SQLite always;
PostgreSQL on the server named by ``$SWEEP_TEST_POSTGRES_URL`` or, without it, on a
throwaway PostgreSQL 15 server started once per test session (``postgres_admin_url``).
Each test gets a fresh database there. Without the binaries the PostgreSQL parameter is
skipped with a reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url

from orchestrator.db.engine import dispose_engines, ensure_schema

# The URL of a server on which the tests may create and drop databases, e.g.
# postgresql+psycopg://postgres@127.0.0.1:5432/postgres; without it a server is started.
POSTGRES_ADMIN_URL = os.environ.get("SWEEP_TEST_POSTGRES_URL")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HAVE_POSTGRES = bool(POSTGRES_ADMIN_URL) or (PG_BIN / "initdb").exists()
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not HAVE_POSTGRES,
            reason=f"no PostgreSQL 15 ({PG_BIN / 'initdb'} absent, $SWEEP_TEST_POSTGRES_URL unset)",
        ),
    ),
]


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


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """Admin URL of a PostgreSQL server for this test session (given or started here)."""
    if POSTGRES_ADMIN_URL:
        yield POSTGRES_ADMIN_URL
        return
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15: {PG_BIN / 'initdb'} absent")
    with running_postgres() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty results database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        dispose_engines()
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    name = f"sweep_test_{uuid.uuid4().hex[:12]}"
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


@pytest.fixture
def backend(db_url: str) -> str:
    """``sqlite`` or ``postgresql``."""
    return db_url.split(":", 1)[0].split("+", 1)[0]


@pytest.fixture
def sqlite_only(backend: str) -> None:
    """Skip on other backends (for tests of SQLite-specific behaviour)."""
    if backend != "sqlite":
        pytest.skip("SQLite-specific")


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on a database migrated to the newest schema."""
    return ensure_schema(db_url, create=True)


def _trial_rows(
    n: int,
    model: str = "tiny-llama",
    dataset: str = "wikitext",
    method: str = "magnitude",
    baseline: bool = True,
    prefix: str = "",
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if baseline:
        rows.append(_row(f"{prefix}{model}|{dataset}|base", 0, model, "none", None, dataset, True))
    for i in range(n):
        rate = round(0.1 * (i + 1), 3)
        key = f"{prefix}{model}|{dataset}|{method}|{i}"
        rows.append(_row(key, len(rows), model, method, rate, dataset, False))
    return rows


def _row(
    key: str, position: int, model: str, method: str, rate: float | None, dataset: str,
    is_baseline: bool,
) -> dict[str, Any]:
    params = {} if is_baseline else {"scope": "global"}
    return {
        "trial_key": key,
        "position": position,
        "model": model,
        "method": method,
        "rate": rate,
        "dataset": dataset,
        "params": params,
        "config": {"trial_key": key, "method": {"name": method, "params": params, "rate": rate}},
        "is_baseline": is_baseline,
    }


@pytest.fixture
def trial_rows() -> Callable[..., list[dict[str, Any]]]:
    """Factory of trial dicts as ``spec.TrialSpec.row()`` produces them (baseline first)."""
    return _trial_rows


def _result(
    status: str = "done",
    metrics: dict[str, tuple[float | None, str | None]] | None = None,
    hardware: dict[str, Any] | None = None,
    packages: dict[str, Any] | None = None,
    evidence: bool = True,
    error: dict[str, str] | None = None,
    host: str = "node-1",
) -> dict[str, Any]:
    metrics = {"perplexity": (12.5, "lower")} if metrics is None else metrics
    result: dict[str, Any] = {
        "status": status,
        "metrics": {k: {"value": v, "direction": d} for k, (v, d) in metrics.items()},
        "environment": {
            "hardware": hardware or {"cpu": "x86_64", "gpus": []},
            "packages": packages or {"torch": "2.13.0"},
            "git_sha": "abc123",
        },
        "host": host,
        "duration_s": 3.25,
    }
    if evidence:
        result["evidence"] = {
            "params_before": 5_000_000_000,
            "params_after": 4_000_000_000,
            "changed_fraction": 0.2,
            "max_abs_dlogits": 1.5,
            "details": {"heads_removed": {"0": [1, 2]}},
        }
    if error is not None:
        result["error"] = error
    return result


@pytest.fixture
def make_result() -> Callable[..., dict[str, Any]]:
    """Factory of worker result dicts (metrics given as {name: (value, direction)})."""
    return _result
