"""``sweep show TRIAL_KEY_PREFIX``: one trial in full, on a database built without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DONE_KEY = "ab12" + "0" * 60
FAILED_KEY = "ab12" + "f" * 60
BASE_KEY = "c0ffee" + "1" * 58
TRACEBACK = ("Traceback (most recent call last):\n  File \"w.py\", line 3, in run\n"
             "    prune(model)\nRuntimeError: CUDA out of memory [device 0]\n")


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "--db", db_url, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )


def _row(key: str, position: int, method: str, rate: float | None) -> dict[str, Any]:
    params = {} if rate is None else {"scope": "global"}
    return {
        "trial_key": key, "position": position, "model": "tiny-llama", "method": method,
        "rate": rate, "dataset": "wikitext", "params": params, "is_baseline": rate is None,
        "config": {"trial_key": key, "method": {"name": method, "params": params,
                                                "rate": rate}},
    }


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite results DB with a baseline, one done and one failed trial."""
    from orchestrator.db.engine import dispose_engines, ensure_schema, session_scope
    from orchestrator.db.store import mark_running, record_result, register_sweep

    url = f"sqlite:///{tmp_path_factory.mktemp('show') / 'results.db'}"
    engine = ensure_schema(url, create=True)
    environment = {"hardware": {"cpu": "x86_64", "gpus": []},
                   "packages": {"torch": "2.13.0"}, "git_sha": "abc123"}
    with session_scope(engine, write=True) as session:
        register_sweep(session, "demo", {"name": "demo"}, "sweeps/demo.yaml", [
            _row(BASE_KEY, 0, "none", None), _row(DONE_KEY, 1, "magnitude", 0.3),
            _row(FAILED_KEY, 2, "head_mask", 0.5),
        ])
        mark_running(session, "demo", DONE_KEY, host="node-1")
        record_result(session, "demo", DONE_KEY, {
            "status": "done", "host": "node-1", "duration_s": 3.25,
            "metrics": {"perplexity": {"value": 12.5, "direction": "lower"},
                        "decode_ms_per_token": {"value": 4.0, "direction": "lower"}},
            "evidence": {"params_before": 5_000_000_000, "params_after": 4_000_000_000,
                         "changed_fraction": 0.2, "max_abs_dlogits": 1.5,
                         "details": {"heads_removed": {"0": [1, 2]}}},
            "environment": environment,
        })
        mark_running(session, "demo", FAILED_KEY, host="node-2")
        record_result(session, "demo", FAILED_KEY, {
            "status": "failed", "host": "node-2", "duration_s": 0.5, "metrics": {},
            "environment": environment,
            "error": {"type": "RuntimeError", "message": "CUDA out of memory [device 0]",
                      "traceback": TRACEBACK, "reason": "out_of_memory"},
        })
    dispose_engines()
    return url


def test_show_done_trial_as_table(db_url: str) -> None:
    out = cli(db_url, "show", DONE_KEY[:6])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (DONE_KEY, "demo", "tiny-llama", "magnitude", "wikitext", "0.3", "done",
                     "node-1", "perplexity", "12.5", "lower", "decode_ms_per_token",
                     "5,000,000,000", "4,000,000,000", "heads_removed", "x86_64", "torch",
                     "2.13.0", "abc123", "global", "started_at", "finished_at", "3.25"):
        assert expected in text, expected
    assert "Traceback" not in text


def test_show_failed_trial_shows_the_traceback(db_url: str) -> None:
    out = cli(db_url, "show", FAILED_KEY[:5], "--sweep", "demo")
    assert out.returncode == 0, out.stderr
    assert "RuntimeError" in out.stdout
    assert "CUDA out of memory [device 0]" in out.stdout
    assert 'File "w.py", line 3, in run' in out.stdout
    assert "prune(model)" in out.stdout
    assert "failed" in out.stdout


def test_show_json_is_the_query_dict(db_url: str) -> None:
    out = cli(db_url, "show", FAILED_KEY[:8], "--format", "json")
    assert out.returncode == 0, out.stderr
    detail = json.loads(out.stdout)
    assert detail["trial_key"] == FAILED_KEY
    assert detail["sweep"] == "demo"
    assert (detail["method"], detail["rate"], detail["status"]) == ("head_mask", 0.5, "failed")
    assert detail["attempts"] == 1
    assert detail["error"] == {"reason": "out_of_memory", "type": "RuntimeError",
                               "message": "CUDA out of memory [device 0]",
                               "traceback": TRACEBACK}
    assert detail["metrics"] == []
    assert detail["evidence"] is None
    assert detail["environment"]["git_sha"] == "abc123"
    # ISO strings with an offset, parseable back.
    from datetime import datetime
    assert datetime.fromisoformat(detail["finished_at"]).tzinfo is not None

    done = json.loads(cli(db_url, "show", DONE_KEY[:6], "--format", "json").stdout)
    assert done["error"] is None
    assert {m["name"]: (m["value"], m["direction"]) for m in done["metrics"]} == {
        "decode_ms_per_token": (4.0, "lower"), "perplexity": (12.5, "lower")}
    assert done["evidence"]["params_before"] == 5_000_000_000
    assert done["evidence"]["details"] == {"heads_removed": {"0": [1, 2]}}
    assert done["params"] == {"scope": "global"}
    assert done["config"]["trial_key"] == DONE_KEY


@pytest.mark.parametrize(("args", "needles"), [
    (["ab1"], ["too short", "at least 4"]),
    (["ab12ee"], ["no trial with key prefix 'ab12ee'"]),
    (["ab1", "--sweep", "demo"], ["too short"]),
    (["ab12", "--sweep", "nope"], ["unknown sweep 'nope'"]),
    (["ab12ee", "--sweep", "demo"], ["no trial with key prefix", "in sweep 'demo'"]),
    (["ab12", "--format", "csv"], ["table or json"]),
])
def test_bad_prefixes_are_one_line_exit_2(db_url: str, args: list[str],
                                          needles: list[str]) -> None:
    out = cli(db_url, "show", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_ambiguous_prefix_lists_candidates(db_url: str) -> None:
    out = cli(db_url, "show", "ab12")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "matches several trials" in lines[0]
    assert "longer prefix" in lines[0]
    assert f"{DONE_KEY[:12]} (magnitude rate 0.3)" in lines[0]
    assert f"{FAILED_KEY[:12]} (head_mask rate 0.5)" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_prefix_is_not_a_like_pattern(db_url: str) -> None:
    # '_' and '%' are LIKE wildcards; a prefix must match literally.
    out = cli(db_url, "show", "ab1_")
    assert out.returncode == 2
    assert "no trial with key prefix" in out.stderr
