"""The demo spec meets the acceptance the README promises (real model, real Ray, SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import launch, queries, spec
from orchestrator.db.engine import ensure_schema, session_scope

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml"


def test_demo_leaderboard(tmp_path, ray_session, tiny_llama_dir):
    url = f"sqlite:///{tmp_path / 'sweeps.db'}"
    loaded = spec.load(DEMO)
    outcome = launch.run(launch.plan(loaded, str(DEMO), url), url)
    assert outcome.failed == 0
    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        rows = queries.leaderboard(session, metric="score", sweep="demo")
    assert len(rows) >= 7
    base = next(r for r in rows if r["is_baseline"])
    for method in ("drop_layers", "head_mask"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rate"])
        assert len(mine) >= 3
        ppl = [r["metrics"]["perplexity"] for r in mine]
        assert ppl == sorted(ppl), f"{method}: perplexity decreased as the rate grew: {ppl}"
        assert ppl[-1] > 1.05 * base["metrics"]["perplexity"]
        if method == "drop_layers":
            assert all(r["metrics"]["params"] < base["metrics"]["params"] for r in mine)

    # Issue 6's acceptance on the demo database: a Markdown leaderboard that pastes into a
    # README, and a report whose tables and images render.
    from orchestrator.cli.render import Format
    from orchestrator.cli.results import leaderboard_table
    from orchestrator.report import write_report

    flat, columns, headers = leaderboard_table(rows, "score", fmt=Format.markdown)
    from orchestrator.cli.render import render

    table = render(flat, columns, Format.markdown, headers=headers).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == len(columns) + 1 for line in table)
    report_path = tmp_path / "report" / "demo.md"
    with session_scope(engine) as session:
        report = write_report(session, "demo", report_path)
    text = report_path.read_text()
    assert "## Leaderboard" in text and "## Plots" in text and "## Evidence" in text
    assert len(report.images) >= 2
    for image in report.images:
        assert image.stat().st_size > 10_000
        assert f"]({image.relative_to(report_path.parent).as_posix()})" in text
