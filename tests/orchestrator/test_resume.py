"""Results are never lost: kill -9 of the driver, results only a worker saw, retries, hangs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, update

from orchestrator import launch, spec
from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.leases import pid_alive
from orchestrator.db.models import Driver, Trial
from orchestrator.db.store import mark_running
from workers import result_files
from workers import trial as worker_trial

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

EVALUATION = {"metrics": ["perplexity"], "max_length": 64, "stride": 32}
DATASET = {"name": "builtin:pydoc", "split": "test", "limit": 40}


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trials_of(url: str, sweep: str) -> dict[str, Trial]:
    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        rows = session.scalars(select(Trial).join(Trial.sweep)
                               .where(Trial.sweep.has(name=sweep))).all()
        for row in rows:
            _ = row.metrics, row.evidence  # load before the session closes
    return {t.trial_key: t for t in rows}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def two_trials(tmp_path: Path, name: str) -> tuple[spec.SweepSpec, Path, str]:
    """A baseline and one drop_layers trial: (spec, its path, a fresh SQLite URL)."""
    data = {"name": name, "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": [0.5]}], "datasets": [DATASET],
            "evaluation": EVALUATION}
    path = write_spec(tmp_path, data)
    return spec.load(path), path, f"sqlite:///{tmp_path / (name + '.db')}"


@pytest.mark.parametrize("storage", ["directory", "s3"])
def test_results_written_by_a_dead_drivers_workers_are_recovered(tmp_path, tiny_llama_dir,
                                                                  storage, request):
    loaded, path, url = two_trials(tmp_path, "recover")
    where = (str(tmp_path / "tune") if storage == "directory"
             else request.getfixturevalue("s3").uri(f"tune-{tmp_path.name}"))
    first = launch.plan(loaded, str(path), url, storage_path=where)
    assert len(first.to_run) == 2 and first.driver_id is not None
    engine = ensure_schema(url, create=False)
    # The first driver started both trials, one worker finished and wrote its result file,
    # then the driver died (kill -9) before recording it.
    with session_scope(engine, write=True) as session:
        for t in first.to_run:
            mark_running(session, "recover", t.trial_key)
        session.execute(update(Driver).where(Driver.id == first.driver_id)
                        .values(pid=dead_pid()))
    finished = first.to_run[1]
    result = worker_trial.attempt(dict(finished.config, result_dir=first.result_dir))
    assert result["status"] == "done"
    result_files.write(first.result_dir, finished.trial_key, result)

    second = launch.plan(loaded, str(path), url, storage_path=where)
    assert (second.reset, second.recovered, second.busy) == (2, 1, {})
    assert [t.trial_key for t in second.to_run] == [first.to_run[0].trial_key]
    stored = trials_of(url, "recover")[finished.trial_key]
    assert stored.status == "done" and stored.attempts == 1
    assert {m.name: m.value for m in stored.metrics}["perplexity"] == pytest.approx(
        result["metrics"]["perplexity"]["value"])
    assert stored.evidence.details["recovered_from_result_file"] is True
    assert result_files.read(first.result_dir, finished.trial_key) is None


def test_a_live_launch_keeps_its_trials_from_a_second_launch(tmp_path, tiny_llama_dir):
    loaded, path, url = two_trials(tmp_path, "shared")
    first = launch.plan(loaded, str(path), url)
    engine = ensure_schema(url, create=False)
    other = subprocess.Popen(["sleep", "600"])  # the first launch lives in another process
    try:
        with session_scope(engine, write=True) as session:
            session.execute(update(Driver).where(Driver.id == first.driver_id)
                            .values(pid=other.pid))
            mark_running(session, "shared", first.to_run[0].trial_key)
        second = launch.plan(loaded, str(path), url)
        assert second.to_run == [] and second.reset == 0
        assert set(second.busy) == {t.trial_key for t in first.to_run}
    finally:
        other.kill()
        other.wait()
    third = launch.plan(loaded, str(path), url)
    assert third.reset == 1 and len(third.to_run) == 2


def cli_env(tmp: Path) -> dict[str, str]:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # Ray's sockets: short path
    return dict(os.environ, COLUMNS="200", RAY_ADDRESS="", RAY_TMPDIR=str(ray_tmp))


def test_kill_9_of_the_driver_then_relaunch(tmp_path, tiny_llama_dir):
    """The user's crash: SIGKILL the `sweep launch` process mid-sweep, launch it again."""
    data = {"name": "crash", "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": [0.125, 0.25, 0.375, 0.5]}],
            "datasets": [DATASET], "evaluation": EVALUATION, "max_concurrent_trials": 1}
    path = write_spec(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    env = cli_env(tmp_path)
    command = [sys.executable, "-m", "orchestrator.cli.main", "--db", url, "launch", str(path),
               "--no-dashboard"]
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if Path(tmp_path / "crash.db").exists():
                try:
                    states = [t.status for t in trials_of(url, "crash").values()]
                except Exception:  # noqa: BLE001 - the schema may be half-created
                    states = []
                if states.count("done") >= 2 and "running" in states:
                    break
            assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the sweep never got two trials done")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        before = trials_of(url, "crash")
        done_before = {k: (t.finished_at, t.attempts) for k, t in before.items()
                       if t.status == "done"}
        interrupted = {k for k, t in before.items() if t.status == "running"}
        assert len(done_before) >= 2 and interrupted

        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "left running by a launch that died will run again" in again.stderr
    finally:
        try:  # whatever the killed driver left behind (its local Ray)
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    after = trials_of(url, "crash")
    assert len(after) == 5  # no trial appears twice
    assert {t.status for t in after.values()} == {"done"}
    for key, (finished_at, attempts) in done_before.items():
        assert (after[key].finished_at, after[key].attempts) == (finished_at, attempts), \
            "a completed trial ran again"
    for key in interrupted:
        # Attempt 1 was interrupted; unless its worker had already written its result
        # (recovered without running again), it ran a second time.
        details = after[key].evidence.details
        assert after[key].attempts == 2 or details.get("recovered_from_result_file")
    for t in after.values():
        assert {m.name for m in t.metrics} >= {"perplexity", "params"}


def test_max_attempts_retries_failures_but_not_deterministic_ones(tmp_path, ray_session,
                                                                  tiny_llama_dir):
    data = {"name": "retry", "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": [0.5, 0.95]}], "datasets": [DATASET],
            "evaluation": EVALUATION, "max_attempts": 3}
    path = write_spec(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'retry.db'}"
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url)
    assert (outcome.done, outcome.failed, outcome.retried) == (2, 1, 2)
    stored = {t.rate: t for t in trials_of(url, "retry").values()}
    assert stored[0.95].status == "failed" and stored[0.95].attempts == 3
    assert stored[0.95].failure_reason == "error" and stored[0.95].error_type
    assert stored[0.5].attempts == 1 and stored[None].attempts == 1


def test_a_trial_over_its_time_limit_is_stopped_and_frees_its_resources(tmp_path, ray_session,
                                                                        tiny_llama_dir):
    # Each trial claims both CPUs of the test cluster: the second can only start once the
    # first one's worker process is gone.
    data = {"name": "hang", "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": [0.5]}],
            "datasets": [dict(DATASET, limit=100)],
            "evaluation": dict(EVALUATION, batch_size=1, timeout_s=0.5),
            "resources": {"cpus_per_trial": 2}}
    path = write_spec(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'hang.db'}"
    started = time.perf_counter()
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url)
    assert outcome.failed == 2 and time.perf_counter() - started < 240
    for stored in trials_of(url, "hang").values():
        assert (stored.status, stored.failure_reason) == ("timed_out", "timed_out")
        assert "evaluation.timeout_s = 0.5 s" in stored.error_message
        pid = int(re.search(r"worker process (\d+)", stored.error_traceback).group(1))
        assert pid != os.getpid() and not pid_alive(pid)


def test_launch_with_s3_storage_keeps_tune_state_and_result_files_there(tmp_path, s3):
    """`--storage-path s3://…`: Tune's experiment state goes to the bucket, workers write
    their result files there, and each file is deleted once its result is recorded."""
    from s3_server import CREDENTIALS

    _, path, url = two_trials(tmp_path, "on-s3")
    where = s3.uri(f"tune-{tmp_path.name}")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", url, "launch", str(path),
         "--storage-path", where, "--no-dashboard", "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, COLUMNS="200", **CREDENTIALS))
    assert out.returncode == 0, out.stderr[-3000:]
    trials = trials_of(url, "on-s3")
    assert [t.status for t in trials.values()] == ["done", "done"]
    keys = s3.keys(f"tune-{tmp_path.name}/")
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in keys), keys
    assert not [k for k in keys if k.endswith(".json") and "/results/" in k], keys
    planned = launch.plan(spec.load(path), str(path), url, storage_path=where, dry_run=True)
    assert planned.to_run  # a dry run names every trial; the real one below runs none
    again = launch.plan(spec.load(path), str(path), url, storage_path=where)
    assert again.to_run == [] and again.recovered == 0
