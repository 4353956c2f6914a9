"""Reads for status, list and leaderboard (orchestrator/queries.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from orchestrator import queries
from orchestrator.db.engine import session_scope
from orchestrator.db.store import mark_running, record_result, register_sweep
from orchestrator.errors import BadInput

ResultFactory = Callable[..., dict[str, Any]]

HW_A = {"cpu": "x86_64", "gpus": ["A100"]}
HW_B = {"cpu": "x86_64", "gpus": ["H100"]}
PPL_BASE, TPT_BASE = 10.0, 8.0


def _row(key: str, position: int, method: str, rate: float | None, model: str = "llama",
         dataset: str = "wikitext") -> dict[str, Any]:
    return {"trial_key": key, "position": position, "model": model, "method": method,
            "rate": rate, "dataset": dataset, "params": {}, "config": {"trial_key": key},
            "is_baseline": method == "none"}


def _metrics(ppl: float | None, tpt: float | None, acc: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ppl is not None:
        out["perplexity"] = (ppl, "lower")
    if tpt is not None:
        out["decode_ms_per_token"] = (tpt, "lower")
    if acc is not None:
        out["accuracy"] = (acc, "higher")
    return out


def _record(engine: Engine, sweep: str, key: str, result: dict[str, Any]) -> None:
    with session_scope(engine, write=True) as session:
        mark_running(session, sweep, key)
        record_result(session, sweep, key, result)


@pytest.fixture
def board(engine: Engine, make_result: ResultFactory) -> Engine:
    """Sweep ``s1``: a baseline and trials whose scores are known by hand (w = 0.5)."""
    rows = [
        _row("base", 0, "none", None),
        _row("half", 1, "magnitude", 0.5),      # ppl 2x, tpt 0.5x -> 0.5*0.5 + 0.5*0.5 = 0.5
        _row("fast", 2, "magnitude", 0.2),      # ppl 1x, tpt 0.8x -> 0.5*1 + 0.5*0.2 = 0.6
        _row("broken", 3, "magnitude", 0.9),    # ppl 10x, tpt 3x -> 0.05 - 1 < 0 -> 0
        _row("elsewhere", 4, "wanda", 0.5),     # other hardware -> no speed, no score
        _row("noacc", 5, "wanda", 0.7),         # no accuracy metric
        _row("crashed", 6, "wanda", 0.9),       # failed
        _row("waiting", 7, "wanda", 0.95),      # pending
    ]
    spec = {"name": "s1", "score": {"quality_metric": "perplexity", "weight": 0.5}}
    with session_scope(engine, write=True) as session:
        register_sweep(session, "s1", spec, None, rows)
    _record(engine, "s1", "base",
            make_result(metrics=_metrics(PPL_BASE, TPT_BASE, 0.70), hardware=HW_A))
    _record(engine, "s1", "half",
            make_result(metrics=_metrics(2 * PPL_BASE, 0.5 * TPT_BASE, 0.60), hardware=HW_A))
    _record(engine, "s1", "fast",
            make_result(metrics=_metrics(PPL_BASE, 0.8 * TPT_BASE, 0.69), hardware=HW_A))
    _record(engine, "s1", "broken",
            make_result(metrics=_metrics(10 * PPL_BASE, 3 * TPT_BASE, 0.20), hardware=HW_A))
    _record(engine, "s1", "elsewhere",
            make_result(metrics=_metrics(PPL_BASE, 0.1 * TPT_BASE, 0.71), hardware=HW_B))
    _record(engine, "s1", "noacc",
            make_result(metrics=_metrics(1.25 * PPL_BASE, TPT_BASE), hardware=HW_A))
    _record(engine, "s1", "crashed", make_result(
        status="failed", metrics=_metrics(5.0, None), evidence=False, hardware=HW_A,
        error={"type": "RuntimeError", "message": "CUDA OOM", "traceback": "…"}))
    return engine


def _board(engine: Engine, **kwargs: Any) -> list[dict[str, Any]]:
    with session_scope(engine) as session:
        return queries.leaderboard(session, **kwargs)


def _by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["trial_key"]: r for r in rows}


def test_score_matches_hand_computation(board: Engine) -> None:
    rows = _by_key(_board(board))
    assert rows["base"]["score"] == pytest.approx(0.5)
    assert (rows["base"]["perf_norm"], rows["base"]["speed_norm"]) == (1.0, 0.0)
    assert rows["half"]["perf_norm"] == pytest.approx(0.5)
    assert rows["half"]["speed_norm"] == pytest.approx(0.5)
    assert rows["half"]["score"] == pytest.approx(0.5)
    assert rows["fast"]["score"] == pytest.approx(0.6)
    # 0.5 * 0.1 + 0.5 * (1 - 3) = -0.95, clamped.
    assert rows["broken"]["perf_norm"] == pytest.approx(0.1)
    assert rows["broken"]["speed_norm"] == pytest.approx(-2.0)
    assert rows["broken"]["score"] == 0.0
    # Speed from other hardware is not comparable: no SpeedNorm, so no score.
    assert rows["elsewhere"]["perf_norm"] == pytest.approx(1.0)
    assert rows["elsewhere"]["speed_norm"] is None and rows["elsewhere"]["score"] is None
    assert rows["noacc"]["score"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.0)


def test_rows_carry_identity_metrics_and_directions(board: Engine) -> None:
    row = _by_key(_board(board))["half"]
    assert {k: row[k] for k in ("sweep", "model", "method", "rate", "dataset", "status")} == {
        "sweep": "s1", "model": "llama", "method": "magnitude", "rate": 0.5,
        "dataset": "wikitext", "status": "done"}
    assert row["is_baseline"] is False
    assert row["metrics"] == {"perplexity": 20.0, "decode_ms_per_token": 4.0, "accuracy": 0.6}
    assert row["directions"] == {
        "perplexity": "lower", "decode_ms_per_token": "lower", "accuracy": "higher"}
    assert _by_key(_board(board))["base"]["is_baseline"] is True


def test_default_order_is_best_score_first_missing_last(board: Engine) -> None:
    keys = [r["trial_key"] for r in _board(board)]
    # Ties keep grid order (base before half); rows without a score go last.
    assert keys == ["fast", "base", "half", "noacc", "broken", "elsewhere"]


def test_sorting_by_a_lower_is_better_metric(board: Engine) -> None:
    rows = _board(board, metric="perplexity")
    values = [r["metrics"]["perplexity"] for r in rows]
    assert values == sorted(values)
    assert rows[0]["metrics"]["perplexity"] == PPL_BASE
    assert rows[-1]["trial_key"] == "broken"


def test_sorting_by_a_higher_is_better_metric_puts_rows_lacking_it_last(board: Engine) -> None:
    keys = [r["trial_key"] for r in _board(board, metric="accuracy")]
    assert keys == ["elsewhere", "base", "fast", "half", "broken", "noacc"]


def test_failed_rows_only_on_request_and_never_scored(board: Engine) -> None:
    assert "crashed" not in _by_key(_board(board))
    rows = _by_key(_board(board, include_failed=True))
    assert rows["crashed"]["status"] == "failed"
    assert rows["crashed"]["score"] is None and rows["crashed"]["perf_norm"] is None
    assert rows["crashed"]["error_type"] == "RuntimeError"
    # Its perplexity would be the best; it still is no result.
    assert [r["trial_key"] for r in _board(board, metric="perplexity", include_failed=True)][0] \
        == "crashed"
    assert "waiting" not in rows


def test_unknown_metric_suggests_the_closest(board: Engine) -> None:
    with pytest.raises(BadInput) as caught:
        _board(board, metric="perplexty")
    message = str(caught.value)
    assert "unknown metric 'perplexty'" in message
    assert "did you mean 'perplexity'" in message
    assert "accuracy, decode_ms_per_token, perf_norm, perplexity, score, speed_norm" in message
    assert caught.value.exit_code == 2


def test_unknown_sweep_is_bad_input(board: Engine) -> None:
    with pytest.raises(BadInput, match="unknown sweep 's11'.*did you mean 's1'.*known sweeps: s1"):
        _board(board, sweep="s11")


def test_quality_metric_and_weight_come_from_the_sweep_spec(
    board: Engine, make_result: ResultFactory
) -> None:
    spec = {"name": "acc", "score": {"quality_metric": "accuracy", "weight": 0.8}}
    with session_scope(board, write=True) as session:
        register_sweep(session, "acc", spec, None,
                       [_row("a-base", 0, "none", None), _row("a-1", 1, "magnitude", 0.5)])
    _record(board, "acc", "a-base", make_result(metrics=_metrics(10, 8.0, 0.80), hardware=HW_A))
    _record(board, "acc", "a-1", make_result(metrics=_metrics(40, 6.0, 0.60), hardware=HW_A))
    rows = _by_key(_board(board, sweep="acc"))
    assert set(rows) == {"a-base", "a-1"}
    # Higher-is-better quality: PerfNorm = q / q_base.
    assert rows["a-1"]["perf_norm"] == pytest.approx(0.75)
    assert rows["a-1"]["score"] == pytest.approx(0.8 * 0.75 + 0.2 * 0.25)
    assert rows["a-base"]["score"] == pytest.approx(0.8)
    # Sweep s1 still scores with its own settings when both are shown.
    assert _by_key(_board(board))["half"]["score"] == pytest.approx(0.5)


def test_baseline_is_per_model_and_dataset(board: Engine, make_result: ResultFactory) -> None:
    with session_scope(board, write=True) as session:
        register_sweep(session, "s1", {"name": "s1"}, None, [
            _row("qwen-base", 8, "none", None, model="qwen"),
            _row("qwen-1", 9, "magnitude", 0.5, model="qwen"),
            _row("llama-c4", 10, "magnitude", 0.5, dataset="c4"),
        ])
    _record(board, "s1", "qwen-base", make_result(metrics=_metrics(20, 4.0), hardware=HW_A))
    _record(board, "s1", "qwen-1", make_result(metrics=_metrics(20, 2.0), hardware=HW_A))
    _record(board, "s1", "llama-c4", make_result(metrics=_metrics(20, 2.0), hardware=HW_A))
    rows = _by_key(_board(board))
    assert rows["qwen-1"]["score"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert rows["llama-c4"]["score"] is None  # no baseline for llama × c4


def test_sweep_status_counts_every_status(board: Engine) -> None:
    with session_scope(board) as session:
        (status,) = queries.sweep_status(session, "s1")
        assert queries.sweep_status(session) == [status]
    assert status["name"] == "s1"
    assert status["counts"] == {"pending": 1, "running": 0, "done": 6, "failed": 1,
                                "timed_out": 0}
    assert status["total"] == 8
    assert status["updated_at"].tzinfo is not None


def test_sweep_status_of_a_fresh_sweep_has_all_keys(engine: Engine) -> None:
    with session_scope(engine, write=True) as session:
        register_sweep(session, "new", {}, None, [])
    with session_scope(engine) as session:
        (status,) = queries.sweep_status(session, "new")
        with pytest.raises(BadInput, match="unknown sweep 'neww'.*did you mean 'new'"):
            queries.sweep_status(session, "neww")
    assert status["counts"] == {"pending": 0, "running": 0, "done": 0, "failed": 0,
                                "timed_out": 0}
    assert status["total"] == 0


def test_list_sweeps(board: Engine) -> None:
    with session_scope(board, write=True) as session:
        register_sweep(session, "s0", {}, "s0.yaml", [_row("x", 0, "none", None, model="mamba")])
    with session_scope(board) as session:
        listed = queries.list_sweeps(session)
    assert [s["name"] for s in listed] == ["s1", "s0"]  # oldest first
    s1, s0 = listed
    assert s1["trials"] == s1["total"] == 8
    assert s1["counts"] == {"pending": 1, "running": 0, "done": 6, "failed": 1,
                              "timed_out": 0}
    assert s1["models"] == ["llama"] and s1["methods"] == ["magnitude", "none", "wanda"]
    assert s0["spec_path"] == "s0.yaml" and s0["models"] == ["mamba"]
    assert s1["updated_at"] >= s1["created_at"]


def test_empty_database_reads(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert queries.list_sweeps(session) == []
        assert queries.sweep_status(session) == []
        assert queries.leaderboard(session) == []
        with pytest.raises(BadInput, match="no sweeps yet"):
            queries.leaderboard(session, sweep="any")


@pytest.mark.parametrize(
    ("perf", "speed", "weight", "expected"),
    [(1.0, 0.0, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5), (0.1, -2.0, 0.5, 0.0), (0.9, 0.3, 1.0, 0.9),
     (None, 0.3, 0.5, None), (0.9, None, 0.5, None)],
)
def test_score_formula(
    perf: float | None, speed: float | None, weight: float, expected: float | None
) -> None:
    assert queries.score(perf, speed, weight) == pytest.approx(expected)
