"""What the Ray dashboard shows of a sweep: actor names, per-trial log lines and the custom
metrics, read back from a real local Ray (its GCS actor table and its Prometheus endpoint).
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator import launch, spec
from workers import telemetry

SPEC = {
    "name": "dashboard",
    "models": [{"id": "builtin:tiny-llama"}],
    # 0.95 of the layers leaves too little to evaluate: one failure to count.
    "methods": [{"name": "drop_layers", "rates": [0.25, 0.95], "params": {"from": "top"}}],
    "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 24}],
    "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32},
    "max_concurrent_trials": 2,
}


def test_labels_name_model_method_and_rate():
    trial = {"model": {"id": "builtin:tiny-llama"}, "method": {"name": "prune_ffn", "rate": 0.5}}
    assert telemetry.trial_label(trial) == "builtin:tiny-llama · prune_ffn 0.5"
    baseline = {"model": {"id": "m"}, "method": {"name": "none", "rate": None}}
    assert telemetry.trial_label(baseline) == "m · none"


def test_outside_ray_the_calls_only_log_lines():
    """In a process without Ray (a trial run by hand), no metric, no error: two lines."""
    import subprocess
    import sys

    code = (
        "from workers import telemetry\n"
        "trial = {'trial_key': 'ab' * 32, 'model': {'id': 'm'},"
        " 'method': {'name': 'x', 'rate': 0.5}}\n"
        "telemetry.trial_started(trial, 'host1', '')\n"
        "telemetry.trial_finished(trial, {'status': 'failed', 'duration_s': 1.25,"
        " 'error': {'reason': 'no_effect'}})\n"
        "assert telemetry._metrics is None and telemetry._unavailable\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "[compress-sweep] trial m · x 0.5 (abababab) started on host1",
        "[compress-sweep] trial m · x 0.5 (abababab) failed (no_effect) in 1.2 s"]


def _scrape(port: int, pattern: str, ready, timeout_s: float = 60) -> list[str]:
    """Lines of the node's Prometheus output matching ``pattern``, once ``ready(lines)``
    (the metrics agent exports every few seconds, each worker's series on its own)."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            body = b""
        lines = [ln for ln in body.decode().splitlines()
                 if not ln.startswith("#") and re.search(pattern, ln)]
        if ready(lines):
            return lines
        time.sleep(1)
    return lines


def _value(lines: list[str], *labels: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if all(lab in ln for lab in labels))


def _actor_names() -> list[tuple[str, str]]:
    """(class name, dashboard name) of every actor of this Ray session, from the GCS."""
    import ray
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    rows = [gcs_pb2.ActorTableData.FromString(raw)
            for raw in accessor.get_actor_table(None, None)]
    return [(row.class_name, row.repr_name) for row in rows]


@pytest.mark.slow
def test_a_sweep_exports_its_metrics_and_names_its_actors(ray_session, tiny_llama_dir,
                                                           tmp_path: Path):
    import ray

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url,
                         storage_path=str(tmp_path / "tune"))
    assert (outcome.done, outcome.failed) == (2, 1)

    [port] = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    sweep = 'sweep="dashboard"'
    def total(want: float, *labels: str):
        return lambda lines: _value(lines, *labels) >= want

    done = _scrape(port, r"^ray_compress_sweep_trials_done_total\{.*" + sweep, total(2))
    failed = _scrape(port, r"^ray_compress_sweep_trials_failed_total\{.*" + sweep, total(1))
    durations = _scrape(port, r"^ray_compress_sweep_trial_duration_seconds_count\{.*" + sweep,
                        total(3))
    tokens = _scrape(port, r"^ray_compress_sweep_tokens_evaluated_total\{.*" + sweep, total(1))
    running = _scrape(port, r"^ray_compress_sweep_trials_running\{.*" + sweep,
                      lambda lines: len(lines) >= 3 and _value(lines) == 0)
    assert _value(done, 'method="none"') == 1 and _value(done, 'method="drop_layers"') == 1
    assert _value(failed, 'method="drop_layers"', 'reason="error"') == 1
    assert _value(durations) == 3
    assert _value(running) == 0 and len(running) == 3  # every trial ran, none runs now
    # Tokens scored: the baseline's and the 0.25 variant's perplexity, the same text.
    from orchestrator import queries
    from orchestrator.db.engine import ensure_schema, session_scope

    with session_scope(ensure_schema(url, create=False)) as session:
        rows = queries.leaderboard(session, metric="perplexity", sweep="dashboard")
    assert _value(tokens) == sum(r["metrics"]["eval_tokens"] for r in rows) > 0

    # Tune subclasses the trainable (with_resources), so actors are told apart by name:
    # each is named after the trial it was created for (a reused actor keeps that name).
    # Each trial wrote its start and end to its actor's log (the dashboard shows it).
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    for label in ("none", "drop_layers 0.25", "drop_layers 0.95"):
        assert f"[compress-sweep] trial builtin:tiny-llama · {label} (" in text, label
    assert re.search(r"drop_layers 0\.95 \(\w{8}\) failed \(error\) in [\d.]+ s", text)

    names = [name for _, name in _actor_names() if name.startswith("dashboard: ")]
    assert 1 <= len(names) <= 2, _actor_names()  # at most 2 at once, reused
    assert all(re.fullmatch(r"dashboard: builtin:tiny-llama · (none|drop_layers 0\.25|"
                            r"drop_layers 0\.95)", n) for n in names), names
