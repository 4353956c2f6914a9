"""Fixtures of the results-database tests.

``db_url`` is parametrised by backend so every test runs once per backend. SQLite always;
PostgreSQL on the server named by ``$SWEEP_TEST_POSTGRES_URL`` or, without it, on a
throwaway PostgreSQL 15 server started once per test session (``postgres_admin_url``).
Each test gets a fresh database there. Without the binaries the PostgreSQL parameter is
skipped with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres_server import (  # tests/ is on sys.path (rootdir conftest)
    backends,
    fresh_database_url,
)
from sqlalchemy import Engine

from orchestrator.db.engine import ensure_schema

BACKENDS = backends()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty results database on each backend."""
    yield from fresh_database_url(request, tmp_path)


@pytest.fixture
def backend(db_url: str) -> str:
    """``sqlite`` or ``postgresql``."""
    return db_url.split(":", 1)[0].split("+", 1)[0]


@pytest.fixture
def sqlite_only(backend: str) -> None:
    """Skip on other backends (for tests of SQLite-specific behaviour)."""
    if backend != "sqlite":
        pytest.skip("SQLite-specific")


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on a database migrated to the newest schema."""
    return ensure_schema(db_url, create=True)


def _trial_rows(
    n: int,
    model: str = "tiny-llama",
    dataset: str = "wikitext",
    method: str = "magnitude",
    baseline: bool = True,
    prefix: str = "",
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if baseline:
        rows.append(_row(f"{prefix}{model}|{dataset}|base", 0, model, "none", None, dataset, True))
    for i in range(n):
        rate = round(0.1 * (i + 1), 3)
        key = f"{prefix}{model}|{dataset}|{method}|{i}"
        rows.append(_row(key, len(rows), model, method, rate, dataset, False))
    return rows


def _row(
    key: str, position: int, model: str, method: str, rate: float | None, dataset: str,
    is_baseline: bool,
) -> dict[str, Any]:
    params = {} if is_baseline else {"scope": "global"}
    return {
        "trial_key": key,
        "position": position,
        "model": model,
        "method": method,
        "rate": rate,
        "dataset": dataset,
        "params": params,
        "config": {"trial_key": key, "method": {"name": method, "params": params, "rate": rate}},
        "is_baseline": is_baseline,
    }


@pytest.fixture
def trial_rows() -> Callable[..., list[dict[str, Any]]]:
    """Factory of trial dicts as ``spec.TrialSpec.row()`` produces them (baseline first)."""
    return _trial_rows


def _result(
    status: str = "done",
    metrics: dict[str, tuple[float | None, str | None]] | None = None,
    hardware: dict[str, Any] | None = None,
    packages: dict[str, Any] | None = None,
    evidence: bool = True,
    error: dict[str, str] | None = None,
    host: str = "node-1",
) -> dict[str, Any]:
    metrics = {"perplexity": (12.5, "lower")} if metrics is None else metrics
    result: dict[str, Any] = {
        "status": status,
        "metrics": {k: {"value": v, "direction": d} for k, (v, d) in metrics.items()},
        "environment": {
            "hardware": hardware or {"cpu": "x86_64", "gpus": []},
            "packages": packages or {"torch": "2.13.0"},
            "git_sha": "abc123",
        },
        "host": host,
        "duration_s": 3.25,
    }
    if evidence:
        result["evidence"] = {
            "params_before": 5_000_000_000,
            "params_after": 4_000_000_000,
            "changed_fraction": 0.2,
            "max_abs_dlogits": 1.5,
            "details": {"heads_removed": {"0": [1, 2]}},
        }
    if error is not None:
        result["error"] = error
    return result


@pytest.fixture
def make_result() -> Callable[..., dict[str, Any]]:
    """Factory of worker result dicts (metrics given as {name: (value, direction)})."""
    return _result
