"""Two `sweep launch` of different specs into one database at the same time (both backends)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.models import Metric, Sweep, Trial

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def spec_text(name: str, rates: list[float]) -> str:
    return yaml.safe_dump({
        "name": name, "models": [{"id": "builtin:tiny-llama"}],
        "methods": [{"name": "drop_layers", "rates": rates}],
        "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 20}],
        "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32},
        "max_concurrent_trials": 1,
    })


def test_two_launches_at_once_lose_nothing(db_url: str, tmp_path: Path, tiny_llama_dir) -> None:
    specs = {"alpha": [0.25, 0.5], "beta": [0.125, 0.375, 0.625]}
    procs = []
    for name, rates in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(spec_text(name, rates))
        ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's sockets: a short path
        env = dict(os.environ, COLUMNS="200", RAY_ADDRESS="", RAY_TMPDIR=ray_tmp)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.main", "--db", db_url, "launch",
             str(path), "--no-dashboard"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "locked" not in out + err and "Traceback" not in err
    engine = ensure_schema(db_url, create=False)
    with session_scope(engine) as session:
        for name, rates in specs.items():
            trials = session.scalars(select(Trial).join(Sweep).where(Sweep.name == name)).all()
            assert len(trials) == len(rates) + 1
            assert {t.status for t in trials} == {"done"}
            assert {t.attempts for t in trials} == {1}
            metrics = session.scalar(select(func.count()).select_from(Metric)
                                     .join(Trial).join(Sweep).where(Sweep.name == name,
                                                                    Metric.name == "perplexity"))
            assert metrics == len(rates) + 1
