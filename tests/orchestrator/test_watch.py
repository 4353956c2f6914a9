"""`sweep status --watch` (orchestrator/live.py, orchestrator/cli/watch.py) and the worker's
announcement of where a running trial runs (workers/trial.py → launch.py → writer → store).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from postgres_server import backends, fresh_database_url  # tests/ on sys.path (rootdir conftest)
from rich.console import Console
from sqlalchemy import Engine, select, update

from orchestrator.cli import watch as live_view
from orchestrator.db.engine import dispose_engines, ensure_schema, session_scope
from orchestrator.db.leases import claim, start_driver
from orchestrator.db.models import Driver, Sweep, Trial, utcnow
from orchestrator.db.store import mark_running, record_placements, record_result, register_sweep
from orchestrator.db.writer import ResultWriter, _Event, _segments
from orchestrator.errors import BadInput
from orchestrator.live import eta_seconds, throughput_per_min, trial_duration_s, watch_snapshot

ROOT = Path(__file__).resolve().parents[2]
SWEEP_BIN = ROOT / ".venv" / "bin" / "sweep"
TMUX = "/usr/bin/tmux"
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)  # any aware time: the pure functions' "now"


def ago(seconds: float, now: datetime = T0) -> datetime:
    return now - timedelta(seconds=seconds)


# --------------------------------------------------------------------------- pure functions


def test_throughput_counts_finishes_in_the_window_from_the_first_start() -> None:
    finished = [(ago(100), ago(50)), (ago(60), ago(30)), (ago(40), ago(10))]
    # Three finishes since the first start 100 s ago: 1.8 per minute.
    assert throughput_per_min(finished, [ago(20)], T0) == pytest.approx(1.8)
    # A running trial that started earlier widens the window.
    assert throughput_per_min(finished, [ago(200)], T0) == pytest.approx(0.9)
    # Finishes before the window do not count, and the window is at most its length.
    old = [(ago(3000), ago(2000)), (ago(700), ago(590))]
    assert throughput_per_min(finished + old, [], T0) == pytest.approx(4 * 60 / 600)
    assert throughput_per_min(finished, [], T0, window_s=45) == pytest.approx(2 * 60 / 45)


def test_throughput_is_zero_when_stuck_and_unknown_before_anything_ran() -> None:
    assert throughput_per_min([], [ago(300)], T0) == 0.0
    assert throughput_per_min([], [], T0) is None
    assert throughput_per_min([(ago(5000), ago(4000))], [], T0) is None  # all long ago
    assert throughput_per_min([], [ago(0.2)], T0) is None  # too early to tell
    # A recovered result has no start: it counts from its end.
    assert throughput_per_min([(None, ago(30))], [], T0) == pytest.approx(2.0)


def test_eta_queues_pending_trials_onto_the_slots_of_the_running_ones() -> None:
    durations = [10.0, 30.0, 20.0]  # median 20
    # Running for 5 s and 25 s: slots free in 15 s and now. Three pending trials of 20 s:
    # 0→20, 15→35, 20→40.
    assert eta_seconds(3, [5.0, 25.0], durations) == pytest.approx(40.0)
    assert eta_seconds(0, [5.0, 25.0], durations) == pytest.approx(15.0)
    assert eta_seconds(4, [0.0], [10.0]) == pytest.approx(50.0)
    assert eta_seconds(1, [None], [10.0]) == pytest.approx(20.0)  # start unknown: just started


def test_eta_is_zero_when_nothing_is_left_and_unknown_without_evidence() -> None:
    assert eta_seconds(0, [], []) == 0.0
    assert eta_seconds(5, [1.0], []) is None  # nothing finished yet
    assert eta_seconds(5, [], [10.0]) is None  # nothing runs: no slot will free up


def test_duration_is_wall_clock_else_the_workers_measure() -> None:
    assert trial_duration_s(ago(90), ago(30), 12.0) == pytest.approx(60.0)
    assert trial_duration_s(None, ago(30), 12.0) == 12.0
    assert trial_duration_s(ago(10), ago(30), 12.0) == 12.0  # clocks disagree
    assert trial_duration_s(None, None, None) is None


# --------------------------------------------------------------------------- databases

@pytest.fixture(params=backends())
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh results database URL, once on SQLite and once on PostgreSQL."""
    yield from fresh_database_url(request, tmp_path, "sweep_watch")


def _row(key: str, position: int, method: str = "drop_layers", rate: float | None = 0.5,
         model: str = "builtin:tiny-llama") -> dict[str, Any]:
    return {"trial_key": key, "position": position, "model": model, "method": method,
            "rate": rate, "dataset": "builtin:pydoc", "params": {},
            "config": {"trial_key": key}, "is_baseline": method == "none"}


def _result(status: str = "done", host: str = "gpu-a", error: dict | None = None) -> dict:
    result: dict[str, Any] = {"status": status, "host": host, "duration_s": 1.0,
                              "metrics": {"perplexity": {"value": 12.0, "direction": "lower"}}}
    if error is not None:
        result["error"] = error
    return result


def _set_times(engine: Engine, sweep: str, key: str, **times: datetime | None) -> None:
    with session_scope(engine, write=True) as session:
        sweep_id = session.scalar(select(Sweep.id).where(Sweep.name == sweep))
        session.execute(update(Trial).where(Trial.sweep_id == sweep_id, Trial.trial_key == key)
                        .values(**times))


@pytest.fixture
def live_pid() -> Iterator[subprocess.Popen]:
    """A live process to stand for a running `sweep launch` (its driver row's pid)."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def build_running_sweep(engine: Engine, now: datetime, driver_pid: int | None) -> None:
    """Sweep ``s1`` mid-run (2 done, 1 out of memory, 2 running, 1 pending) and a finished
    sweep ``s2``, with start and finish times relative to ``now``."""
    keys = [f"k{i}" for i in range(6)]
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", {"name": "s1"}, None,
                       [_row(k, i, "none" if i == 0 else "drop_layers",
                             None if i == 0 else 0.1 * i) for i, k in enumerate(keys)])
        register_sweep(session, "s2", {"name": "s2"}, None, [_row("other", 0, "none", None)])
        for key in keys[:5]:
            mark_running(session, "s1", key)
        record_placements(session, "s1", [("k3", "gpu-a", "0"), ("k1", "gpu-b", "1")])
        record_result(session, "s1", "k0", _result())
        record_result(session, "s1", "k1", _result(host="gpu-b"))
        record_result(session, "s1", "k2", _result("failed", error={
            "type": "OutOfMemoryError", "reason": "out_of_memory",
            "message": "CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"}))
        mark_running(session, "s2", "other")
        record_result(session, "s2", "other", _result())
        if driver_pid is not None:
            driver_id = start_driver(session, "s1")
            claim(session, "s1", driver_id, keys)
            session.execute(update(Driver).where(Driver.id == driver_id)
                            .values(pid=driver_pid))
    for key, started, finished in (("k0", 300, 200), ("k1", 250, 100), ("k2", 120, 60),
                                   ("k3", 90, None), ("k4", 30, None)):
        _set_times(engine, "s1", key, started_at=ago(started, now),
                   finished_at=None if finished is None else ago(finished, now))
    _set_times(engine, "s2", "other", started_at=ago(4000, now), finished_at=ago(3990, now))


def test_snapshot_of_a_sweep_mid_run(any_db_url: str, live_pid: subprocess.Popen) -> None:
    engine = ensure_schema(any_db_url, create=True)
    now = utcnow()
    build_running_sweep(engine, now, live_pid.pid)
    with session_scope(engine) as session:
        snap = watch_snapshot(session, None, now=now)
    assert snap["active"] is True and snap["now"] == now
    s1, s2 = snap["sweeps"]
    assert s1["name"] == "s1" and s2["name"] == "s2"
    assert s1["counts"] == {"pending": 1, "running": 2, "done": 2, "failed": 1, "timed_out": 0}
    assert (s1["total"], s1["finished"], s1["remaining"]) == (6, 3, 3)
    assert s1["progress"] == pytest.approx(0.5)
    # Three finishes since the first start 300 s ago.
    assert s1["throughput_per_min"] == pytest.approx(0.6)
    # Durations 100, 150, 60 s → median 100; running for 90 s and 30 s → slots free in 10 s
    # and 70 s; the pending trial takes the first: 10 + 100 = 110 s.
    assert s1["median_duration_s"] == pytest.approx(100.0)
    assert s1["eta_s"] == pytest.approx(110.0)
    assert (s1["live_launches"], s1["active"], s1["stalled"]) == (1, True, False)
    assert (s2["active"], s2["stalled"], s2["eta_s"], s2["progress"]) == (False, False, None, 1.0)

    # Longest-running first; k4's worker has not announced itself yet.
    assert [(r["trial_key"], r["host"], r["gpus"], r["attempt"], r["live"])
            for r in snap["running"]] == [("k3", "gpu-a", "0", 1, True),
                                          ("k4", None, None, 1, True)]
    assert [r["elapsed_s"] for r in snap["running"]] == pytest.approx([90.0, 30.0])
    assert snap["running"][0]["rate"] == pytest.approx(0.3)
    [failure] = snap["failures"]
    assert (failure["trial_key"], failure["status"], failure["reason"]) == (
        "k2", "failed", "out_of_memory")
    assert failure["message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure["error_type"] == "OutOfMemoryError" and failure["sweep"] == "s1"

    with session_scope(engine) as session:
        only = watch_snapshot(session, "s2", now=now)
        with pytest.raises(BadInput, match="unknown sweep 's3'.*known sweeps: s1, s2"):
            watch_snapshot(session, "s3", now=now)
    assert [s["name"] for s in only["sweeps"]] == ["s2"]
    assert only["active"] is False and only["running"] == [] and only["failures"] == []

    live_pid.kill()  # the launch dies: its trials stay `running` until a relaunch
    live_pid.wait()
    with session_scope(engine) as session:
        stalled = watch_snapshot(session, "s1", now=now)
    assert stalled["sweeps"][0]["stalled"] is True
    assert stalled["sweeps"][0]["live_launches"] == 0
    assert [r["live"] for r in stalled["running"]] == [False, False]


def test_failures_newest_first_and_limited(any_db_url: str) -> None:
    engine = ensure_schema(any_db_url, create=True)
    now = utcnow()
    keys = [f"f{i}" for i in range(7)]
    with session_scope(engine, write=True) as session:
        register_sweep(session, "f", {"name": "f"}, None,
                       [_row(k, i) for i, k in enumerate(keys)])
        for key in keys:
            mark_running(session, "f", key)
            record_result(session, "f", key, _result(
                "timed_out" if key == "f6" else "failed",
                error={"type": "ValueError", "message": f"bad {key}"}))
    for i, key in enumerate(keys):
        _set_times(engine, "f", key, started_at=ago(1000, now), finished_at=ago(700 - 10 * i, now))
    with session_scope(engine) as session:
        snap = watch_snapshot(session, "f", now=now, failures=3)
    assert [(f["trial_key"], f["status"], f["reason"]) for f in snap["failures"]] == [
        ("f6", "timed_out", "timed_out"), ("f5", "failed", "error"), ("f4", "failed", "error")]
    assert snap["active"] is False
    # Every finish is older than the 10-minute window: no throughput, and no ETA to give.
    assert snap["sweeps"][0]["throughput_per_min"] is None
    assert snap["sweeps"][0]["eta_s"] is None


# --------------------------------------------------------------------------- the announcement


def _trial_state(engine: Engine, key: str) -> tuple:
    with session_scope(engine) as session:
        t = session.scalars(select(Trial).where(Trial.trial_key == key)).one()
        return t.status, t.attempts, t.host, t.gpus, t.started_at


def test_a_placement_sets_host_and_gpus_without_a_new_attempt(any_db_url: str) -> None:
    engine = ensure_schema(any_db_url, create=True)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "w", {"name": "w"}, None, [_row("a", 0), _row("b", 1)])
    with ResultWriter(engine, "w") as writer:
        writer.started("a")
        writer.flush()
        started_at = _trial_state(engine, "a")[4]
        assert _trial_state(engine, "a")[:4] == ("running", 1, None, None)
        writer.placed("a", host="gpu-node-3", gpus="2,3")
        writer.flush()
        assert _trial_state(engine, "a") == ("running", 1, "gpu-node-3", "2,3", started_at)
        writer.finished("a", _result(host="gpu-node-3"))
        writer.placed("a", host="elsewhere", gpus="9")  # stale: the result is in
        writer.flush()
        assert _trial_state(engine, "a")[:4] == ("done", 1, "gpu-node-3", "2,3")
        writer.started("a")  # a retry may land elsewhere: nothing of the last attempt stays
        writer.placed("b", host="cpu-node", gpus="")  # not running: nothing changes
        writer.flush()
        assert _trial_state(engine, "a")[:4] == ("running", 2, None, None)
        assert _trial_state(engine, "b")[:4] == ("pending", 0, None, None)
        writer.started("b", host="cpu-node", gpus="")
        writer.flush()
        assert _trial_state(engine, "b")[:4] == ("running", 1, "cpu-node", "")


def test_one_batch_applies_each_trials_events_in_order(any_db_url: str) -> None:
    """Start, placement, result and a retry's start and placement of one trial in one
    transaction end as the retry, placed where its own announcement said."""
    engine = ensure_schema(any_db_url, create=True)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "w", {"name": "w"}, None, [_row("a", 0)])
    with ResultWriter(engine, "w") as writer:
        writer._commit([
            _Event("a"), _Event("a", host="n1", gpus="0", placed=True),
            _Event("a", _result("failed", host="n1", error={"message": "x"})),
            _Event("a"), _Event("a", host="n2", gpus="1", placed=True),
        ])
    assert _trial_state(engine, "a")[:4] == ("running", 2, "n2", "1")


def test_segments_order_starts_placements_results_per_trial() -> None:
    def placed(key: str) -> _Event:
        return _Event(key, host="h", placed=True)

    done = {"status": "done"}
    events = [_Event("a"), placed("a"), _Event("b"), _Event("a", done), placed("a"),
              placed("b"), _Event("b"), placed("b"), _Event("b", done), _Event("c")]
    assert [[(e.key, e.phase) for e in s] for s in _segments(events)] == [
        [("a", 0), ("a", 1), ("b", 0), ("a", 2)],
        # a placement after its trial's result goes after that result
        [("a", 1), ("b", 1)],
        # a start after its trial's placement goes after that placement
        [("b", 0), ("b", 1), ("b", 2), ("c", 0)],
    ]


# --------------------------------------------------------------------------- rendering


def snapshot_dict(now: datetime) -> dict[str, Any]:
    """A constructed snapshot: one active sweep (one trial stalled elsewhere), one done."""
    counts = {"pending": 3, "running": 2, "done": 6, "failed": 1, "timed_out": 0}
    return {
        "now": now, "active": True,
        "sweeps": [
            {"name": "rates", "counts": counts, "total": 12, "finished": 7, "remaining": 5,
             "progress": 7 / 12, "throughput_per_min": 2.5, "eta_s": 110.0,
             "median_duration_s": 100.0, "live_launches": 1, "active": True,
             "stalled": False},
            {"name": "old", "counts": dict(counts, pending=0, running=2, done=1, failed=0),
             "total": 3, "finished": 1, "remaining": 2, "progress": 1 / 3,
             "throughput_per_min": None, "eta_s": None, "median_duration_s": None,
             "live_launches": 0, "active": True, "stalled": True},
        ],
        "running": [
            {"sweep": "rates", "trial_key": "ab12cd34ef56aa", "model": "builtin:tiny-llama",
             "method": "head_mask", "rate": 0.25, "dataset": "builtin:pydoc",
             "host": "gpu-node-7", "gpus": "0,1", "started_at": ago(3725, now),
             "elapsed_s": 3725.0, "attempt": 2, "live": True},
            {"sweep": "rates", "trial_key": "ffee", "model": "builtin:tiny-llama",
             "method": "drop_layers", "rate": 0.5, "dataset": "builtin:pydoc",
             "host": "cpu-box", "gpus": "", "started_at": ago(65, now), "elapsed_s": 65.0,
             "attempt": 1, "live": True},
            {"sweep": "old", "trial_key": "0123", "model": "m", "method": "none",
             "rate": None, "dataset": "d", "host": None, "gpus": None,
             "started_at": ago(5, now), "elapsed_s": 5.0, "attempt": 1, "live": False},
        ],
        "failures": [
            {"sweep": "rates", "trial_key": "dead", "model": "builtin:tiny-llama",
             "method": "drop_layers", "rate": 0.95, "dataset": "builtin:pydoc",
             "status": "failed", "reason": "error", "error_type": "ValueError",
             "message": "drop_layers would drop all 4 layers " + "x" * 100, "host": "h",
             "finished_at": now.replace(hour=11, minute=58, second=7)},
        ],
    }


def record(renderable: Any, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("│")[1:-1]]


def _line_with(text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, (needles, text)
    return lines[0]


def test_the_view_shows_counts_progress_running_rows_and_failures() -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    text = record(live_view.render_snapshot(snapshot_dict(now), interval=2))
    assert text.startswith(
        "sweep status at 2026-05-01 12:00:00 UTC, refreshed every 2 s (Ctrl-C to stop)")
    rates = cells(_line_with(text, "rates", "7/12"))
    # sweep, pending, running, done, failed, timed_out, total, bar, finished, per min, ETA
    assert rates[:7] == ["rates", "3", "2", "6", "1", "0", "12"]
    assert set(rates[7]) <= set("━╸ ") and rates[7].count("━") == 11  # 7/12 of 20 cells
    assert rates[8:] == ["7/12 58%", "2.5", "1m50s", ""]
    old = cells(_line_with(text, "old ", "1/3"))
    assert old[8:] == ["1/3 33%", "-", "-", "stalled: no live launch"]
    assert "stalled (no live `sweep launch`): old; launch the same spec again" in text
    assert "running trials (3)" in text
    # sweep, model, method, rate, dataset, host, GPU, elapsed, attempt, trial
    assert cells(_line_with(text, "gpu-node-7")) == [
        "rates", "builtin:tiny-llama", "head_mask", "0.25", "builtin:pydoc", "gpu-node-7",
        "0,1", "1h02m05s", "2", "ab12cd34ef56"]
    assert cells(_line_with(text, "cpu-box"))[5:9] == ["cpu-box", "cpu", "1m05s", "1"]
    assert cells(_line_with(text, "0123"))[5:8] == ["-", "-", "5s stalled"]
    failure = cells(_line_with(text, "11:58:07"))
    assert failure[:8] == ["11:58:07", "rates", "builtin:tiny-llama", "drop_layers", "0.95",
                           "builtin:pydoc", "failed", "error"]
    assert failure[8].startswith("ValueError: drop_layers would drop all 4 layers xx")
    assert failure[8].endswith("…") and len(failure[8]) == len("ValueError: ") + 80


def test_a_narrow_terminal_drops_columns_not_rows() -> None:
    snap = snapshot_dict(utcnow())
    for width in (80, 100, 130):
        text = record(live_view.render_snapshot(snap, interval=2), width=width)
        assert max(len(line) for line in text.splitlines()) <= width, text
        # Each sweep and each running trial keeps one line with what matters most.
        rates = _line_with(text, "│ rates ", " 12 ")
        assert cells(rates)[:7] == ["rates", "3", "2", "6", "1", "0", "12"]
        assert "1m50s" in rates
        first = cells(_line_with(text, "gpu-node-7"))
        assert {"builtin:tiny-llama", "head_mask", "0.25", "0,1", "1h02m05s"} <= set(first)
        assert "│ none " in _line_with(text, "5s stalled")
    narrow = record(live_view.render_snapshot(snap, interval=2), width=80)
    headers = {c for line in narrow.splitlines() if line.startswith("┃") for c in cells(
        line.replace("┃", "│"))}
    assert {"trial", "dataset", "per min", "note"}.isdisjoint(headers)
    assert {"pending", "ETA", "host", "GPU", "elapsed", "error"} <= headers


def test_the_view_caps_the_running_rows_and_omits_empty_tables() -> None:
    now = utcnow()
    snap = snapshot_dict(now)
    text = record(live_view.render_snapshot(snap, max_running=2))
    assert "running trials (3), the 2 running longest" in text and "0123" not in text
    quiet = dict(snap, running=[], failures=[])
    text = record(live_view.render_snapshot(quiet, error="server closed the connection"))
    assert "running trials" not in text and "failures" not in text
    assert "could not read the database: server closed the connection; retrying" in text
    empty = {"now": now, "active": False, "sweeps": [], "running": [], "failures": []}
    assert "no sweeps in this database yet" in record(live_view.render_snapshot(empty))


def test_summary_line_and_durations() -> None:
    snap = snapshot_dict(utcnow())
    assert live_view.summary_line(dict(snap, sweeps=snap["sweeps"][:1])) == (
        "sweep rates finished: 6 done, 1 failed, 0 timed out of 12 trials")
    assert live_view.summary_line(snap) == (
        "2 sweeps finished: 7 done, 1 failed, 0 timed out of 15 trials")
    assert [live_view.duration_text(s) for s in (None, 0, 59.6, 61, 3600, 7322)] == [
        "-", "0s", "1m00s", "1m01s", "1h00m00s", "2h02m02s"]


# --------------------------------------------------------------------------- the poll loop


def test_watch_of_a_finished_sweep_prints_once_and_exits_0(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = ensure_schema(url, create=True)
    build_running_sweep(engine, utcnow(), None)
    console = Console(record=True, width=200, file=io.StringIO())
    started = time.monotonic()
    assert live_view.watch(url, "s2", 30.0, console=console) == 0
    assert time.monotonic() - started < 10  # did not wait for a second poll
    text = console.export_text()
    # On a line of its own, also outside a terminal (where Live leaves its view unended).
    assert "\nsweep s2 finished: 1 done, 0 failed, 0 timed out of 1 trials\n" in text
    assert "s1" not in text


def test_watch_polls_until_max_polls_then_returns_0(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = ensure_schema(url, create=True)
    build_running_sweep(engine, utcnow(), None)
    polls: list[float] = []
    real_poll = live_view.poll

    def counting_poll(engine: Engine, sweep: str | None) -> dict[str, Any]:
        polls.append(time.monotonic())
        return real_poll(engine, sweep)

    monkeypatch.setattr(live_view, "poll", counting_poll)
    console = Console(record=True, width=200, file=io.StringIO())
    assert live_view.watch(url, "s1", 0.2, console=console, max_polls=3) == 0
    assert len(polls) == 3
    assert polls[2] - polls[0] >= 0.35  # the interval is kept between polls
    text = console.export_text()
    assert "finished:" not in text  # stopped by max_polls, not because the sweep ended
    assert "no live launch" in text and "gpu-a" in text


def test_ctrl_c_and_failed_polls_inside_the_loop(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = ensure_schema(url, create=True)
    build_running_sweep(engine, utcnow(), None)
    real_poll = live_view.poll
    calls = iter(["ok", "ok", "fail", "interrupt"])

    def flaky_poll(engine: Engine, sweep: str | None) -> dict[str, Any]:
        what = next(calls)
        if what == "fail":
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        if what == "interrupt":
            raise KeyboardInterrupt
        return real_poll(engine, sweep)

    monkeypatch.setattr(live_view, "poll", flaky_poll)
    console = Console(record=True, width=200, file=io.StringIO())
    assert live_view.watch(url, "s1", 0.1, console=console) == 0
    assert next(calls, "all used") == "all used"
    # The last frame drawn before Ctrl-C: the failed poll is shown over the last good view.
    text = console.export_text()
    assert "could not read the database: server closed the connection; retrying" in text
    assert "gpu-a" in text and "finished:" not in text


def test_poll_is_one_read_transaction_that_is_over_when_it_returns(any_db_url: str) -> None:
    engine = ensure_schema(any_db_url, create=True)
    build_running_sweep(engine, utcnow(), None)
    snap = live_view.poll(engine, "s1")
    assert snap["sweeps"][0]["counts"]["running"] == 2
    assert [r["trial_key"] for r in snap["running"]] == ["k3", "k4"]
    assert engine.pool.checkedout() == 0  # no connection left in a transaction


# --------------------------------------------------------------------------- the CLI


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from orchestrator.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def test_cli_refuses_bad_watch_options_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    build_running_sweep(ensure_schema(url, create=True), utcnow(), None)
    cases = {
        ("status", "--interval", "1"): "--interval applies only to --watch",
        ("status", "--watch", "--interval", "0"): "--interval must be a number of seconds",
        ("status", "--watch", "--interval", "nan"): "--interval must be a number of seconds",
        ("status", "--watch", "--format", "json"): "--format json cannot be watched",
        ("status", "--watch", "--sweep", "s3"): "unknown sweep 's3'",
    }
    for args, message in cases.items():
        code, out, err = run_cli(capsys, "--db", url, *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    code, _, err = run_cli(capsys, "--db", f"sqlite:///{tmp_path / 'none.db'}", "status",
                           "--watch")
    assert code == 2 and "no results database" in err
    assert not (tmp_path / "none.db").exists()
    # Without --watch, status is what it was.
    code, out, _ = run_cli(capsys, "--db", url, "status", "--sweep", "s1", "--format", "csv")
    assert code == 0
    assert out.splitlines()[1].startswith("s1,1,2,2,1,0,6,")


# --------------------------------------------------------------------------- in a terminal

needs_tmux = pytest.mark.skipif(not Path(TMUX).exists(), reason="tmux is not installed")

UPDATER = '''
"""Plays a `sweep launch` writing the database from another process."""
import os, sys, time
from pathlib import Path
from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.leases import claim, finish_driver, start_driver
from orchestrator.db.store import mark_running, record_placements, record_result, register_sweep

url, folder = sys.argv[1], Path(sys.argv[2])
def row(key, i):
    return {"trial_key": key, "position": i, "model": "builtin:tiny-llama",
            "method": "none" if i == 0 else "drop_layers", "rate": None if i == 0 else i / 8,
            "dataset": "builtin:pydoc", "params": {}, "config": {}, "is_baseline": i == 0}
def result(status="done", host="gpu-node-7", error=None):
    return {"status": status, "host": host, "duration_s": 1.0, "error": error,
            "metrics": {"perplexity": {"value": 10.0, "direction": "lower"}}}
keys = ["t0", "t1", "t2", "t3"]
engine = ensure_schema(url, create=True)
with session_scope(engine, write=True) as s:
    register_sweep(s, "live", {"name": "live"}, None, [row(k, i) for i, k in enumerate(keys)])
    driver = start_driver(s, "live")
    claim(s, "live", driver, keys)
with session_scope(engine, write=True) as s:
    mark_running(s, "live", "t0")
    mark_running(s, "live", "t1")
with session_scope(engine, write=True) as s:
    record_placements(s, "live", [("t0", "gpu-node-7", "0"), ("t1", "gpu-node-7", "1")])
(folder / "ready").touch()
while not (folder / "go").exists():
    time.sleep(0.05)
with session_scope(engine, write=True) as s:
    record_result(s, "live", "t0", result())
    record_result(s, "live", "t1", result("failed", error={
        "type": "OutOfMemoryError", "reason": "out_of_memory",
        "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}))
    mark_running(s, "live", "t2", host="gpu-node-8", gpus="0")
    mark_running(s, "live", "t3")
time.sleep(1.0)
with session_scope(engine, write=True) as s:
    record_result(s, "live", "t2", result(host="gpu-node-8"))
    record_result(s, "live", "t3", result())
    finish_driver(s, driver)
'''


class Tmux:
    """A tmux server of its own (its own socket), running one command in a 160×50 pane."""

    def __init__(self, folder: Path) -> None:
        # A short path of our own: a unix socket path must stay under 108 bytes.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tmux", dir="/tmp"))
        self.socket = str(self.socket_dir / "s")
        self.folder = folder

    def tmux(self, *args: str) -> str:
        out = subprocess.run([TMUX, "-S", self.socket, "-f", "/dev/null", *args],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout

    def start(self, argv: list[str]) -> None:
        # bash runs the command, then records its exit code and keeps the pane to read.
        # pytest exports COLUMNS and LINES (80×24), which would override the pane's size.
        script = self.folder / "run.sh"
        quoted = " ".join(f"'{a}'" for a in argv)
        script.write_text(f"unset COLUMNS LINES\n{quoted}\n"
                          f"echo \"exit=$?\" > '{self.folder / 'exit'}'\nsleep 600\n")
        self.tmux("new-session", "-d", "-s", "w", "-x", "160", "-y", "50", "-c", str(ROOT),
                  f"bash '{script}'")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "w")

    def wait_for(self, check: Any, what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.1)
        pytest.fail(f"the pane never showed {what}:\n{self.screen()}")

    def exit_code(self, timeout: float = 60) -> str:
        path = self.folder / "exit"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            time.sleep(0.1)
        pytest.fail(f"the command never ended:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=30, check=False)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    yield session
    session.close()


def _watch_argv(url: str, *extra: str) -> list[str]:
    # The console script a user types; the module when this environment has no script.
    sweep = [str(SWEEP_BIN)] if SWEEP_BIN.exists() else [sys.executable, "-m",
                                                         "orchestrator.cli.main"]
    return [*sweep, "--db", url, "status", "--watch", "--interval", "0.5", *extra]


@needs_tmux
def test_watch_in_a_terminal_follows_another_process_and_exits_0(tmp_path: Path,
                                                                 tmux: Tmux) -> None:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    updater = subprocess.Popen([sys.executable, "-c", UPDATER, url, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert updater.poll() is None and time.monotonic() < deadline, "updater failed"
            time.sleep(0.05)
        tmux.start(_watch_argv(url, "--sweep", "live"))
        running = tmux.wait_for(lambda s: "running trials (2)" in s, "two running trials")
        rows = [line for line in running.splitlines() if "gpu-node-7" in line]
        assert len(rows) == 2 and all("drop_layers" in r or "none" in r for r in rows), running
        assert "refreshed every 0.5 s" in running
        (tmp_path / "go").touch()
        # The pane is redrawn in place: it shows the new running trial, not a second copy.
        middle = tmux.wait_for(lambda s: "gpu-node-8" in s or "finished:" in s,
                               "the next trials")
        assert middle.count("sweep status at") == 1, middle
        assert tmux.exit_code() == "exit=0"
        assert updater.wait(timeout=60) == 0
    finally:
        updater.kill()
        updater.wait()
    final = tmux.screen()
    assert "sweep live finished: 3 done, 1 failed, 0 timed out of 4 trials" in final
    assert "out_of_memory" in final and "CUDA out of memory" in final
    assert "running trials" not in final
    assert final.count("sweep status at") == 1, final  # no flicker leftovers: one view
    assert "Traceback" not in final


def _files(folder: Path) -> list[str]:
    # SQLite's -wal and -shm files come and go with connections, readers' too.
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm")))


def _dump(path: Path) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@needs_tmux
def test_ctrl_c_leaves_quietly_with_exit_0_and_the_database_unchanged(tmp_path: Path,
                                                                     tmux: Tmux) -> None:
    db = tmp_path / "stuck.db"
    url = f"sqlite:///{db}"
    build_running_sweep(ensure_schema(url, create=True), utcnow(), None)
    dispose_engines()  # no connection of ours stays open on the file
    before = (_dump(db), db.read_bytes())
    files_before = _files(tmp_path)
    tmux.start(_watch_argv(url))
    shown = tmux.wait_for(lambda s: "no live launch" in s and "gpu-a" in s,
                          "the stalled sweep")
    assert "running trials (2)" in shown
    time.sleep(0.7)  # let a poll or two run, then interrupt whatever it is doing
    tmux.tmux("send-keys", "-t", "w", "C-c")
    assert tmux.exit_code() == "exit=0"
    screen = tmux.screen()
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
    assert "interrupted" not in screen and "aborted" not in screen
    assert not any(line.startswith("error:") for line in screen.splitlines())
    assert (_dump(db), db.read_bytes()) == before
    assert _files(tmp_path) == sorted([*files_before, "exit", "run.sh"])  # the test's own


# --------------------------------------------------------------------------- a real launch


@pytest.mark.slow
def test_a_real_launch_announces_host_and_gpus_of_running_trials(tmp_path: Path, ray_session,
                                                                 tiny_llama_dir) -> None:
    from orchestrator import launch, spec

    data = {"name": "announce", "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": [0.5]}],
            "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 40}],
            "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 64, "stride": 32,
                           "speed": {"warmup": 1, "repeats": 2, "prompt_length": 16,
                                     "new_tokens": 4}}}
    path = tmp_path / "announce.yaml"
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path / 'announce.db'}"
    planned = launch.plan(spec.load(path), str(path), url, storage_path=str(tmp_path / "tune"))
    engine = ensure_schema(url, create=False)
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def look() -> None:  # what `sweep status --watch` would see while the sweep runs
        while not stop.is_set():
            with session_scope(engine) as session:
                seen.extend(watch_snapshot(session, "announce")["running"])
            time.sleep(0.05)

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    try:
        outcome = launch.run(planned, url, storage_path=str(tmp_path / "tune"))
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert (outcome.done, outcome.failed) == (2, 0)
    host = socket.gethostname()
    announced = {r["trial_key"] for r in seen if r["host"] == host and r["gpus"] == ""}
    assert announced, f"no running trial was seen with its host and GPUs: {seen[:5]}"
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial)).all()
    assert len(trials) == 2
    for trial in trials:
        # CPU trials: "" (announced, no GPU), not NULL (never announced); one attempt each:
        # the announcement is not a start.
        assert (trial.status, trial.host, trial.gpus, trial.attempts) == ("done", host, "", 1)
    with session_scope(engine) as session:
        final = watch_snapshot(session, "announce")
    assert final["active"] is False and final["sweeps"][0]["counts"]["done"] == 2
    assert os.environ.get("CUDA_VISIBLE_DEVICES") in (None, "")  # the premise of gpus == ""


def test_workers_announcement_is_read_by_the_callback_only_without_a_payload() -> None:
    """The callback's branch for the announcement, with Tune's trial stood in for."""
    from orchestrator.launch import Progress, _results_callback_class

    class FakeWriter:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def started(self, key: str, host: str | None = None) -> None:
            self.calls.append(("started", key))

        def placed(self, key: str, host: str | None, gpus: str | None) -> None:
            self.calls.append(("placed", key, host, gpus))

        def finished(self, key: str, result: dict, on_committed: Any = None) -> None:
            self.calls.append(("finished", key, result["status"]))

    class FakeTrial:
        config = {"trial": {"trial_key": "k1"}}

    writer = FakeWriter()
    callback = _results_callback_class()(writer, Progress(["k1"]), None)
    trial = FakeTrial()
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"started": '{"host": "n1", "pid": 7, "gpus": ""}',
                                            "training_iteration": 1})
    callback.on_trial_result(0, [], trial, {"started": "not json", "training_iteration": 2})
    callback.on_trial_result(0, [], trial, {"training_iteration": 3})
    callback.on_trial_result(0, [], trial, {"payload": '{"status": "done"}',
                                            "trial_status": "done"})
    callback.on_trial_result(0, [], trial, {"started": '{"host": "late", "gpus": "1"}'})
    assert writer.calls == [("started", "k1"), ("placed", "k1", "n1", ""),
                            ("finished", "k1", "done")]
    assert callback.progress.states == {"k1": "done"}


def test_worker_reports_its_placement_before_its_result(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """tune_trainable's first report is the announcement; the result comes second."""
    import json

    import ray
    from ray import tune

    from workers import trial as worker_trial

    reports: list[dict] = []
    monkeypatch.chdir(Path.cwd())  # tune_trainable moves to driver_cwd; this moves back
    monkeypatch.setattr(tune, "report", lambda metrics: reports.append(metrics))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [2, 3])
    monkeypatch.setattr(worker_trial, "_run_within_limits",
                        lambda config: ({"status": "done", "host": "x"}, False))
    worker_trial.tune_trainable({"trial": {"trial_key": "k", "driver_cwd": str(tmp_path)}})
    assert [list(r) for r in reports] == [["started"], ["payload", "trial_status"]]
    assert json.loads(reports[0]["started"]) == {"host": socket.gethostname(),
                                                 "pid": os.getpid(), "gpus": "2,3"}

