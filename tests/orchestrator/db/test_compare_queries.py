"""`sweep compare` on real results (SQLite and PostgreSQL): matching, judging, the CLI."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from orchestrator.compare import COMPARE_COLUMNS, compare, compare_table_markdown
from orchestrator.db.engine import session_scope
from orchestrator.db.store import mark_running, record_result, register_sweep
from orchestrator.errors import BadInput
from orchestrator.references import parse_references

HW = {"cpu": "x86_64", "gpus": ["A100"]}
OTHER_HW = {"cpu": "x86_64", "gpus": ["H100"]}
PCA = {"basis": "pca", "multiple_of": 8, "calibration_samples": 16}
SPEC = {"name": "x", "score": {"quality_metric": "perplexity", "weight": 0.5}}

# Entry index -> what it exercises (see the fixture for the trials).
REFERENCES = """\
source:
  title: "A constructed paper"
  short: Constructed
  arxiv: "2401.15024"
  venue: ICLR 2024
entries:
  - table: Table 1                          # 0: baseline, newest of two runs, absolute ✓
    model: meta-llama/Llama-2-7b-hf
    method: none
    dataset: wikitext
    metric: perplexity
    value: 5.12
    tolerance: 0.05
  - table: Table 1                          # 1: params pick pca, not channels; relative ✓
    model: meta-llama/Llama-2-7b-hf
    method: {name: reduce_hidden, params: {basis: pca}}
    rate: 0.25
    dataset: wikitext
    metric: perplexity
    value: 7.24
    tolerance: 5%
  - table: Table 1                          # 2: relative ✗
    model: meta-llama/Llama-2-7b-hf
    method: {name: reduce_hidden, params: {basis: channels}}
    rate: 0.25
    dataset: wikitext
    metric: perplexity
    value: 7.24
    tolerance: 5%
  - table: Table 1                          # 3: only a failed trial: not run
    model: meta-llama/Llama-2-7b-hf
    method: {name: reduce_hidden, params: {basis: pca}}
    rate: 0.3
    dataset: wikitext
    metric: perplexity
    value: 8.12
    tolerance: 5%
  - table: Table 2                          # 4: computed score, ✓
    model: meta-llama/Llama-2-7b-hf
    method: {name: drop_layers, params: {from: top}}
    rate: 0.0667
    dataset: wikitext
    metric: score
    value: 0.53
    tolerance: 0.01
  - table: Table 2                          # 5: computed perf_norm, absolute ✗
    model: meta-llama/Llama-2-7b-hf
    method: {name: drop_layers, params: {from: top}}
    rate: 0.0667
    dataset: wikitext
    metric: perf_norm
    value: 0.70
    tolerance: 0.05
  - table: Table 3                          # 6: a method we do not implement: not run
    model: meta-llama/Llama-2-7b-hf
    method: wanda
    rate: 0.5
    dataset: wikitext
    metric: perplexity
    value: 6.42
    tolerance: 2%
  - table: Table 3                          # 7: matched, metric not stored: no value
    model: meta-llama/Llama-2-7b-hf
    method: none
    dataset: wikitext
    metric: acc
    value: 0.5
    tolerance: 0.01
  - table: Table 3                          # 8: another model: not run
    model: meta-llama/Llama-2-13b-hf
    method: none
    dataset: wikitext
    metric: perplexity
    value: 4.57
    tolerance: 0.05
  - table: Table 3                          # 9: speed across hardware: no value
    model: meta-llama/Llama-2-7b-hf
    method: {name: drop_layers, params: {from: top}}
    rate: 0.1333
    dataset: wikitext
    metric: speed_norm
    value: 0.3
    tolerance: 0.05
    notes: measured elsewhere
"""


def _row(key: str, position: int, method: str, rate: float | None,
         params: dict[str, Any] | None = None,
         model: str = "/models/Llama-2-7b-hf") -> dict[str, Any]:
    return {"trial_key": key, "position": position, "model": model, "method": method,
            "rate": rate, "dataset": "wikitext", "params": params or {},
            "config": {"trial_key": key}, "is_baseline": method == "none"}


def _metrics(ppl: float, tpt: float) -> dict[str, Any]:
    return {"perplexity": (ppl, "lower"), "decode_ms_per_token": (tpt, "lower")}


@pytest.fixture
def results(engine: Engine, make_result: Callable[..., dict[str, Any]]) -> Engine:
    """Sweep ``old`` (a local copy of Llama-2-7b) then sweep ``new`` (a re-run baseline)."""
    old_rows = [
        _row("base", 0, "none", None),
        _row("pca25", 1, "reduce_hidden", 0.25, PCA),
        _row("chan25", 2, "reduce_hidden", 0.25, {**PCA, "basis": "channels"}),
        _row("pca30", 3, "reduce_hidden", 0.3, PCA),
        _row("drop2", 4, "drop_layers", 0.0667, {"from": "top"}),
        _row("drop4", 5, "drop_layers", 0.1333, {"from": "top"}),
        _row("pending", 6, "drop_layers", 0.2, {"from": "top"}),
    ]
    results = {
        "base": make_result(metrics=_metrics(5.20, 8.0), hardware=HW),
        "pca25": make_result(metrics=_metrics(7.0, 7.0), hardware=HW),
        "chan25": make_result(metrics=_metrics(9.0, 7.0), hardware=HW),
        "pca30": make_result(status="failed", metrics=_metrics(8.1, 6.0), evidence=False,
                             hardware=HW, error={"type": "RuntimeError", "message": "OOM"}),
        # PerfNorm 5.2/6.5 = 0.8, SpeedNorm 1 − 6/8 = 0.25, score 0.525
        "drop2": make_result(metrics=_metrics(6.5, 6.0), hardware=HW),
        "drop4": make_result(metrics=_metrics(7.5, 5.0), hardware=OTHER_HW),
    }
    with session_scope(engine, write=True) as session:
        register_sweep(session, "old", SPEC, None, old_rows)
        for key, result in results.items():
            mark_running(session, "old", key)
            record_result(session, "old", key, result)
    with session_scope(engine, write=True) as session:
        register_sweep(session, "new", SPEC, None,
                       [_row("base", 0, "none", None, model="meta-llama/Llama-2-7b-hf")])
        mark_running(session, "new", "base")
        record_result(session, "new", "base",
                      make_result(metrics=_metrics(5.10, 8.0), hardware=HW))
    return engine


def _compare(engine: Engine, sweep: str | None = None) -> list[dict[str, Any]]:
    entries = parse_references(REFERENCES, "refs.yaml")
    with session_scope(engine) as session:
        return compare(session, entries, sweep=sweep)


def test_rows_match_judge_and_count(results: Engine) -> None:
    rows = _compare(results)
    assert [r["status"] for r in rows] == [
        "✓", "✓", "✗", "not run", "✓", "✗", "not run", "no value", "not run", "no value"]
    base, pca, channels, failed, score, perf, wanda, acc, other, speed = rows

    # The newest of two matching baselines (sweep new, 5.10), not the local copy's 5.20.
    assert (base["sweep"], base["trial_key"], base["n_matched"]) == ("new", "base", 2)
    assert base["trial_model"] == "meta-llama/Llama-2-7b-hf"
    assert base["ours"] == pytest.approx(5.10) and base["delta"] == pytest.approx(-0.02)
    assert base["delta_pct"] == pytest.approx(-0.02 / 5.12 * 100) and base["within"] is True

    # A local path matches the hub id; params pick the basis; 7.0 vs 7.24 ± 5 %.
    assert (pca["trial_key"], pca["trial_model"], pca["n_matched"]) == (
        "pca25", "/models/Llama-2-7b-hf", 1)
    assert pca["ours"] == 7.0 and pca["delta"] == pytest.approx(-0.24)
    assert pca["tolerance"] == "5%" and pca["tolerance_abs"] == pytest.approx(0.362)
    assert pca["method"] == "reduce_hidden (basis=pca)" and pca["method_name"] == "reduce_hidden"
    assert (channels["trial_key"], channels["ours"], channels["within"]) == ("chan25", 9.0, False)

    # The failed trial never matches, even though it stored a perplexity.
    assert failed["ours"] is None and failed["trial_key"] is None
    assert failed["n_matched"] == 0 and failed["within"] is None and failed["delta"] is None

    # Computed metrics come from the leaderboard's formula.
    assert score["ours"] == pytest.approx(0.525) and score["within"] is True
    assert perf["ours"] == pytest.approx(0.8) and perf["within"] is False
    assert perf["delta"] == pytest.approx(0.1) and perf["tolerance"] == "0.05"

    assert wanda["known_method"] is False and wanda["n_matched"] == 0
    assert acc["trial_key"] == "base" and acc["ours"] is None and acc["n_matched"] == 2
    assert other["n_matched"] == 0
    # Measured on other hardware than its baseline: SpeedNorm cannot be computed.
    assert speed["trial_key"] == "drop4" and speed["ours"] is None
    assert speed["notes"] == "measured elsewhere"

    assert base["source"] == "Constructed (ICLR 2024, arXiv 2401.15024)"
    assert (base["table"], base["file"], base["entry"]) == ("Table 1", "refs.yaml", 0)
    assert all(set(COMPARE_COLUMNS) <= set(row) for row in rows)


def test_one_sweep_only(results: Engine) -> None:
    rows = _compare(results, sweep="old")
    base = rows[0]
    assert (base["sweep"], base["ours"], base["n_matched"]) == ("old", 5.20, 1)
    assert base["status"] == "✗"  # 0.08 off, tolerance 0.05
    assert [r["status"] for r in _compare(results, sweep="new")][:2] == ["✓", "not run"]
    with pytest.raises(BadInput, match="unknown sweep 'nope'"):
        _compare(results, sweep="nope")


def test_no_references_and_empty_database(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert compare(session, []) == []
    rows = _compare(engine)
    assert {r["status"] for r in rows} == {"not run"}


def test_markdown_table_for_the_report(results: Engine) -> None:
    text = compare_table_markdown(_compare(results))
    lines = text.splitlines()
    assert lines[0].startswith("| source | table | model | method |")
    assert "| Δ | Δ % |" in lines[0]
    assert len(lines) == 2 + 10 + 2
    assert lines[-1] == "3 within tolerance, 2 outside, 3 not run, 2 without a value"
    assert "| ✓ |" in lines[2] and "-0.02" in lines[2]


# --------------------------------------------------------------------------- the CLI


def _cli(db_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from orchestrator.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--db", db_url, "compare", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code), out, err


@pytest.fixture
def reference_file(tmp_path: Path) -> Path:
    path = tmp_path / "refs.yaml"
    path.write_text(REFERENCES)
    return path


def test_cli_table_is_a_report_with_a_summary(
        results: Engine, db_url: str, reference_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(db_url, capsys, "--references", str(reference_file))
    assert code == 0, err  # ✗ rows do not fail the command
    assert "Constructed (ICLR 2024, arXiv 2401.15024)" in out
    assert "✓" in out and "✗" in out and "not run" in out
    assert out.strip().splitlines()[-2:] == [
        "3 within tolerance, 2 outside, 3 not run, 2 without a value",
        "not methods of this project (never run here): wanda"]
    code, out, _ = _cli(db_url, capsys, "--references", str(reference_file), "--only-run")
    assert code == 0 and out.count("not run") == 1  # in the summary only
    assert out.strip().splitlines()[-1] == ("3 within tolerance, 2 outside, 0 not run, "
                                            "2 without a value")


def test_cli_fail_outside_exits_1(results: Engine, db_url: str, reference_file: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(db_url, capsys, "--references", str(reference_file), "--fail-outside")
    assert code == 1 and "2 matched entries are outside tolerance" in err
    # Only entry 0 of sweep new is matched, and it is within: nothing outside.
    code, _, err = _cli(db_url, capsys, "--references", str(reference_file), "--sweep", "new",
                        "--fail-outside", "--format", "json")
    assert code == 0, err


def test_cli_machine_formats(results: Engine, db_url: str, reference_file: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(db_url, capsys, "--references", str(reference_file), "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 10
    assert rows[0]["status"] == "✓" and rows[0]["trial_key"] == "base" and rows[0]["paper"] == 5.12

    code, out, _ = _cli(db_url, capsys, "--references", str(reference_file), "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == 10
    assert table[1]["ours"] == "7.0" and table[1]["within"] == "True"
    assert table[1]["trial_key"] == "pca25" and table[3]["ours"] == ""

    code, out, _ = _cli(db_url, capsys, "--references", str(reference_file), "--format",
                        "markdown", "--sweep", "old")
    assert code == 0
    assert out.startswith("### Constructed (ICLR 2024, arXiv 2401.15024)\n\n| table |")
    assert out.strip().endswith("not run, 2 without a value\n"
                                "not methods of this project (never run here): wanda")

    code, out, _ = _cli(db_url, capsys, "--references", str(reference_file), "--format", "latex")
    assert code == 0 and "\\begin{tabular}" in out and "$\\checkmark$" in out


def test_cli_unknown_sweep_and_bad_reference(results: Engine, db_url: str, tmp_path: Path,
                                             reference_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(db_url, capsys, "--references", str(reference_file), "--sweep", "nope")
    assert code == 2 and "unknown sweep 'nope'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    text = REFERENCES.replace("    tolerance: 0.05\n    notes", "    notes")
    bad.write_text(text)
    # A missing field is reported at its entry's first line.
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.endswith("# 9: speed "
                                                                           "across hardware: "
                                                                           "no value"))
    code, out, err = _cli(db_url, capsys, "--references", str(bad))
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {bad}: line {line}: entries[9].tolerance: required field is "
                           "missing: how far ours may be from the paper, absolute (0.05) or "
                           "relative (\"2%\")")
