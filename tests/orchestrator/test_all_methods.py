"""Every method in one sweep on builtin:tiny-llama, end to end through Ray Tune: every trial
done, every variant with evidence that it differs from the base, and the structural
methods' variants smaller. (Their speed against the baseline is measured in
tests/bench/bench_methods.py: no timing is asserted in tests.)"""

from __future__ import annotations

import json

import pytest
import yaml
from sqlalchemy import select

from orchestrator import launch, spec
from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.models import Sweep, Trial
from workers.methods import methods

pytestmark = pytest.mark.slow

CALIBRATION = {"samples": 2, "length": 32}
STRUCTURAL = ("drop_layers", "prune_heads", "prune_ffn", "reduce_hidden")


def all_methods_spec(tmp_path) -> dict:
    from workers.data.builtin import pydoc_documents

    docs = pydoc_documents("train")
    records = [{"context": docs[2 * i], "question": docs[2 * i + 1][:120],
                "choices": ["a", "b"], "answer": 0} for i in range(4)]
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = {"calibration_samples": CALIBRATION["samples"],
            "calibration_length": CALIBRATION["length"]}
    return {
        "name": "all-methods", "models": [{"id": "builtin:tiny-llama"}],
        "methods": [
            {"name": "drop_layers", "rates": [0.25]},
            {"name": "drop_layers", "rates": [0.25], "params": dict(text, **{
                "from": "block_influence"})},
            {"name": "head_mask", "rates": [0.25], "params": text},
            {"name": "s4_heads", "rates": [0.25], "params": {
                "calibration": {"name": str(calibration), "format": "multiple_choice",
                                "fields": {"context": "context"}},
                "n_calibration": 2}},
            {"name": "prune_heads", "rates": [0.25], "params": text},
            {"name": "prune_ffn", "rates": [0.25], "params": text},
            {"name": "reduce_hidden", "rates": [0.25], "params": text},
            {"name": "cast", "params": {"dtype": "bfloat16"}},
            {"name": "quantize", "params": {"scheme": "int8_dynamic"}},
        ],
        "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 20}],
        "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 64, "stride": 32,
                       "probe_length": 16,
                       "speed": {"warmup": 0, "repeats": 1, "prompt_length": 8,
                                 "new_tokens": 2, "prompts": 1}},
        "max_concurrent_trials": 2,
    }


def test_every_method_in_one_sweep(tmp_path, ray_session, tiny_llama_dir):
    data = all_methods_spec(tmp_path)
    listed = {m["name"] for m in data["methods"]}
    # Every method that applies to a Llama model is in the sweep (mamba_scan_order is
    # Mamba-only and has its own twin).
    # (Other tests register methods named test_*; they are not the project's.)
    project = {name for name in methods() if not name.startswith("test_")}
    assert listed | {"mamba_scan_order"} == project - {"none"}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    url = f"sqlite:///{tmp_path / 'all.db'}"
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url)
    assert outcome.ran == outcome.total == 1 + len(data["methods"])
    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        trials = session.scalars(select(Trial).join(Sweep).where(
            Sweep.name == "all-methods")).all()
        rows = {(t.method, (t.params or {}).get("from")): t for t in trials}
        failed = {k: (t.failure_reason, t.error_message) for k, t in rows.items()
                  if t.status != "done"}
        assert not failed, failed
        base = rows[("none", None)]
        base_params = base.evidence.params_after
        for (method, variant), trial in rows.items():
            evidence = trial.evidence
            assert evidence is not None, method
            metrics = {m.name: m.value for m in trial.metrics}
            assert metrics["perplexity"] > 1 and metrics["decode_ms_per_token"] > 0
            if method == "none":
                continue
            assert evidence.max_abs_dlogits > 0, method  # the variant differs from the base
            assert evidence.details["method"], method  # what the method did, recorded
            if method in STRUCTURAL:
                assert metrics["params"] < base_params, (method, variant)
                assert evidence.params_after < evidence.params_before
        sizes = {m: rows[(m, None)].evidence.details["bytes_after"] for m in ("cast", "none")}
        assert sizes["cast"] < 0.6 * sizes["none"]  # bfloat16: half the bytes
