"""``sweep db upgrade | current | downgrade`` on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret"


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", db_url, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh empty database on the server (dropped afterwards)."""
    name = f"sweep_cli_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(postgres_admin_url).set(database=name).render_as_string(
            hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _head() -> str:
    from orchestrator.db.engine import head_revision

    return head_revision()


def _round_trip(url: str) -> None:
    head = _head()
    out = cli(url, "db", "current")
    assert out.returncode == 0, out.stderr
    assert "base (no schema)" in out.stdout and "not at head" in out.stdout

    out = cli(url, "db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert f"revision: base (no schema) -> {head}" in out.stdout

    out = cli(url, "db", "current")
    assert out.returncode == 0, out.stderr
    assert f"revision: {head} (head)" in out.stdout

    out = cli(url, "db", "upgrade", "--revision", "head")
    assert out.returncode == 0, out.stderr
    assert "(unchanged)" in out.stdout

    out = cli(url, "db", "downgrade", "base")
    assert out.returncode == 0, out.stderr
    assert f"revision: {head} -> base (no schema)" in out.stdout

    out = cli(url, "db", "current")
    assert out.returncode == 0 and "not at head" in out.stdout

    out = cli(url, "db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert f"-> {head}" in out.stdout


def test_round_trip_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    _round_trip(url)
    out = cli(url, "status")
    assert out.returncode == 0, out.stderr


def test_current_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    out = cli(f"sqlite:///{path}", "db", "current")
    assert out.returncode == 0, out.stderr
    assert "base (no schema)" in out.stdout
    assert not path.exists()


def test_round_trip_postgresql_then_a_read_command(postgres_url: str) -> None:
    _round_trip(postgres_url)
    out = cli(postgres_url, "status")
    assert out.returncode == 0, out.stderr
    out = cli(postgres_url, "status", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert '"sweeps": []' in out.stdout


@pytest.mark.parametrize("args", [["downgrade", "nope"], ["upgrade", "--revision", "nope"]])
def test_unknown_revision_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    assert cli(url, "db", "upgrade").returncode == 0
    out = cli(url, *["db", *args])
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_downgrade_needs_a_revision(tmp_path: Path) -> None:
    out = cli(f"sqlite:///{tmp_path / 'results.db'}", "db", "downgrade")
    assert out.returncode == 2
    assert not (tmp_path / "results.db").exists()


def test_password_never_shown(postgres_admin_url: str, postgres_url: str) -> None:
    admin = make_url(postgres_admin_url)
    # Trust authentication accepts any password, so the commands succeed with it.
    with_password = make_url(postgres_url).set(password=PASSWORD)
    url = with_password.render_as_string(hide_password=False)
    missing = with_password.set(database=f"nope_{uuid.uuid4().hex[:8]}").render_as_string(
        hide_password=False)
    unreachable = admin.set(password=PASSWORD, port=1, database="x").render_as_string(
        hide_password=False)
    outputs = [
        cli(url, "db", "current"), cli(url, "db", "upgrade"), cli(url, "db", "current"),
        cli(url, "status"), cli(url, "db", "downgrade", "nope"),
        cli(url, "db", "downgrade", "base"),
    ]
    assert all(o.returncode == 0 for o in outputs[:4]), [o.stderr for o in outputs]
    assert "***" in outputs[0].stdout
    attempts = [(missing, ["db", "current"]), (missing, ["db", "upgrade"]),
                (missing, ["db", "downgrade", "base"]), (missing, ["show", "abcd"]),
                (unreachable, ["db", "upgrade"]), (unreachable, ["status"])]
    for bad, args in attempts:
        out = cli(bad, *args)
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (args, out.stderr)
        assert "***" in lines[0], lines[0]
        outputs.append(out)
    assert any("does not exist" in o.stderr for o in outputs)
    for out in outputs:
        assert PASSWORD not in out.stdout + out.stderr
        assert "Traceback" not in out.stdout + out.stderr
