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
