"""A sweep on a real two-node Ray cluster (two raylets on this machine), and the warnings
`sweep launch --address` gives when results or result files live on one machine only.

The two nodes share a hostname and an IP address here, so the test tells them apart by
their Ray log directories: each node has its own ``--temp-dir``, and a raylet writes the
logs of every worker process it starts there as ``worker-<id>-<job>-<pid>.out``. The pid a
trial recorded in its evidence therefore names the node it ran on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import launch

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"

SPEC = {
    "name": "two-nodes",
    "models": [{"id": "builtin:tiny-llama"}],
    "methods": [{"name": "drop_layers", "rates": [0.25, 0.5, 0.75], "params": {"from": "top"}}],
    "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 24}],
    "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32},
    "resources": {"cpus_per_trial": 1},
    "max_concurrent_trials": 2,
}


# --------------------------------------------------------------------------- the warnings


def test_one_node_gets_no_warning():
    assert launch.cluster_warnings(1, "sqlite:///r.db", "/tmp/tune", "ext4") == []


def test_sqlite_and_local_storage_on_a_cluster_each_warn_in_one_line():
    warnings = launch.cluster_warnings(3, "sqlite:////data/r.db", "/var/tune", "ext4")
    assert len(warnings) == 2
    sqlite, storage = warnings
    assert "SQLite" in sqlite and "3 nodes" in sqlite and "PostgreSQL" in sqlite
    assert "/var/tune" in storage and "ext4" in storage and "--storage-path" in storage
    assert all("\n" not in w for w in warnings)


def test_postgres_and_shared_storage_do_not_warn():
    url = "postgresql+psycopg://sweep@db:5432/sweeps"
    assert launch.cluster_warnings(2, url, "/mnt/shared/tune", "nfs4") == []
    assert launch.cluster_warnings(2, url, "s3://bucket/tune", None) == []


def test_unknown_filesystem_counts_as_local_and_sqlite_driver_variants_count_as_sqlite():
    [storage] = launch.cluster_warnings(2, "postgresql://db/s", Path("/x/tune"), None)
    assert "/x/tune" in storage
    [sqlite] = launch.cluster_warnings(2, "sqlite+pysqlite:///r.db", "/n", "nfs")
    assert "SQLite" in sqlite


def test_filesystem_type_reads_the_mount_table():
    if not Path("/proc/mounts").is_file():
        pytest.skip("no /proc/mounts")
    assert launch.filesystem_type("/proc/self") == "proc"
    assert launch.filesystem_type("/") is not None


def refused_launch(tmp_path: Path, *options: str) -> str:
    """Launch with ``options``; assert a one-line error, exit 2, nothing written; its text."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", f"sqlite:///{tmp_path / 'r.db'}",
         "launch", str(spec), *options],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert not (tmp_path / "r.db").exists()
    return out.stderr


def test_storage_path_uri_pyarrow_cannot_open_is_refused_in_one_line(tmp_path):
    error = refused_launch(tmp_path, "--storage-path", "nosuch://bucket/tune")
    assert "--storage-path nosuch://" in error


# --------------------------------------------------------------------------- the cluster


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes_under(directory: Path) -> list[int]:
    """Pids of this user's processes whose command line names ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop(groups: list[int], directory: Path) -> None:
    """Kill this test's Ray processes only: ``ray stop`` would kill every Ray on the machine,
    the session-wide Ray of other tests included."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in _processes_under(directory):  # anything that left our process groups
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two_nodes():
    """A head (resource ``node_a``) and a worker node (``node_b``), one CPU and one
    (declared) GPU each: GPU 0 on the head, GPU 3 on the worker node."""
    if shutil.which(str(RAY)) is None:
        pytest.skip(f"no ray CLI at {RAY}")
    # Short: Ray's unix sockets live under the temp dirs (path length limit ~107).
    root = Path(tempfile.mkdtemp(prefix="csw-rc-"))
    gcs, dashboard, client, agent_a, agent_b = _free_ports(5)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # 0 confines Ray to one node (the loopback setting of local runs); a cluster
               # of two raylets needs it on.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # One GPU per node, declared: Ray schedules and assigns declared GPUs like real ones
    # (torch finds none, so the trials compute on the CPU). Node b's CUDA_VISIBLE_DEVICES
    # names its GPU 3: Ray must hand that id to its trials.
    node_env = {"a": env, "b": dict(env, CUDA_VISIBLE_DEVICES="3")}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "1",
              "--disable-usage-stats"]
    commands = {
        "a": [str(RAY), "start", "--head", "--port", str(gcs), "--include-dashboard=false",
              "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
              "--dashboard-agent-listen-port", str(agent_a), "--resources", '{"node_a": 1}',
              "--temp-dir", str(root / "a"), *common],
        "b": [str(RAY), "start", "--address", f"127.0.0.1:{gcs}",
              "--dashboard-agent-listen-port", str(agent_b), "--resources", '{"node_b": 1}',
              "--temp-dir", str(root / "b"), *common],
    }
    groups: list[int] = []
    try:
        for node, command in commands.items():
            # A new session per `ray start`: its daemons stay in that process group, which
            # the finaliser kills without touching any other Ray on this machine.
            proc = subprocess.Popen(command, env=node_env[node], cwd=root, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            groups.append(proc.pid)
            try:
                output, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.skip(f"`ray start` of node {node} did not return within 60 s")
            if proc.returncode != 0:
                pytest.skip(f"cannot start Ray node {node} here: "
                            f"{output.strip().splitlines()[-1:]}")
        yield {"address": f"127.0.0.1:{gcs}", "client": f"ray://127.0.0.1:{client}",
               "root": root, "env": env}
    finally:
        _stop(groups, root)
        deadline = time.monotonic() + 10
        while _processes_under(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _processes_under(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {leftover}"


def _node_of(pid: int, root: Path) -> set[str]:
    """The nodes whose raylet started worker process ``pid`` (by its log file names)."""
    return {node for node in ("a", "b")
            if any((root / node).glob(f"session_*/logs/worker-*-{pid}.out"))}


@pytest.mark.slow
def test_sweep_runs_on_both_nodes_and_warns_about_sqlite_and_local_storage(
        two_nodes, tiny_llama_dir, tmp_path):
    from sqlalchemy import select

    from orchestrator.db.engine import ensure_schema, session_scope
    from orchestrator.db.models import Sweep, Trial

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    url = f"sqlite:///{tmp_path / 'results.db'}"
    storage = tmp_path / "tune"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", url, "launch", str(spec),
         "--address", two_nodes["address"], "--storage-path", str(storage),
         "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env=dict(two_nodes["env"], COLUMNS="80"))
    assert out.returncode == 0, out.stderr[-3000:]

    lines = out.stderr.splitlines()
    sqlite = [line for line in lines if line.startswith("warning: the results database is SQLite")]
    assert len(sqlite) == 1 and "2 nodes" in sqlite[0] and "PostgreSQL" in sqlite[0], out.stderr
    local = [line for line in lines if line.startswith(f"warning: the storage path {storage} ")]
    assert len(local) == 1 and "--storage-path" in local[0], out.stderr
    assert any(storage.iterdir()), "Tune kept no state under --storage-path"

    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        trials = session.scalars(
            select(Trial).join(Sweep).where(Sweep.name == SPEC["name"])).all()
        assert len(trials) == 4
        assert [t.status for t in trials] == ["done"] * 4, [
            (t.method, t.rate, t.status, t.error_message) for t in trials]
        ran = [(t.evidence.details, t.gpus) for t in trials]
    pids = {details["pid"] for details, _ in ran}
    nodes = {pid: _node_of(pid, two_nodes["root"]) for pid in pids}
    assert all(len(found) == 1 for found in nodes.values()), nodes
    assert set().union(*nodes.values()) == {"a", "b"}, nodes

    # GPU claiming: gpus_per_trial defaults to 1 on a cluster with GPUs; each trial got its
    # node's GPU (node b's by the id its CUDA_VISIBLE_DEVICES gave), saw only that GPU, and
    # no two trials held one GPU at the same time.
    assert "up to 2 trials at once on 2 nodes (1 GPU, 1 CPU each)" in out.stderr, out.stderr
    for details, gpus in ran:
        [node] = nodes[details["pid"]]
        assert gpus == {"a": "0", "b": "3"}[node], (node, gpus)
        assert details["gpus_per_trial"] == 1 and details["gpu_shared"] is False
        assert details["cuda_visible_devices"] == [gpus]
        assert details["gpu_used"] is False  # declared GPUs: torch has no CUDA here
    assert not _overlapping_on_one_gpu([(gpus, d["wall_clock"]) for d, gpus in ran])


def _overlapping_on_one_gpu(held: list[tuple[str, dict]]) -> list[tuple]:
    """Pairs of trials that held the same GPU at the same time."""
    return [(g1, c1, g2, c2) for i, (g1, c1) in enumerate(held) for g2, c2 in held[i + 1:]
            if g1 == g2 and c1["start"] < c2["end"] and c2["start"] < c1["end"]]


def _launch(two_nodes: dict, tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db",
         f"sqlite:///{tmp_path / 'results.db'}", "launch", str(spec),
         "--address", two_nodes["address"], "--storage-path", str(tmp_path / "tune"),
         "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env=dict(two_nodes["env"], COLUMNS="80"))


@pytest.mark.slow
def test_a_fraction_of_a_gpu_shares_it_and_says_so(two_nodes, tiny_llama_dir, tmp_path):
    from sqlalchemy import select

    from orchestrator.db.engine import ensure_schema, session_scope
    from orchestrator.db.models import Trial

    data = dict(SPEC, name="shared-gpus", max_concurrent_trials=4,
                resources={"gpus_per_trial": 0.5, "cpus_per_trial": 0.5})
    out = _launch(two_nodes, tmp_path, data)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("up to 4 trials at once on 2 nodes (0.5 GPUs, 0.5 CPU each); 2 trials share "
            "each GPU, unisolated") in out.stderr
    engine = ensure_schema(f"sqlite:///{tmp_path / 'results.db'}", create=False)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial)).all()
        assert [t.status for t in trials] == ["done"] * 4
        held = [(t.gpus, t.evidence.details["wall_clock"]) for t in trials]
        assert all(t.evidence.details["gpu_shared"] is True for t in trials)
    assert {gpus for gpus, _ in held} <= {"0", "3"}


@pytest.mark.slow
def test_more_gpus_than_any_node_has_is_refused_before_anything_runs(two_nodes, tmp_path):
    data = dict(SPEC, name="too-many-gpus", resources={"gpus_per_trial": 2})
    out = _launch(two_nodes, tmp_path, data)
    assert out.returncode == 2, out.stderr[-3000:]
    [error] = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error == ("error: resources.gpus_per_trial is 2 but no node has that many GPUs (at "
                     "most 1 on one node, 2 in the cluster; a trial runs on one node); lower it "
                     "or add a node with more GPUs")
    assert "Traceback" not in out.stderr


@pytest.fixture
def postgres_db(postgres_admin_url):
    """A fresh database on the session's PostgreSQL server."""
    import uuid

    from sqlalchemy import create_engine, make_url

    from orchestrator.db.engine import dispose_engines

    name = f"cluster_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(
            hide_password=False)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.mark.slow
def test_ray_client_launch_runs_tune_on_the_cluster_and_records_every_trial(
        two_nodes, tiny_llama_dir, tmp_path, postgres_db):
    """With ``ray://``, Tune runs on the head node: its copy of the results callback writes
    PostgreSQL there, and the launch follows the trials through the database."""
    from orchestrator import queries
    from orchestrator.db.engine import ensure_schema, session_scope

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(dict(SPEC, name="client-mode")))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", postgres_db, "launch",
         str(spec), "--address", two_nodes["client"], "--storage-path", str(tmp_path / "tune"),
         "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env=dict(two_nodes["env"], COLUMNS="80"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran 4 trials" in out.stderr and "4 done, 0 failed" in out.stderr, out.stderr
    engine = ensure_schema(postgres_db, create=False)
    with session_scope(engine) as session:
        [status] = queries.sweep_status(session, "client-mode")
        rows = queries.leaderboard(session, metric="perplexity", sweep="client-mode")
    assert status["counts"]["done"] == 4 and status["counts"]["running"] == 0
    assert len(rows) == 4 and all(r["metrics"]["perplexity"] > 1 for r in rows)


def test_ray_client_with_sqlite_is_refused_before_anything_is_written(tmp_path):
    error = refused_launch(tmp_path, "--address", "ray://head.example:10001",
                           "--storage-path", str(tmp_path / "tune"))
    assert error.startswith("error: --address ray://head.example:10001 runs the sweep's Tune")
    assert "PostgreSQL" in error


def test_ray_client_without_storage_path_is_refused(tmp_path):
    from orchestrator import launch
    from orchestrator.errors import BadInput

    with pytest.raises(BadInput, match=r"^--address ray://h:10001 needs --storage-path"):
        launch.check_address("ray://h:10001", "postgresql+psycopg://u@db/s", None)
    launch.check_address("ray://h:10001", "postgresql+psycopg://u@db/s", "s3://b/t")
    launch.check_address("auto", "sqlite:///r.db", None)  # only Ray Client needs them
