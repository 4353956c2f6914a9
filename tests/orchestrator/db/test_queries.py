"""Reads for status, list and leaderboard (orchestrator/queries.py)."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
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
    assert rows["crashed"]["failure_reason"] == "error"
    # Its perplexity would be the best; it still is no result, so it never ranks.
    keys = [r["trial_key"] for r in _board(board, metric="perplexity", include_failed=True)]
    assert keys[-1] == "crashed" and keys[:-1] == [
        r["trial_key"] for r in _board(board, metric="perplexity")]
    assert "waiting" not in rows


def test_delta_against_the_baseline(board: Engine) -> None:
    rows = _by_key(_board(board, metric="perplexity"))
    half = rows["half"]
    assert (half["delta_metric"], half["baseline_value"]) == ("perplexity", PPL_BASE)
    assert half["delta"] == pytest.approx(PPL_BASE)
    assert half["delta_pct"] == pytest.approx(100.0)
    assert (rows["base"]["delta"], rows["base"]["delta_pct"]) == (0.0, 0.0)
    # The score's delta is the sweep's quality metric's.
    scored = _by_key(_board(board))
    assert scored["noacc"]["delta_metric"] == "perplexity"
    assert scored["noacc"]["delta_pct"] == pytest.approx(25.0)
    # Accuracy: higher is better, the delta still is value − baseline.
    accuracy = _by_key(_board(board, metric="accuracy"))
    assert accuracy["broken"]["delta"] == pytest.approx(0.2 - 0.7)
    assert accuracy["broken"]["delta_pct"] == pytest.approx(-100 * 0.5 / 0.7)
    # A speed measured on other hardware has no delta against this baseline; quality has.
    speed = _by_key(_board(board, metric="decode_ms_per_token"))
    assert speed["elsewhere"]["delta"] is None and speed["elsewhere"]["baseline_value"] is None
    assert speed["half"]["delta_pct"] == pytest.approx(-50.0)
    assert rows["elsewhere"]["delta"] == 0.0
    # A failed trial has none.
    failed = _by_key(_board(board, metric="perplexity", include_failed=True))["crashed"]
    assert failed["delta"] is None and failed["quality_metric"] == "perplexity"


def test_filters_keep_the_baseline_with_a_method_filter(board: Engine) -> None:
    keys = [r["trial_key"] for r in _board(board, method="magnitude")]
    assert keys == ["fast", "base", "half", "broken"]
    assert [r["trial_key"] for r in _board(board, method="wanda", include_failed=True)] == [
        "base", "noacc", "elsewhere", "crashed"]
    # Filters apply to stored metrics and to the rows lacking the metric too.
    assert [r["trial_key"] for r in _board(board, metric="accuracy", method="wanda")] == [
        "elsewhere", "base", "noacc"]
    assert _board(board, model="qwen") == []
    assert _board(board, dataset="c4") == []
    assert len(_board(board, model="llama", dataset="wikitext")) == len(_board(board))
    assert [r["trial_key"] for r in _board(board, method="none")] == ["base"]
    assert [r["trial_key"] for r in _board(board, method="magnitude", limit=2)] == [
        "fast", "base"]


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


# --------------------------------------------------------------------------- ranked in SQL
# leaderboard() ranks in the database and builds only the rows it returns. These tests hold
# it to a plain computation over everything stored: load all trials and metrics, compute
# each row, sort in Python, slice.

HARDWARE = ({"cpu": "x86_64", "gpus": ["A100"]}, {"cpu": "x86_64", "gpus": ["H100"]},
            {"cpu": "arm64", "gpus": []})
# (name, score settings): two sweeps share the default settings, two have their own.
RANDOM_SWEEPS = (
    ("grid", {"quality_metric": "perplexity", "weight": 0.5}),
    ("acc", {"quality_metric": "accuracy", "weight": 0.8}),
    ("defaults", None),
    ("speedy", {"quality_metric": "perplexity", "weight": 0.25}),
)
# Few distinct values, so equal scores and equal metric values are common.
PPL = (10.0, 12.5, 20.0, 40.0)
TPT = (4.0, 6.0, 8.0, 16.0)
ACC = (0.25, 0.5, 0.75)


def _random_value(rng: Any, choices: tuple[float, ...]) -> float | None:
    draw = rng.random()
    if draw < 0.06:
        return None  # stored as NULL
    if draw < 0.09:
        return math.nan  # stored as NULL with a note
    if draw < 0.11:
        return 0.0  # a zero baseline or quality: no ratio
    return rng.choice(choices)


def _random_metrics(rng: Any) -> dict[str, tuple[float | None, str | None]]:
    metrics: dict[str, tuple[float | None, str | None]] = {}
    # The quality metric's direction is sometimes missing: the baseline's stands in.
    ppl_direction = None if rng.random() < 0.05 else "lower"
    candidates = {
        "perplexity": (_random_value(rng, PPL), ppl_direction),
        "decode_ms_per_token": (_random_value(rng, TPT), "lower"),
        "accuracy": (_random_value(rng, ACC), None if rng.random() < 0.05 else "higher"),
        # A metric whose stored direction varies from trial to trial.
        "mixed": (rng.choice((1.0, 2.0, 3.0)), rng.choice(("higher", "lower", None))),
        "ties": (1.0, "lower"),
    }
    for name, entry in candidates.items():
        if rng.random() < 0.9:  # metrics go missing too
            metrics[name] = entry
    return metrics


def _random_database(engine: Engine, make_result: ResultFactory, seed: int) -> None:
    """Four sweeps of ~80 trials: several models, datasets and hardware, missing and
    duplicate baselines, reused positions, every status, NULL and zero values, ties."""
    import random

    rng = random.Random(seed)
    for sweep_name, settings in RANDOM_SWEEPS:
        rows: list[dict[str, Any]] = []
        outcomes: dict[str, dict[str, Any] | None] = {}
        for model in ("llama", "qwen", "mamba"):
            for dataset in ("wikitext", "c4"):
                base_hw = rng.randrange(len(HARDWARE))
                n_baselines = rng.choices((0, 1, 2), weights=(1, 8, 1))[0]
                n_trials = rng.randrange(6, 16)
                for i in range(n_baselines + n_trials):
                    is_base = i < n_baselines
                    key = f"{sweep_name}|{model}|{dataset}|{i}"
                    row = _row(key, rng.randrange(60), "none" if is_base else "magnitude",
                               None if is_base else rng.choice((0.1, 0.3, 0.5)), model,
                               dataset)
                    row["is_baseline"] = is_base
                    rows.append(row)
                    status = rng.choices(
                        ("done", "failed", "timed_out", "pending", "running"),
                        weights=(14, 2, 1, 1, 1))[0]
                    if status in ("pending", "running"):
                        outcomes[key] = {"status": status}
                        continue
                    hw = base_hw if is_base or rng.random() < 0.7 else rng.randrange(
                        len(HARDWARE))
                    result = _result_for(rng, make_result, status, HARDWARE[hw])
                    outcomes[key] = result
        spec = {"name": sweep_name} if settings is None else {"name": sweep_name,
                                                              "score": settings}
        with session_scope(engine, write=True) as session:
            register_sweep(session, sweep_name, spec, None, rows)
            for key, result in outcomes.items():
                if result is None or result["status"] == "pending":
                    continue
                mark_running(session, sweep_name, key)
                if result["status"] != "running":
                    record_result(session, sweep_name, key, result)


def _result_for(rng: Any, make_result: ResultFactory, status: str,
                hardware: dict[str, Any]) -> dict[str, Any]:
    metrics = _random_metrics(rng) if status == "done" or rng.random() < 0.5 else {}
    error = None if status == "done" else {"type": "RuntimeError", "message": "boom"}
    result = make_result(status=status, metrics=metrics, hardware=hardware, error=error,
                     evidence=status == "done")
    if rng.random() < 0.05:
        result["environment"] = None  # no hardware fingerprint: never a SpeedNorm
    return result


def _everything(session: Any) -> dict[str, Any]:
    """Every sweep, trial (with its hardware fingerprint) and metric, loaded plainly."""
    from sqlalchemy import select

    from orchestrator.db.models import Environment, Metric, Sweep, Trial

    trials = session.execute(
        select(Trial, Environment.hardware_fingerprint)
        .outerjoin(Environment, Trial.environment_id == Environment.id)
    ).all()
    stored: dict[int, dict[str, Any]] = defaultdict(dict)
    for m in session.scalars(select(Metric)):
        stored[m.trial_id][m.name] = m
    return {"sweeps": list(session.scalars(select(Sweep))), "trials": trials,
            "stored": stored}


def _reference(everything: dict[str, Any], metric: str, sweep: str | None,
               include_failed: bool, **filters: str) -> list[dict[str, Any]]:
    """The leaderboard computed the plain way from everything stored."""
    sweeps = {s.id: s for s in everything["sweeps"] if sweep is None or s.name == sweep}
    listed = sorted(((t, hw) for t, hw in everything["trials"] if t.sweep_id in sweeps),
                    key=lambda pair: (pair[0].sweep_id, pair[0].position, pair[0].id))
    trials = [t for t, _ in listed]
    hardware = {t.id: hw for t, hw in listed}
    stored = everything["stored"]
    baselines: dict[tuple[int, str, str], Any] = {}
    for t in trials:
        if t.is_baseline and t.status == "done":
            baselines.setdefault((t.sweep_id, t.model, t.dataset), t)

    def value(trial_id: int, name: str) -> float | None:
        m = stored[trial_id].get(name)
        return None if m is None else m.value

    def direction(trial_id: int, name: str) -> str | None:
        m = stored[trial_id].get(name)
        return None if m is None else m.direction

    shown = {"done", "failed", "timed_out"} if include_failed else {"done"}
    speed_metrics = queries.hardware_dependent_metrics()
    rows, kept_trials = [], []

    def kept(t: Any) -> bool:
        return (filters.get("model") in (None, t.model)
                and filters.get("dataset") in (None, t.dataset)
                and (filters.get("method") in (None, t.method) or t.is_baseline))

    for t in trials:
        if t.status not in shown:
            continue
        perf = speed = total = noise = None
        base_value = delta = delta_pct = None
        base = baselines.get((t.sweep_id, t.model, t.dataset))
        settings = sweeps[t.sweep_id].spec.get("score") or {}
        quality = settings.get("quality_metric") or "perplexity"
        compared = quality if metric in queries.COMPUTED_METRICS else metric
        if t.status == "done" and base is not None:
            weight = float(settings.get("weight", 0.5))
            same_hw = hardware[t.id] is not None and hardware[t.id] == hardware[base.id]
            if same_hw or compared not in speed_metrics:
                base_value = value(base.id, compared)
                mine = value(t.id, compared)
                if mine is not None and base_value is not None:
                    delta = mine - base_value
                    delta_pct = None if base_value == 0 else 100 * delta / abs(base_value)
            q, q_base = value(t.id, quality), value(base.id, quality)
            way = direction(t.id, quality) or direction(base.id, quality)
            if q is not None and q_base is not None:
                if way == "higher" and q_base != 0:
                    perf = q / q_base
                elif way == "lower" and q != 0:
                    perf = q_base / q
            s, s_base = value(t.id, "decode_ms_per_token"), value(base.id, "decode_ms_per_token")
            iqr = value(t.id, "decode_ms_per_token_iqr")
            if same_hw and s is not None and s_base is not None and s_base != 0:
                speed = 1.0 - s / s_base
            if same_hw and iqr is not None and s_base is not None and s_base != 0:
                noise = iqr / s_base
            if perf is not None and speed is not None:
                total = max(weight * perf + (1.0 - weight) * speed, 0.0)
        kept_trials.append(t)
        rows.append({
            "sweep": sweeps[t.sweep_id].name, "model": t.model, "method": t.method,
            "rate": t.rate, "dataset": t.dataset, "params": t.params, "position": t.position,
            "trial_key": t.trial_key, "status": t.status, "failure_reason": t.failure_reason,
            "is_baseline": t.is_baseline, "error_type": t.error_type, "score": total,
            "perf_norm": perf, "speed_norm": speed, "speed_norm_noise": noise,
            "metrics": {n: m.value for n, m in stored[t.id].items()},
            "directions": {n: m.direction for n, m in stored[t.id].items()},
            "quality_metric": quality, "delta_metric": compared, "baseline_value": base_value,
            "delta": delta, "delta_pct": delta_pct,
        })

    # Only finished trials rank; the direction is the majority of theirs.
    if metric in queries.COMPUTED_METRICS:
        higher = True
    else:
        # The direction is the sweeps', whatever the filters keep.
        votes = [r["directions"][metric] for r in rows
                 if r["status"] == "done" and r["directions"].get(metric)]
        ups, downs = votes.count("higher"), votes.count("lower")
        higher = ups > downs or (ups == downs and (not votes or votes[0] == "higher"))
    rows = [r for r, t in zip(rows, kept_trials, strict=True) if kept(t)]
    if metric in queries.COMPUTED_METRICS:
        values = [r[metric] if r["status"] == "done" else None for r in rows]
    else:
        values = [r["metrics"].get(metric) if r["status"] == "done" else None for r in rows]
    ranked = sorted((i for i, v in enumerate(values) if v is not None),
                    key=lambda i: (-values[i] if higher else values[i], i))
    unranked = [r for r, v in zip(rows, values, strict=True) if v is None]
    return ([rows[i] for i in ranked] + [r for r in unranked if r["status"] == "done"]
            + [r for r in unranked if r["status"] != "done"])


# The second run builds every row from the sweeps rather than from id lists, as a
# leaderboard of many rows does.
@pytest.mark.parametrize(("seed", "by_id_rows"), [(7, None), (2024, 8)])
def test_ranked_in_sql_equals_the_plain_computation(
    engine: Engine, make_result: ResultFactory, monkeypatch: pytest.MonkeyPatch, seed: int,
    by_id_rows: int | None,
) -> None:
    if by_id_rows is not None:
        monkeypatch.setattr(queries, "_BY_ID_ROWS", by_id_rows)
    _random_database(engine, make_result, seed)
    metrics = ("score", "perf_norm", "speed_norm", "perplexity", "accuracy", "mixed", "ties",
               "decode_ms_per_token")
    compared = 0
    with session_scope(engine) as session:
        everything = _everything(session)
        for sweep in (None, "acc"):
            for include_failed in (False, True):
                for metric in metrics:
                    expected = _reference(everything, metric, sweep, include_failed)
                    for limit in (None, 1, 6, 40, 10_000):
                        got = queries.leaderboard(session, metric=metric, sweep=sweep,
                                                  include_failed=include_failed, limit=limit)
                        assert got == expected[:limit], (metric, sweep, include_failed, limit)
                        compared += len(got)
                    for filters in ({"model": "qwen"}, {"method": "magnitude", "dataset": "c4"}):
                        expected = _reference(everything, metric, sweep, include_failed,
                                              **filters)
                        for limit in (None, 3):
                            got = queries.leaderboard(session, metric=metric, sweep=sweep,
                                                      include_failed=include_failed,
                                                      limit=limit, **filters)
                            assert got == expected[:limit], (metric, filters, limit)
    # The database really holds what the comparison is meant to cover.
    board = _reference(everything, "score", None, True)
    assert compared > 5_000
    scores = [r["score"] for r in board if r["score"] is not None]
    assert len(scores) > len(set(scores)) + 10, "equal scores"
    assert 0.0 in scores, "scores clamped at zero"
    done = [r for r in board if r["status"] == "done"]
    assert any(r["score"] is None for r in done), "finished trials without a score"
    assert any(r["perf_norm"] is not None and r["speed_norm"] is None for r in done), \
        "another hardware fingerprint"
    assert any(v is None for r in done for v in r["metrics"].values()), "NULL values"
    assert {r["status"] for r in board} == {"done", "failed", "timed_out"}
    assert len({r["sweep"] for r in board}) == len(RANDOM_SWEEPS)


def test_limit_keeps_the_first_rows_including_those_lacking_the_metric(board: Engine) -> None:
    full = _board(board)
    for limit in range(1, len(full) + 2):
        assert _board(board, limit=limit) == full[:limit]
    # Five rows have a score (broken's is 0); the sixth is the one without.
    assert [r["trial_key"] for r in _board(board, limit=6)][4:] == ["broken", "elsewhere"]
    accuracy = _board(board, metric="accuracy", include_failed=True)
    assert _board(board, metric="accuracy", include_failed=True, limit=6) == accuracy[:6]
    with pytest.raises(ValueError, match="limit"):
        _board(board, limit=0)
    with pytest.raises(BadInput, match="unknown metric"):
        _board(board, metric="perplexty", limit=3)


def _directed(engine: Engine, make_result: ResultFactory,
              directions: list[tuple[str, str | None]]) -> None:
    """Sweep ``d``: one trial per (status, direction of metric ``m``), values 1, 2, 3, …"""
    rows = [_row(f"t{i}", i, "magnitude", 0.1 * i) for i in range(len(directions))]
    with session_scope(engine, write=True) as session:
        register_sweep(session, "d", {"name": "d"}, None, rows)
    for i, (status, direction) in enumerate(directions):
        _record(engine, "d", f"t{i}", make_result(
            status=status, metrics={"m": (float(i + 1), direction)}, evidence=False,
            error=None if status == "done" else {"type": "E", "message": "x"}))


def _order(engine: Engine, **kwargs: Any) -> list[str]:
    return [r["trial_key"] for r in _board(engine, metric="m", sweep="d", **kwargs)]


def test_stored_direction_is_the_majority_of_the_listed_rows(
    engine: Engine, make_result: ResultFactory
) -> None:
    _directed(engine, make_result, [("done", "lower"), ("done", "higher"), ("done", None),
                                    ("failed", "higher"), ("failed", "higher")])
    # Finished: one lower, one higher (a tie): the first finished row's direction wins.
    assert _order(engine) == ["t0", "t1", "t2"]
    assert _order(engine, limit=2) == ["t0", "t1"]
    # Failed rows neither rank nor vote: they follow, in grid order.
    assert _order(engine, include_failed=True) == ["t0", "t1", "t2", "t3", "t4"]
    assert _order(engine, include_failed=True, limit=1) == ["t0"]


def test_a_direction_stored_only_on_failed_rows_does_not_count(
    engine: Engine, make_result: ResultFactory
) -> None:
    _directed(engine, make_result, [("done", None), ("done", None), ("failed", "lower")])
    assert _order(engine) == ["t1", "t0"]  # no direction finished: higher is better
    assert _order(engine, include_failed=True) == ["t1", "t0", "t2"]


def test_cli_top_passes_the_limit_to_the_query(
    board: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from orchestrator.cli.render import Format
    from orchestrator.cli.results import print_leaderboard

    calls: list[dict[str, Any]] = []
    real = queries.leaderboard

    def spy(session: Any, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append(kwargs)
        return real(session, **kwargs)

    monkeypatch.setattr(queries, "leaderboard", spy)
    print_leaderboard(db_url, metric="score", sweep=None, fmt=Format.json, top=2,
                      include_failed=False)
    assert calls[-1]["limit"] == 2
    shown = json.loads(capsys.readouterr().out)
    assert [r["trial_key"] for r in shown] == ["fast", "base"]


def _cli(db_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from orchestrator.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--db", db_url, "leaderboard", *args])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    return out


def _markdown_table(text: str) -> list[list[str]]:
    """The cells of a GitHub Markdown table; fails unless it is a well-formed one."""
    lines = text.strip().splitlines()
    assert len(lines) >= 3
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert re.fullmatch(r"\|(:?---:?\|)+", lines[1]), lines[1]
    width = lines[1].count("|") - 1
    assert all(len(row) == width for row in cells[:1] + cells[2:]), "ragged table"
    return [cells[0]] + cells[2:]


def test_leaderboard_formats_paste_as_tables(
    board: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _markdown_table(_cli(db_url, capsys, "--format", "markdown"))
    header, rows = table[0], table[1:]
    for heading in ("rank", "method", "score", "perf_norm", "speed_norm", "perplexity",
                    "Δ perplexity", "Δ %", "params", "size MB"):
        assert heading in header, heading
    by_method = {r[header.index("trial_key")]: r for r in rows}
    assert by_method["base"][header.index("method")] == "none (baseline)"
    assert by_method["half"][header.index("Δ %")] == "100"
    assert [r[header.index("rank")] for r in rows] == ["1", "2", "3", "4", "5", "-"]

    # --all: failed trials listed last, unranked, with their status and reason.
    table = _markdown_table(_cli(db_url, capsys, "--all", "--metric", "perplexity",
                                 "--format", "markdown"))
    header, rows = table[0], table[1:]
    assert rows[-1][header.index("trial_key")] == "crashed"
    assert rows[-1][header.index("rank")] == "-"
    assert rows[-1][header.index("status")] == "failed (error)"
    assert header[header.index("perplexity") + 1] == "Δ perplexity"

    latex = _cli(db_url, capsys, "--method", "wanda", "--format", "latex")
    body = latex[latex.index("\\midrule"):latex.index("\\bottomrule")].splitlines()[1:]
    assert latex.count("\\begin{tabular}") == 1 and "\\end{tabular}" in latex
    assert len(body) == 3 and all(line.endswith("\\\\") for line in body)
    assert "none (baseline)" in latex and "magnitude" not in latex
    columns = latex.split("\\begin{tabular}{", 1)[1].split("}", 1)[0]
    assert all(line.count(" & ") == len(columns) - 1 for line in body)
    assert "\\_" in latex and "$\\Delta$ \\%" in latex

    rows = list(csv.DictReader(io.StringIO(_cli(db_url, capsys, "--format", "csv",
                                                "--model", "llama"))))
    assert rows[0]["sweep"] == "s1" and rows[0]["quality_metric"] == "perplexity"
    assert float(rows[0]["score"]) == pytest.approx(0.6)
