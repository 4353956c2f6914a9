"""`sweep report`: one Markdown file per sweep whose tables and images render."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine

from orchestrator.db.engine import session_scope
from orchestrator.db.store import mark_running, record_result, register_sweep
from orchestrator.report import write_report

HW = {"cpu": "x86_64", "gpus": []}
SPEC = {"name": "rep", "score": {"quality_metric": "perplexity", "weight": 0.5},
        "methods": [{"name": "drop_layers", "rates": [0.25, 0.5]}]}
REFERENCE = """\
source:
  title: "A constructed paper"
  arxiv: "0000.00000"
entries:
  - table: "Table 1"
    model: org/tiny-llama
    method: none
    dataset: wikitext
    metric: perplexity
    value: 10.0
    tolerance: 0.5
  - table: "Table 1"
    model: org/tiny-llama
    method: drop_layers
    rate: 0.25
    dataset: wikitext
    metric: perplexity
    value: 11.0
    tolerance: "1%"
  - table: "Table 9"
    model: org/other-model
    method: none
    dataset: wikitext
    metric: perplexity
    value: 3.0
    tolerance: 0.1
"""


def _row(key: str, position: int, method: str, rate: float | None) -> dict[str, Any]:
    return {"trial_key": key, "position": position, "model": "/models/tiny-llama",
            "method": method, "rate": rate, "dataset": "wikitext", "params": {},
            "config": {"trial_key": key}, "is_baseline": method == "none"}


def _metrics(ppl: float, tpt: float) -> dict[str, Any]:
    return {"perplexity": (ppl, "lower"), "decode_ms_per_token": (tpt, "lower"),
            "decode_ms_per_token_iqr": (0.1, None)}


@pytest.fixture
def swept(engine: Engine, make_result: Callable[..., dict[str, Any]]) -> Engine:
    rows = [_row("base", 0, "none", None), _row("quarter", 1, "drop_layers", 0.25),
            _row("half", 2, "drop_layers", 0.5), _row("broken", 3, "drop_layers", 0.75),
            _row("waiting", 4, "drop_layers", 0.9)]
    results = {
        "base": make_result(metrics=_metrics(10.2, 8.0), hardware=HW),
        "quarter": make_result(metrics=_metrics(12.0, 6.0), hardware=HW),
        "half": make_result(metrics=_metrics(20.0, 4.0), hardware=HW),
        "broken": make_result(status="failed", metrics={}, evidence=False, hardware=HW,
                              error={"type": "InvalidEvaluationError", "reason":
                                     "invalid_evaluation", "message": "the variant is not "
                                     "causal | it saw later tokens\nsecond line"}),
    }
    with session_scope(engine, write=True) as session:
        register_sweep(session, "rep", SPEC, "sweeps/rep.yaml", rows)
        for key, result in results.items():
            mark_running(session, "rep", key)
            record_result(session, "rep", key, result)
    return engine


def _tables(markdown: str) -> list[list[str]]:
    """Every table of a Markdown document, each as its lines; fails on a malformed one."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            tables.append(current)
            current = []
    for table in tables:
        assert re.fullmatch(r"\|(:?---:?\|)+", table[1]), table[1]
        width = table[1].count("|")
        for line in table[:1] + table[2:]:
            assert line.endswith(" |")
            # Escaped pipes are cell text, the others separate cells.
            assert len(re.findall(r"(?<!\\)\|", line)) == width, line
    return tables


def test_report_has_every_section_and_renders(
    swept: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    references = tmp_path / "refs"
    references.mkdir()
    (references / "paper.yaml").write_text(REFERENCE)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "rep.md"
    with session_scope(swept) as session:
        report = write_report(session, "rep", out, references=[references])
    text = out.read_text()
    assert report.sections == ["Spec", "Environment", "Leaderboard", "Paper vs reproduction",
                               "Plots", "Failures", "Evidence"]
    for title in report.sections:
        assert f"\n## {title}\n" in text
    assert "sweeps/rep.yaml" in text and "quality_metric: perplexity" in text
    tables = _tables(text)
    assert len(tables) == 4  # leaderboard, compare, failures, evidence

    leaderboard = "\n".join(tables[0])
    assert "none (baseline)" in leaderboard and "failed (invalid_evaluation)" in leaderboard
    assert "waiting" not in text  # a pending trial is neither a result nor a failure

    compare = tables[1]
    assert len(compare) == 2 + 2  # the entry about another model is left out
    assert "✓" in compare[2] and "0.2" in compare[2]   # 10.2 vs 10.0 ± 0.5
    assert "✗" in compare[3]                          # 12.0 vs 11.0 ± 1 %

    failures = "\n".join(tables[2])
    assert "invalid_evaluation" in failures and "InvalidEvaluationError" in failures
    assert "causal \\| it saw later tokens" in failures and "second line" not in failures

    evidence = tables[3]
    assert len(evidence) == 2 + 3
    assert "0.8" in evidence[2] or "0.8" in evidence[3]  # 4e9 of 5e9 parameters kept

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 2 and len(images) == len(report.images)
    for link in images:
        image = out.parent / link
        assert not Path(link).is_absolute() and image.is_file(), link
        with Image.open(image) as opened:
            assert opened.width >= 600 and opened.height >= 400


def test_report_without_references_or_plots_leaves_them_out(
    swept: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no sweeps/references here
    out = tmp_path / "rep.md"
    with session_scope(swept) as session:
        report = write_report(session, "rep", out, plots=False)
    assert report.sections == ["Spec", "Environment", "Leaderboard", "Failures", "Evidence"]
    assert report.images == [] and not list(tmp_path.glob("*-plots"))


def test_cli_report_writes_the_file_and_refuses_bad_input(
    swept: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from orchestrator.cli.main import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(["--db", db_url, "report", *args])
        out, err = capsys.readouterr()
        return int(exited.value.code), out, err

    code, out, err = run("rep", "--no-plots")
    assert code == 0, err
    assert out.strip() == "reports/rep.md" and (tmp_path / "reports" / "rep.md").is_file()

    code, _, err = run("nosuch")
    assert code == 2 and "unknown sweep 'nosuch'" in err and "Traceback" not in err
    code, _, err = run("rep", "--references", "missing.yaml")
    assert code == 2 and "--references" in err
    (tmp_path / "adir").mkdir()
    code, _, err = run("rep", "--out", "adir")
    assert code == 2 and "is a directory" in err
    assert not (tmp_path / "adir" / "rep.md").exists()
