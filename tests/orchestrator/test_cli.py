"""CLI contracts that need no Ray: validate, methods, errors as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=dict(os.environ, COLUMNS="200"))


def test_validate_reports_three_mistakes_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nmodels:\n  - id: builtin:tiny-llama\nmethods:\n"
                   "  - name: drop_layer\n    rates: [0.5]\n  - name: head_mask\n"
                   "    rates: [1.5]\ndatasets:\n  - name: builtin:pydoc\n    limt: 3\n")
    out = cli("validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, out.stderr
    assert "line 5: methods[0].name" in lines[0]
    assert "line 8: methods[1].rates[0]" in lines[1]
    assert "line 11: datasets[0].limt" in lines[2]
    assert "Traceback" not in out.stderr + out.stdout


def test_validate_demo_ok():
    out = cli("validate", "sweeps/demo.yaml")
    assert out.returncode == 0, out.stderr
    assert "7 trials" in out.stdout


def test_launch_of_bad_spec_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [{id: builtin:tiny-llama}]\ndatasets: [{name: nope}]\n")
    out = cli("--db", f"sqlite:///{tmp_path / 'r.db'}", "launch", str(bad))
    assert out.returncode == 2 and "datasets[0].name" in out.stderr
    assert not (tmp_path / "r.db").exists()


def test_gpus_this_machine_lacks_are_refused_before_anything_is_written(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "gpu.yaml"
    spec.write_text("name: x\nmodels: [{id: builtin:tiny-llama}]\n"
                    "datasets: [{name: builtin:pydoc}]\nresources: {gpus_per_trial: 1}\n")
    out = cli("--db", f"sqlite:///{tmp_path / 'r.db'}", "launch", str(spec))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: resources.gpus_per_trial is 1 but this machine has 0 ")
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "r.db").exists()


def test_methods_json():
    rows = json.loads(cli("methods", "--format", "json").stdout)
    names = {r["name"] for r in rows}
    # The eight methods of the research workflows, the earlier head_mask, the baseline.
    assert names >= {"s4_heads", "prune_heads", "drop_layers", "prune_ffn", "reduce_hidden",
                     "cast", "quantize", "mamba_scan_order", "head_mask"}
    for row in rows:
        assert set(row) >= {"name", "description", "params"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["cast"]["rate"] is None and by_name["prune_heads"]["rate"]
    assert by_name["head_mask"]["requires"] == ["attention_heads"]
    assert by_name["mamba_scan_order"]["requires"] == ["state_space"]
    drop = next(r for r in rows if r["name"] == "drop_layers")
    assert drop["params"]["from"]["choices"] == ["top", "bottom", "block_influence"]


def test_read_commands_on_missing_database(tmp_path):
    out = cli("--db", f"sqlite:///{tmp_path / 'none.db'}", "status")
    assert out.returncode == 2
    assert "sweep launch" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "none.db").exists()


def test_usage_error_is_exit_2_without_traceback():
    out = cli("validate")
    assert out.returncode == 2
    assert "SPEC" in out.stderr and "Traceback" not in out.stderr


def test_trust_remote_code_is_opt_in_and_warned(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nmodels: [{id: builtin:tiny-llama, trust_remote_code: true}]\n"
                    "datasets: [{name: builtin:pydoc}]\n")
    out = cli("--db", f"sqlite:///{tmp_path / 'r.db'}", "launch", str(spec), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "trust_remote_code: true" in out.stderr and "warning" in out.stderr
    spec.write_text("name: x\nmodels: [{id: builtin:tiny-llama}]\n"
                    "datasets: [{name: builtin:pydoc}]\n")
    quiet = cli("--db", f"sqlite:///{tmp_path / 'r.db'}", "launch", str(spec), "--dry-run")
    assert "warning" not in quiet.stderr


def test_catalogs_json_list_what_the_registries_hold():
    from workers.data import formats
    from workers.evaluators import evaluators
    from workers.models import model_families

    rows = {r["name"]: r for r in json.loads(cli("evaluators", "--format", "json").stdout)}
    assert set(rows) == set(evaluators())
    assert rows["multiple_choice"]["kinds"] == ["multiple_choice"]
    assert rows["multiple_choice"]["metrics"]["acc_norm"] == "higher"
    assert rows["perplexity"]["settings"] == {"max_length": 128, "stride": None, "batch_size": 8}
    assert rows["generation"]["settings"]["generation.max_new_tokens"] == 16

    payload = json.loads(cli("datasets", "--format", "json").stdout)
    assert {r["format"] for r in payload["formats"]} == set(formats())
    assert {r["format"]: r["kind"] for r in payload["formats"]}["openbookqa"] == "multiple_choice"
    assert payload["builtin"] == {"builtin:pydoc": ["train", "validation", "test"]}

    payload = json.loads(cli("models", "--format", "json").stdout)
    families = {r["family"]: r for r in payload["families"]}
    assert set(families) == set(model_families())
    assert families["mamba"]["attention_heads"] is False
    assert families["llava"]["vision_language"] is True
    assert families["exaone4"]["post_norm"] is True
    assert "builtin:tiny-llama" in payload["builtin"]


def test_every_example_spec_is_valid():
    """The specs in sweeps/ (hub models and data for clusters) pass validation, apart from
    checking that their hub sources are reachable from here."""
    from orchestrator import spec

    paths = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        loaded = spec.load(path, check_sources=False)
        assert spec.expand(loaded), path


def test_launch_prints_the_watch_command_without_the_password():
    from orchestrator.cli.run import watch_hint

    assert watch_hint("s4", "sqlite:///sweeps.db") == "sweep status --sweep s4 --watch"
    assert watch_hint("s4", "sqlite:////data/my runs.db") == (
        "sweep --db 'sqlite:////data/my runs.db' status --sweep s4 --watch")
    hint = watch_hint("s4", "postgresql+psycopg://sweep:hunter2@db:5432/sweeps")
    assert "hunter2" not in hint
    assert hint.startswith("sweep status --sweep s4 --watch  (with SWEEP_DB_URL="
                           "postgresql+psycopg://sweep:***@db:5432/sweeps set")
