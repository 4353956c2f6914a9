"""The launch path end to end: spec → real local Ray Tune → SQLite → leaderboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import launch, queries, spec
from orchestrator.db.engine import ensure_schema, session_scope

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "name": "small",
    "models": [{"id": "builtin:tiny-llama"}],
    "methods": [
        {"name": "drop_layers", "rates": [0.25, 0.95], "params": {"from": "top"}},
        {"name": "head_mask", "rates": [0.5], "params": {"calibration_samples": 4}},
    ],
    "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 40}],
    "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 64, "stride": 32,
                   "speed": {"warmup": 1, "repeats": 2, "prompt_length": 16, "new_tokens": 4}},
    "max_concurrent_trials": 2,
}


def write_spec(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, ray_session, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("small")
    path = write_spec(tmp, SMALL)
    url = f"sqlite:///{tmp / 'sweeps.db'}"
    loaded = spec.load(path)
    planned = launch.plan(loaded, str(path), url)
    outcome = launch.run(planned, url)
    return {"path": path, "url": url, "outcome": outcome, "spec": loaded}


def test_every_trial_recorded_failure_does_not_stop_the_sweep(small_sweep):
    outcome = small_sweep["outcome"]
    assert outcome.total == 4 and outcome.ran == 4
    assert (outcome.done, outcome.failed) == (3, 1)
    engine = ensure_schema(small_sweep["url"], create=False)
    with session_scope(engine) as session:
        [status] = queries.sweep_status(session, "small")
        rows = queries.leaderboard(session, metric="perplexity", sweep="small",
                                   include_failed=True)
    assert status["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1,
                                "timed_out": 0}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["rate"] == 0.95


def test_failed_trial_has_type_message_traceback(small_sweep):
    from sqlalchemy import select

    from orchestrator.db.models import Trial

    engine = ensure_schema(small_sweep["url"], create=False)
    with session_scope(engine) as session:
        trial = session.scalars(select(Trial).where(Trial.status == "failed")).one()
        assert trial.error_type == "ValueError"
        assert "would drop all" in trial.error_message
        assert "Traceback" in trial.error_traceback
        assert trial.attempts == 1 and trial.host


def test_evidence_environment_and_metrics_stored(small_sweep):
    from sqlalchemy import select

    from orchestrator.db.models import Trial

    engine = ensure_schema(small_sweep["url"], create=False)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).where(Trial.status == "done")).all()
        for t in trials:
            assert t.evidence is not None and t.environment is not None
            names = {m.name for m in t.metrics}
            assert {"perplexity", "decode_ms_per_token", "params", "size_mb"} <= names
            if t.is_baseline:
                assert t.evidence.max_abs_dlogits == 0
            else:
                assert t.evidence.max_abs_dlogits > 0
        assert all(t.environment.git_sha == trials[0].environment.git_sha for t in trials)
        # Where the time went: each evaluator's own time, within the trial's duration.
        for t in trials:
            details = t.evidence.details
            assert set(details["evaluation_seconds"]) == {"perplexity", "speed"}
            spent = sum(details["evaluation_seconds"].values()) + details["method_seconds"]
            assert 0 < spent < t.duration_s
            clock = details["wall_clock"]
            assert 0 < clock["end"] - clock["start"] <= t.duration_s + 1e-3
        # At most one model load per worker process: the trial that loaded it says so (the
        # failed trial, which has no evidence, may have been a process's first).
        by_process: dict[int, list] = {}
        for t in trials:
            by_process.setdefault(t.evidence.details["pid"], []).append(t.evidence.details)
        loads = [sum(d["model_loaded"] for d in details) for details in by_process.values()]
        assert max(loads) == 1 and sum(loads) >= 1, loads
        assert all((d["model_load_seconds"] > 0) == d["model_loaded"]
                   for details in by_process.values() for d in details)


def test_relaunch_reruns_nothing(small_sweep, tmp_path):
    again = launch.plan(small_sweep["spec"], str(small_sweep["path"]), small_sweep["url"])
    assert again.to_run == []
    retry = launch.plan(small_sweep["spec"], str(small_sweep["path"]), small_sweep["url"],
                        retry_failed=True)
    assert [t.rate for t in retry.to_run] == [0.95]


def test_cli_contracts_read_without_ray(small_sweep):
    url = small_sweep["url"]
    board = cli("--db", url, "leaderboard", "--metric", "score", "--format", "json")
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout)
    assert len(rows) == 3
    for row in rows:
        assert {"sweep", "model", "method", "rate", "dataset", "trial_key", "score",
                "metrics"} <= row.keys()
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    baseline = [r for r in rows if r["method"] == "none"]
    assert len(baseline) == 1 and baseline[0]["score"] == pytest.approx(0.5)

    ppl = json.loads(cli("--db", url, "leaderboard", "--metric", "perplexity",
                         "--format", "json").stdout)
    values = [r["metrics"]["perplexity"] for r in ppl]
    assert values == sorted(values)

    status = json.loads(cli("--db", url, "status", "--format", "json").stdout)
    assert list(status) == ["sweeps"] and len(status["sweeps"]) == 1
    assert status["sweeps"][0]["name"] == "small"
    assert status["sweeps"][0]["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1,
                                               "timed_out": 0}

    listing = cli("--db", url, "list", "--format", "json")
    assert listing.returncode == 0 and json.loads(listing.stdout)[0]["name"] == "small"
    typo = cli("--db", url, "leaderboard", "--metric", "perplexty")
    assert typo.returncode == 2 and "did you mean 'perplexity'" in typo.stderr
    assert "Traceback" not in typo.stderr
    for fmt in ("csv", "markdown", "table"):
        out = cli("--db", url, "leaderboard", "--format", fmt)
        assert out.returncode == 0 and "drop_layers" in out.stdout


def test_relaunch_through_cli_says_nothing_to_run(small_sweep):
    # Nothing is pending, so Ray is never started: this stays fast.
    out = cli("--db", small_sweep["url"], "launch", str(small_sweep["path"]))
    assert out.returncode == 0, out.stderr
    assert "nothing to run" in out.stderr and "1 failed" in out.stderr


def test_dry_run_changes_nothing(tmp_path):
    path = write_spec(tmp_path, SMALL)
    url = f"sqlite:///{tmp_path / 'dry.db'}"
    out = cli("--db", url, "launch", str(path), "--dry-run", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 4
    assert not (tmp_path / "dry.db").exists()


def test_aidreams_sweep_on_wikitext(shared_data, ray_session, tmp_path):
    data = {
        "name": "aidreams",
        "models": [{"id": f"llama2c:{shared_data / 'aidreams260K'}"}],
        "methods": [{"name": "drop_layers", "rates": [0.25]},
                    {"name": "head_mask", "rates": [0.25],
                     "params": {"calibration_dataset": str(shared_data / "wikitext2/valid.txt"),
                                "calibration_split": None, "calibration_samples": 4}}],
        "datasets": [{"name": str(shared_data / "wikitext2/test.txt"), "limit": 60}],
        "evaluation": {"metrics": ["perplexity"], "max_length": 128, "stride": 64},
    }
    path = write_spec(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url)
    assert (outcome.done, outcome.failed) == (3, 0)
    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        rows = queries.leaderboard(session, metric="perplexity", sweep="aidreams")
    base = next(r for r in rows if r["is_baseline"])
    # Real pretrained model on out-of-domain text: perplexity in the hundreds (see data README).
    assert 50 < base["metrics"]["perplexity"] < 5000
    # Not "worse than the base": this model was trained on other text, and dropping its top
    # layer really lowers its WikiText perplexity (checked against the NumPy reference in
    # tests/workers/evaluators/test_perplexity.py). Each variant must differ measurably.
    for row in rows:
        if not row["is_baseline"]:
            change = row["metrics"]["perplexity"] / base["metrics"]["perplexity"]
            assert abs(change - 1) > 0.01


def test_cli_launch_starts_its_own_local_ray(tmp_path, session_dir, tiny_llama_dir):
    """The user's path: `sweep launch` starts a loopback Ray with its dashboard, shows the
    progress, records the trials and prints the leaderboard; a second launch runs nothing."""
    data = dict(SMALL, name="cli", methods=[{"name": "drop_layers", "rates": [0.5]}],
                evaluation=dict(SMALL["evaluation"], metrics=["perplexity"]))
    path = write_spec(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    ray_tmp = session_dir / "cli-ray"  # short: Ray's unix sockets live under it
    ray_tmp.mkdir(exist_ok=True)
    env = {"RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)}
    first = cli("--db", url, "launch", str(path), env_extra=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in first.stderr
    assert "ran 2 trials" in first.stderr and "2 done, 0 failed" in first.stderr
    assert "drop_layers" in first.stdout and "baseline" in first.stdout
    second = cli("--db", url, "launch", str(path), env_extra=env)
    assert second.returncode == 0 and "nothing to run" in second.stderr


def test_sweep_costs_count_loads_calibrations_and_time(small_sweep):
    """3 finished trials (baseline, drop_layers 0.25, head_mask 0.5) on 2 worker processes:
    each process read the model at most once; only head_mask calibrates, once."""
    from sqlalchemy import select

    from orchestrator.db.models import Trial
    from orchestrator.report import describe_costs

    engine = ensure_schema(small_sweep["url"], create=False)
    with session_scope(engine) as session:
        costs = queries.sweep_costs(session, "small")
        durations = [t.duration_s for t in session.scalars(
            select(Trial).where(Trial.status == "done"))]
    assert costs["trials"] == 3 and costs["trials_without_figures"] == 0
    assert 1 <= costs["worker_processes"] <= 3
    assert costs["max_loads_per_model_process"] == 1
    assert 1 <= costs["model_loads"] <= costs["worker_processes"]
    assert (costs["calibrations"], costs["calibrating_trials"]) == (1, 1)
    assert costs["trial_seconds"] == pytest.approx(sum(durations))
    assert 0 < costs["evaluation_seconds"] + costs["method_seconds"] < costs["trial_seconds"]
    line = describe_costs(costs)
    assert line.startswith(f"{costs['model_loads']} model load(s) in "
                           f"{costs['worker_processes']} worker process(es)")
    assert "1 calibration(s) computed for 1 calibrating trial(s)" in line
