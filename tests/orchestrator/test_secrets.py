"""Database passwords never appear anywhere: output, results, Tune's files, Ray's files.

A role with a distinctive password owns a fresh database on the session's PostgreSQL server,
and the server is made to check that password (scram-sha-256 for this role only), so the
password is really used. A real sweep then runs through the ``sweep`` CLI on a real local
Ray, and every place a password could end up is searched for it. The password contains
characters that URLs must escape (``: @ / %``); what is searched for is its distinctive
prefix, which reads the same raw, URL-quoted or ``%%``-doubled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import MetaData, create_engine, make_url, select

ROOT = Path(__file__).resolve().parents[2]

SPEC = {
    "name": "secret",
    "models": [{"id": "builtin:tiny-llama"}],
    "methods": [{"name": "drop_layers", "rates": [0.5], "params": {"from": "top"}}],
    "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 20}],
    "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 64, "stride": 32,
                   "speed": {"warmup": 1, "repeats": 1, "prompt_length": 16, "new_tokens": 4}},
}

# Run by a separate process while the sweep runs: Ray keeps the job table (with each driver's
# command line as its "entrypoint") in the GCS, in memory, so no file search can see it.
# Without the dashboard there is no public API for it; the private one is fine for a test.
JOB_TABLE = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(json.dumps([job.get("Entrypoint") or "" for job in ray._private.state.jobs()]))
"""


@dataclass(frozen=True)
class SecretDatabase:
    """A database owned by a role whose password the server checks (when ``enforced``)."""

    url: str
    password: str
    needle: str
    role: str
    enforced: bool


def _psycopg_conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _password_refused(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(_psycopg_conninfo(url), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


@pytest.fixture(scope="module")
def secret_db(postgres_admin_url: str) -> Iterator[SecretDatabase]:
    """A role ``sweep_secret_<hex>`` with password ``S3cr3t-pw-<hex>:p@ss/w%rd`` and its database.

    The session's server trusts every local connection, which would make a wrong password
    pass and the right one unused; a pg_hba line for this role alone (first match wins)
    makes the server check it. A server whose pg_hba.conf this process cannot write (one
    given by $SWEEP_TEST_POSTGRES_URL on another host) still gets the role, unenforced.
    """
    import psycopg
    from psycopg import sql

    token = secrets.token_hex(6)
    needle = f"S3cr3t-pw-{token}"
    password = f"{needle}:p@ss/w%rd"
    role = f"sweep_secret_{token}"
    admin = make_url(postgres_admin_url)
    with psycopg.connect(_psycopg_conninfo(postgres_admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(role), sql.Identifier(role)))
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        original: str | None = None
        try:
            original = hba.read_text()
            rules = "".join(f"{kind} all {role} {where} scram-sha-256\n"
                            for kind, where in [("host", "127.0.0.1/32"), ("host", "::1/128"),
                                                ("local", "")])
            hba.write_text(rules + original)
            conn.execute("SELECT pg_reload_conf()")
        except OSError:
            original = None
    url = admin.set(username=role, password=password, database=role).render_as_string(
        hide_password=False)
    enforced = False
    if original is not None:
        wrong = make_url(url).set(password="not-the-password").render_as_string(
            hide_password=False)
        deadline = time.monotonic() + 10
        while not (enforced := _password_refused(wrong)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the postmaster rereads pg_hba.conf on SIGHUP, asynchronously
    try:
        yield SecretDatabase(url, password, needle, role, enforced)
    finally:
        from orchestrator.db.engine import dispose_engines

        dispose_engines()
        with psycopg.connect(_psycopg_conninfo(postgres_admin_url), autocommit=True) as conn:
            if original is not None:
                hba.write_text(original)
                conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator.cli.main ARGS`` as a user would run it."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env or dict(os.environ, COLUMNS="200"), **kwargs)


def files_containing(root: Path, needle: bytes) -> tuple[list[Path], int]:
    """Regular files under ``root`` whose bytes contain ``needle``, and how many were read."""
    hits: list[Path] = []
    read = 0
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if not path.is_file() or path.is_symlink():
                continue  # sockets, fifos; a symlinked file is read through its target
            try:
                data = path.read_bytes()
            except OSError:
                continue  # removed while Ray shut down
            read += 1
            if needle in data:
                hits.append(path)
    return hits, read


@dataclass
class Sweep:
    """A finished sweep and everything it left behind."""

    launch: subprocess.CompletedProcess[str]
    ray_tmp: Path
    tune_dir: Path
    job_entrypoints: list[str] | None
    env: dict[str, str] = field(default_factory=dict)


def _gcs_address(ray_tmp: Path) -> str | None:
    for port_file in ray_tmp.glob("ray/session_latest/gcs_server_port_*"):
        port = port_file.read_text().strip()
        if port:
            return f"127.0.0.1:{port}"
    return None


def _read_job_table(ray_tmp: Path, env: dict[str, str]) -> list[str] | None:
    """Entrypoints of the jobs of the Ray cluster under ``ray_tmp``, once the sweep's is in."""
    address = _gcs_address(ray_tmp)
    if address is None:
        return None
    helper_env = {k: v for k, v in env.items() if k != "SWEEP_DB_URL"}
    try:
        out = subprocess.run([sys.executable, "-c", JOB_TABLE, address], capture_output=True,
                             text=True, env=helper_env, timeout=60, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    entrypoints = json.loads(out.stdout.strip().splitlines()[-1])
    return entrypoints if any("orchestrator.cli.main" in e for e in entrypoints) else None


@pytest.fixture(scope="module")
def sweep(secret_db: SecretDatabase, tiny_llama_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    """``sweep --db URL launch spec --no-dashboard`` run to the end on a fresh local Ray."""
    tmp = tmp_path_factory.mktemp("secret")
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    cache = Path(os.environ["COMPRESS_SWEEP_CACHE"])  # holds tiny_llama_dir's trained model
    assert tiny_llama_dir.is_relative_to(cache)
    # Short (Ray's unix sockets live under it), fresh, and ours alone to search.
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    # The URL is given both ways a user can give it, so that whatever records the command
    # line (Ray's job table, logs) or the environment (inherited by every Ray worker) is
    # searched for it by one sweep.
    env = dict(os.environ, COLUMNS="200", COMPRESS_SWEEP_CACHE=str(cache),
               RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="", SWEEP_DB_URL=secret_db.url)
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", "--db", secret_db.url, "launch",
             str(spec_path), "--no-dashboard"], stdout=out, stderr=err, text=True, cwd=ROOT,
            env=env)
        entrypoints = None
        try:
            while proc.poll() is None:
                if entrypoints is None:
                    entrypoints = _read_job_table(ray_tmp, env)
                time.sleep(0.5)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    launch = subprocess.CompletedProcess(proc.args, proc.returncode, out_path.read_text(),
                                         err_path.read_text())
    assert launch.returncode == 0, launch.stderr[-3000:]
    try:
        yield Sweep(launch, ray_tmp, cache / "tune", entrypoints, env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_launch_output_shows_the_url_redacted(sweep: Sweep, secret_db: SecretDatabase) -> None:
    text = sweep.launch.stdout + sweep.launch.stderr
    assert "2 done" in sweep.launch.stderr, sweep.launch.stderr[-2000:]
    assert secret_db.needle not in text
    # The URL is shown (users need to see where results went), with the password masked.
    assert f"{secret_db.role}:***@" in sweep.launch.stderr


@pytest.mark.slow
def test_database_holds_no_password(sweep: Sweep, secret_db: SecretDatabase) -> None:
    engine = create_engine(secret_db.url)
    try:
        metadata = MetaData()
        metadata.reflect(bind=engine)
        with engine.connect() as conn:
            sweeps = conn.execute(select(metadata.tables["sweeps"])).mappings().all()
            trials = conn.execute(select(metadata.tables["trials"])).mappings().all()
            # Every column of every table, including ones this test does not know about.
            everything = {t.name: conn.execute(select(t)).all() for t in metadata.sorted_tables}
    finally:
        engine.dispose()
    assert len(sweeps) == 1 and len(trials) == 2
    for row in sweeps:
        assert row["spec"] and secret_db.needle not in json.dumps(row["spec"])
        assert row["spec_path"] and secret_db.needle not in row["spec_path"]
    for row in trials:
        assert row["config"] and secret_db.needle not in json.dumps(row["config"])
    for table, rows in everything.items():
        assert secret_db.needle not in repr(rows), table


@pytest.mark.slow
def test_tune_storage_holds_no_password(sweep: Sweep, secret_db: SecretDatabase) -> None:
    assert any(p.name.startswith("secret-") for p in sweep.tune_dir.iterdir()), \
        "the sweep's Tune experiment is not where this test looks"
    hits, read = files_containing(sweep.tune_dir, secret_db.needle.encode())
    assert read > 0
    assert hits == []


@pytest.mark.slow
def test_ray_session_files_hold_no_password(sweep: Sweep, secret_db: SecretDatabase) -> None:
    assert list(sweep.ray_tmp.glob("ray/session_*/logs")), "Ray did not run under RAY_TMPDIR"
    hits, read = files_containing(sweep.ray_tmp, secret_db.needle.encode())
    assert read > 10  # Ray's logs, events and port files
    assert hits == []


@pytest.mark.slow
def test_ray_job_table_holds_no_password(sweep: Sweep, secret_db: SecretDatabase) -> None:
    assert sweep.job_entrypoints is not None, "could not read the job table during the sweep"
    assert not [e for e in sweep.job_entrypoints if secret_db.needle in e], \
        sweep.job_entrypoints


@pytest.mark.slow
def test_read_commands_never_show_the_password(sweep: Sweep, secret_db: SecretDatabase) -> None:
    env = {k: v for k, v in sweep.env.items() if k != "SWEEP_DB_URL"}
    url = secret_db.url
    board = cli("--db", url, "leaderboard", "--format", "json", env=env)
    assert board.returncode == 0, board.stderr
    key = json.loads(board.stdout)[0]["trial_key"][:12]
    outputs = [board]
    for args in (["status"], ["status", "--format", "json"], ["leaderboard"],
                 ["leaderboard", "--all", "--format", "csv"], ["list"],
                 ["list", "--format", "json"], ["show", key], ["show", key, "--format", "json"],
                 ["db", "current"]):
        out = cli("--db", url, *args, env=env)
        assert out.returncode == 0, (args, out.stderr)
        outputs.append(out)
    # The same through $SWEEP_DB_URL, the way the README suggests for a team database.
    outputs.append(cli("status", env=dict(env, SWEEP_DB_URL=url)))
    assert outputs[-1].returncode == 0 and "secret" in outputs[-1].stdout
    for out in outputs:
        assert secret_db.needle not in out.stdout + out.stderr, out.args
        assert "Traceback" not in out.stderr


def test_wrong_password_is_one_redacted_line(secret_db: SecretDatabase, tmp_path: Path) -> None:
    if not secret_db.enforced:
        pytest.skip("the server does not check passwords for the test role (pg_hba.conf not "
                    "writable here)")
    wrong_password = f"Wr0ng-pw-{secrets.token_hex(4)}:x@y"
    wrong = make_url(secret_db.url).set(password=wrong_password).render_as_string(
        hide_password=False)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env = dict(os.environ, COLUMNS="200", RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="")
    env.pop("SWEEP_DB_URL", None)
    try:
        for args in (["status"], ["leaderboard"], ["db", "upgrade"], ["db", "current"],
                     ["launch", str(spec_path), "--no-dashboard"]):
            out = cli("--db", wrong, *args, env=env)
            # Not malformed input but a database that cannot be opened: a failure, exit 1.
            assert out.returncode == 1, (args, out.returncode, out.stderr)
            lines = out.stderr.splitlines()
            assert len(lines) == 1, (args, out.stderr)
            assert "password authentication failed" in lines[0], lines[0]
            assert f"{secret_db.role}:***@" in lines[0], lines[0]
            text = out.stdout + out.stderr
            assert wrong_password.split(":")[0] not in text and secret_db.needle not in text
            assert "Traceback" not in text
        # The database was never reached, so the launch never got as far as starting Ray.
        assert list(ray_tmp.iterdir()) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sqlite_results_file_created_private_by_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "results" / "r.db"
    # The usual umask, under which SQLite alone would create a world-readable 0644 file.
    out = cli("--db", f"sqlite:///{path}", "db", "upgrade", umask=0o022)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for extra in (path.with_name("r.db-wal"), path.with_name("r.db-shm")):
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra
