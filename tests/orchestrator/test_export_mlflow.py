"""``sweep export --mlflow``: trials of a real SQLite results database as MLflow runs, read
back with ``MlflowClient`` from a local file store and an MLflow SQLite store."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import selectinload

from orchestrator import queries
from orchestrator.cli.main import main
from orchestrator.db.engine import dispose_engines, ensure_schema, session_scope
from orchestrator.db.models import Sweep, Trial
from orchestrator.db.store import mark_running, record_result, register_sweep
from orchestrator.export_mlflow import epoch_ms, export_to_mlflow, redact_uri
from orchestrator.spec import EvaluationSettings

try:  # imported once for the module: importing MLflow takes over a second
    import mlflow
    from mlflow import MlflowClient
except ImportError:  # the test of the missing-MLflow message still runs
    mlflow = None

needs_mlflow = pytest.mark.skipif(mlflow is None, reason="mlflow-skinny not installed "
                                  "(pip install 'compress-sweep[mlflow]')")

EVALUATION = EvaluationSettings().model_dump(mode="json", exclude={"timeout_s"})
HW = {"cpu": "x86_64", "gpus": ["A100"]}
LONG = "x" * 7000  # longer than MLflow's 6000-character limit of a param value
PPL_BASE, TPT_BASE = 10.0, 8.0


def _row(key: str, position: int, method: str, rate: float | None,
         params: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
         sweep: str = "s1") -> dict[str, Any]:
    params = params or {}
    dataset = dataset or {"name": "wikitext", "split": "test", "limit": None}
    return {
        "trial_key": key, "position": position, "model": "llama", "method": method,
        "rate": rate, "dataset": dataset["name"], "params": params,
        "is_baseline": method == "none",
        "config": {
            "trial_key": key, "sweep": sweep, "model": {"id": "llama", "dtype": "float32"},
            "method": {"name": method, "params": params, "rate": rate},
            "dataset": dataset, "evaluation": EVALUATION, "seed": 7,
            "is_baseline": method == "none", "limits": {"trial_timeout_s": None},
        },
    }


def _result(metrics: dict[str, tuple[float, str | None]], status: str = "done",
            error: dict[str, str] | None = None, evidence: bool = True,
            host: str = "node-1") -> dict[str, Any]:
    result: dict[str, Any] = {
        "status": status,
        "metrics": {k: {"value": v, "direction": d} for k, (v, d) in metrics.items()},
        "environment": {"hardware": HW, "packages": {"torch": "2.13.0"}, "git_sha": "abc123"},
        "host": host, "duration_s": 2.5,
    }
    if evidence:
        result["evidence"] = {"params_before": 5_000_000_000, "params_after": 4_000_000_000,
                              "changed_fraction": 0.2, "max_abs_dlogits": 1.5, "details": {}}
    if error is not None:
        result["error"] = error
    return result


def _speed(ppl: float, tpt: float) -> dict[str, tuple[float, str]]:
    return {"perplexity": (ppl, "lower"), "decode_ms_per_token": (tpt, "lower")}


def _record(engine: Engine, key: str, result: dict[str, Any], sweep: str = "s1") -> None:
    with session_scope(engine, write=True) as session:
        mark_running(session, sweep, key, host="node-1")
        record_result(session, sweep, key, result)


ARC = {"name": "arc", "split": "validation", "limit": 8, "metrics": ["multiple_choice"]}
SCHEDULE = {"scope": "global", "schedule": {"kind": "linear", "layers": [0, 1]}}


@pytest.fixture
def results(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """Sweep ``s1`` with every kind of trial; yields its database URL and engine."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    engine = ensure_schema(url, create=True)
    rows = [
        _row("base", 0, "none", None),
        _row("half", 1, "magnitude", 0.5, SCHEDULE),    # ppl 2x, tpt 0.5x -> score 0.5
        _row("fast", 2, "magnitude", 0.2, SCHEDULE),    # ppl 1x, tpt 0.8x -> score 0.6
        _row("mc", 3, "magnitude", 0.5, SCHEDULE, ARC),  # its own evaluator; no baseline
        _row("long", 4, "custom", 0.3, {"note": LONG}),
        _row("crashed", 5, "wanda", 0.9),
        _row("slow", 6, "wanda", 0.95),
        _row("waiting", 7, "wanda", 0.7),
        _row("busy", 8, "wanda", 0.8),
    ]
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", {"name": "s1", "score": {"weight": 0.5}}, None, rows)
    _record(engine, "base", _result(_speed(PPL_BASE, TPT_BASE)))
    _record(engine, "half", _result(
        {**_speed(2 * PPL_BASE, 0.5 * TPT_BASE), "accuracy": (math.nan, "higher")}))
    _record(engine, "fast", _result(_speed(PPL_BASE, 0.8 * TPT_BASE)))
    _record(engine, "mc", _result({"accuracy": (0.5, "higher")}, host="node-2"))
    _record(engine, "long", _result(_speed(1.5 * PPL_BASE, TPT_BASE)))
    _record(engine, "crashed", _result(
        {}, status="failed", evidence=False,
        error={"type": "RuntimeError", "message": "CUDA out of memory", "reason":
               "out_of_memory"}))
    _record(engine, "slow", _result({}, status="timed_out", evidence=False,
                                    error={"message": "trial timed out after 60 s"}))
    with session_scope(engine, write=True) as session:
        mark_running(session, "s1", "busy")
    yield url, engine
    dispose_engines()


EXPORTED = ("base", "half", "fast", "mc", "long", "crashed", "slow")


@pytest.fixture(params=["file", "sqlite"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh MLflow tracking store: a local file store, and MLflow's SQLite store."""
    if request.param == "file":
        return (tmp_path / "mlruns").as_uri()
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@contextmanager
def _client(uri: str) -> Iterator[Any]:
    """A reading client; MLflow 3 opens its file store only with this variable set."""
    saved = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield MlflowClient(tracking_uri=uri)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = saved


def _runs(uri: str, experiment: str = "s1") -> dict[str, Any]:
    """Every run (active or not) of ``experiment``, by its trial_key tag; no duplicates."""
    from mlflow.entities import ViewType

    with _client(uri) as client:
        found = client.get_experiment_by_name(experiment)
        assert found is not None, f"no experiment {experiment}"
        runs = client.search_runs([found.experiment_id], run_view_type=ViewType.ALL,
                                  max_results=1000)
    by_key: dict[str, Any] = {}
    for run in runs:
        key = run.data.tags["trial_key"]
        assert key not in by_key, f"two runs for trial {key}"
        by_key[key] = run
    return by_key


def _export(engine: Engine, uri: str, **kwargs: Any):
    with session_scope(engine) as session:
        return export_to_mlflow(session, uri, **kwargs)


def _check_against_database(engine: Engine, runs: dict[str, Any], sweep: str = "s1",
                            first_starts: dict[str, int] | None = None) -> None:
    """Each run holds exactly what the database says of its trial.

    ``first_starts``: start times of runs whose trial ran again since the run was created
    (MLflow cannot change a run's start time).
    """
    with session_scope(engine) as session:
        board = {r["trial_key"]: r for r in
                 queries.leaderboard(session, sweep=sweep, include_failed=True)}
        trials = session.scalars(
            select(Trial).join(Sweep).where(Sweep.name == sweep)
            .options(selectinload(Trial.metrics), selectinload(Trial.evidence),
                     selectinload(Trial.environment))
        ).all()
    exported = [t for t in trials if t.status in ("done", "failed", "timed_out")]
    assert set(runs) == {t.trial_key for t in exported}
    for trial in exported:
        run = runs[trial.trial_key]
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        rate = "" if trial.rate is None else f"@{trial.rate}"
        assert run.info.run_name == f"llama/{trial.method}{rate}/{trial.dataset}"
        assert {k: params.get(k) for k in ("model", "method", "dataset", "trial_key",
                                           "is_baseline", "seed", "rate")} == {
            "model": trial.model, "method": trial.method, "dataset": trial.dataset,
            "trial_key": trial.trial_key, "is_baseline": str(trial.is_baseline), "seed": "7",
            "rate": None if trial.rate is None else str(trial.rate)}
        expected = {m.name: m.value for m in trial.metrics if m.value is not None}
        for name in ("score", "perf_norm", "speed_norm"):
            if board[trial.trial_key][name] is not None:
                expected[name] = board[trial.trial_key][name]
        if trial.evidence is not None:
            for name in ("params_before", "params_after", "changed_fraction",
                         "max_abs_dlogits"):
                expected[f"evidence.{name}"] = float(getattr(trial.evidence, name))
        # Metrics a re-run no longer has stay in MLflow, named in the stale_metrics tag.
        stale = set(filter(None, tags.get("stale_metrics", "").split(",")))
        assert not stale & set(expected), trial.trial_key
        current = {k: v for k, v in metrics.items() if k not in stale}
        assert current == pytest.approx(expected), trial.trial_key
        want_tags = {
            "sweep": sweep, "trial_key": trial.trial_key, "status": trial.status,
            "attempts": str(trial.attempts), "host": trial.host,
            "hardware_fingerprint": trial.environment.hardware_fingerprint,
            "git_sha": "abc123", "compress_sweep.version": version("compress-sweep"),
            "failure_reason": trial.failure_reason, "error_type": trial.error_type,
            "error_message": trial.error_message,
        }
        assert {k: tags.get(k) for k in want_tags} == want_tags, trial.trial_key
        assert run.info.status == ("FINISHED" if trial.status == "done" else "FAILED")
        assert run.info.start_time == (first_starts or {}).get(
            trial.trial_key, epoch_ms(trial.started_at))
        assert run.info.end_time == epoch_ms(trial.finished_at)


@needs_mlflow
def test_every_finished_trial_becomes_a_run_holding_what_the_database_says(
        results: tuple[str, Engine], tracking_uri: str) -> None:
    _, engine = results
    summary = _export(engine, tracking_uri)
    assert (summary.created, summary.updated, summary.unchanged) == (len(EXPORTED), 0, 0)
    assert summary.skipped == {"pending": 1, "running": 1}
    assert summary.lines()[1] == "skipped 2 trials not finished yet (1 pending, 1 running)"
    runs = _runs(tracking_uri)
    assert set(runs) == set(EXPORTED)
    _check_against_database(engine, runs)

    # The score and its parts, computed by hand (w = 0.5).
    half, fast = runs["half"].data.metrics, runs["fast"].data.metrics
    assert (half["perf_norm"], half["speed_norm"], half["score"]) == pytest.approx((0.5,) * 3)
    assert fast["score"] == pytest.approx(0.6)
    assert "accuracy" not in half  # NaN is stored as NULL and not exported
    assert half["evidence.params_before"] == 5e9
    assert "score" not in runs["mc"].data.metrics  # no baseline on its dataset

    # Params: the method's flattened, and only the evaluation settings its evaluators read.
    speed = {f"evaluation.speed.{k}": str(v) for k, v in EVALUATION["speed"].items()}
    assert runs["half"].data.params == {
        "model": "llama", "method": "magnitude", "rate": "0.5", "dataset": "wikitext",
        "is_baseline": "False", "seed": "7", "trial_key": "half",
        "method.scope": "global", "method.schedule.kind": "linear",
        "method.schedule.layers": "[0,1]",
        "evaluation.metrics": '["perplexity","speed"]',
        "evaluation.probe_length": str(EVALUATION["probe_length"]),
        "evaluation.max_length": str(EVALUATION["max_length"]),
        "evaluation.batch_size": str(EVALUATION["batch_size"]), **speed,
        "dataset.split": "test",
    }
    mc = runs["mc"].data.params
    assert mc["evaluation.metrics"] == '["multiple_choice"]'
    assert mc["evaluation.multiple_choice.delimiter"] == EVALUATION["multiple_choice"][
        "delimiter"]
    assert (mc["dataset.split"], mc["dataset.limit"]) == ("validation", "8")
    assert not [k for k in mc if k.startswith(("evaluation.speed", "evaluation.max_length"))]
    assert not [k for k in runs["half"].data.params if k.startswith(
        ("evaluation.multiple_choice", "evaluation.generation"))]
    note = runs["long"].data.params["method.note"]
    assert len(note) == 6000 and note.endswith("…[truncated]") and note.startswith("xxx")
    assert any("method.note" in n and "truncated" in n for n in summary.notes)

    # Failures: FAILED runs that say why.
    crashed, slow = runs["crashed"].data.tags, runs["slow"].data.tags
    assert (crashed["failure_reason"], crashed["error_type"]) == ("out_of_memory",
                                                                  "RuntimeError")
    assert slow["failure_reason"] == "timed_out" and slow["status"] == "timed_out"
    assert runs["base"].data.tags.get("failure_reason") is None
    assert "rate" not in runs["base"].data.params and runs["base"].info.run_name == (
        "llama/none/wikitext")

    # Exporting again changes nothing and creates nothing.
    again = _export(engine, tracking_uri)
    assert again.counts() == f"0 created, 0 updated, {len(EXPORTED)} unchanged"
    assert again.experiments == summary.experiments
    rerun = _runs(tracking_uri)
    assert {k: r.info.run_id for k, r in rerun.items()} == {
        k: r.info.run_id for k, r in runs.items()}
    _check_against_database(engine, rerun)


@needs_mlflow
def test_a_rerun_trial_updates_its_run(results: tuple[str, Engine], tmp_path: Path) -> None:
    _, engine = results
    uri = str(tmp_path / "mlruns")  # a plain directory is the file store too
    _export(engine, uri)
    first = _runs(uri)
    # "half" is re-run and its speed is no longer measured; "crashed" succeeds this time.
    _record(engine, "half", _result({"perplexity": (25.0, "lower")}))
    _record(engine, "crashed", _result(_speed(PPL_BASE, TPT_BASE)))

    summary = _export(engine, uri)
    assert summary.counts() == f"0 created, 2 updated, {len(EXPORTED) - 2} unchanged"
    assert {r["trial_key"] for r in summary.runs if r["action"] == "updated"} == {
        "half", "crashed"}
    runs = _runs(uri)
    assert {k: r.info.run_id for k, r in runs.items()} == {
        k: r.info.run_id for k, r in first.items()}
    half = runs["half"]
    assert half.data.metrics["perplexity"] == 25.0
    assert half.data.metrics["perf_norm"] == pytest.approx(0.4)
    # MLflow cannot delete a metric: the ones the re-run lacks are named as stale.
    assert half.data.tags["stale_metrics"] == "decode_ms_per_token,score,speed_norm"
    assert half.data.tags["attempts"] == "2"
    crashed = runs["crashed"]
    assert crashed.info.status == "FINISHED"
    assert crashed.data.tags["status"] == "done"
    for gone in ("failure_reason", "error_type", "error_message", "stale_metrics"):
        assert gone not in crashed.data.tags
    assert crashed.data.metrics["score"] == pytest.approx(0.5)
    with session_scope(engine) as session:
        trials = {t.trial_key: t for t in session.scalars(select(Trial))}
    for key in ("half", "crashed"):
        # MLflow keeps a run's start time; the end time is the latest attempt's.
        assert runs[key].info.start_time == first[key].info.start_time
        assert runs[key].info.end_time == epoch_ms(trials[key].finished_at)
        assert runs[key].info.end_time > first[key].info.end_time

    assert _export(engine, uri).counts() == f"0 created, 0 updated, {len(EXPORTED)} unchanged"

    # A re-run baseline changes the scores of trials that did not run again: their new,
    # lower values must still become the runs' latest values.
    _record(engine, "base", _result(_speed(PPL_BASE / 2, TPT_BASE)))
    summary = _export(engine, uri)
    assert {r["trial_key"] for r in summary.runs if r["action"] == "updated"} == {
        "base", "half", "fast", "long", "crashed"}
    runs = _runs(uri)
    assert runs["fast"].data.metrics["score"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)
    assert runs["fast"].data.metrics["perf_norm"] == pytest.approx(0.5)
    _check_against_database(engine, runs, first_starts={
        key: first[key].info.start_time for key in ("half", "crashed", "base")})


@needs_mlflow
def test_a_half_written_run_is_completed_not_duplicated(
        results: tuple[str, Engine], tmp_path: Path) -> None:
    _, engine = results
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # What an export interrupted after creating the run leaves, plus a param the database
    # now gives differently (MLflow refuses to change a logged param).
    with _client(uri) as client:
        experiment_id = client.create_experiment("s1")
        run_id = client.create_run(experiment_id, tags={"sweep": "s1", "trial_key": "half"},
                                   start_time=epoch_ms(_started(engine, "half")),
                                   run_name="llama/magnitude@0.5/wikitext").info.run_id
        client.log_param(run_id, "model", "qwen")

    summary = _export(engine, uri)
    assert summary.counts() == f"{len(EXPORTED) - 1} created, 1 updated, 0 unchanged"
    assert [r["run_id"] for r in summary.runs if r["trial_key"] == "half"] == [run_id]
    assert any("param model stays 'qwen'" in note and "'llama'" in note
               for note in summary.notes), summary.notes
    runs = _runs(uri)
    half = runs["half"]
    assert half.info.run_id == run_id and half.info.status == "FINISHED"
    assert half.data.params["model"] == "qwen"
    half.data.params["model"] = "llama"  # the one value MLflow kept; the rest must match
    _check_against_database(engine, runs)


def _started(engine: Engine, key: str) -> Any:
    with session_scope(engine) as session:
        return session.scalars(select(Trial.started_at).where(Trial.trial_key == key)).one()


@needs_mlflow
def test_cli_exports_chosen_sweeps_into_one_experiment(
        results: tuple[str, Engine], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, engine = results
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s2", {"name": "s2"}, None,
                       [_row("base", 0, "none", None, sweep="s2"),
                        _row("broken", 1, "wanda", 0.5, sweep="s2")])
    _record(engine, "base", _result(_speed(PPL_BASE, TPT_BASE)), sweep="s2")
    _record(engine, "broken", _result({}, status="failed", evidence=False), sweep="s2")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()

    args = ["--db", url, "export", "--mlflow", uri, "--sweep", "s2", "--sweep", "s1",
            "--experiment", "shared", "--done-only"]
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"MLflow {uri} (experiment shared): 6 created, 0 updated, 0 unchanged"
    assert lines[1:] == ["skipped 2 trials not finished yet (1 pending, 1 running)",
                         "skipped 3 trials that did not finish (2 failed, 1 timed_out; "
                         "--done-only)"]
    assert "file store" in err  # the note on MLflow's file store
    # The file store was allowed for the export only.
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="MLFLOW_ALLOW_FILE_STORE"):
        MlflowClient(tracking_uri=(tmp_path / "other").as_uri())

    from mlflow.entities import ViewType

    with _client(uri) as client:
        experiment = client.get_experiment_by_name("shared")
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    exported = sorted((r.data.tags["sweep"], r.data.tags["trial_key"]) for r in runs)
    # The same trial key in two sweeps is two runs; failed trials stayed out.
    assert exported == [("s1", "base"), ("s1", "fast"), ("s1", "half"), ("s1", "long"),
                        ("s1", "mc"), ("s2", "base")]
    assert {r.info.status for r in runs} == {"FINISHED"}

    with pytest.raises(SystemExit) as again:
        main(args)
    assert again.value.code == 0
    assert "0 created, 0 updated, 6 unchanged" in capsys.readouterr().out

    # By default: every sweep, failed trials too, one experiment per sweep.
    other = (tmp_path / "per-sweep").as_uri()
    with pytest.raises(SystemExit) as each:
        main(["--db", url, "export", "--mlflow", other])
    assert each.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"MLflow {other} (experiments s1, s2): {len(EXPORTED) + 2} created, 0 updated, "
        "0 unchanged")
    assert set(_runs(other, "s2")) == {"base", "broken"}
    assert set(_runs(other, "s1")) == set(EXPORTED)


def _fail(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as failed:
        main(args)
    out, err = capsys.readouterr()
    assert failed.value.code == 2, err
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_export_without_a_target_names_the_option(
        results: tuple[str, Engine], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = results
    assert "--mlflow" in _fail(["--db", url, "export"], capsys)


def test_export_without_mlflow_installed_names_the_extra(
        results: tuple[str, Engine], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = results
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    line = _fail(["--db", url, "export", "--mlflow", str(tmp_path / "mlruns")], capsys)
    assert "compress-sweep[mlflow]" in line
    assert not (tmp_path / "mlruns").exists()


@needs_mlflow
def test_unknown_sweep_and_deleted_experiment_are_bad_input(
        results: tuple[str, Engine], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = results
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    line = _fail(["--db", url, "export", "--mlflow", uri, "--sweep", "s11"], capsys)
    assert "unknown sweep 's11'" in line and "did you mean 's1'" in line

    with _client(uri) as client:
        client.delete_experiment(client.create_experiment("s1"))
    capsys.readouterr()  # MLflow's log lines of creating its database
    line = _fail(["--db", url, "export", "--mlflow", uri], capsys)
    assert "experiment 's1' is deleted" in line and "--experiment" in line


def test_times_and_uris_for_display() -> None:
    from datetime import UTC, datetime

    # 1.001 s after the epoch in floats is 1000.9999… ms; integer arithmetic keeps 1001.
    assert epoch_ms(datetime(1970, 1, 1, 0, 0, 1, 1000, tzinfo=UTC)) == 1001
    assert epoch_ms(datetime(2025, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)) == 1746100800123
    assert redact_uri("postgresql://me:secret@db/mlflow") == "postgresql://me:***@db/mlflow"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
