"""Architecture contracts: the data plane never imports the control plane; the CLI starts light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_workers_never_import_orchestrator():
    offenders = []
    for path in (ROOT / "workers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "orchestrator"]
    assert offenders == []


@pytest.mark.parametrize("statement,heavy", [
    ("import orchestrator.cli.main", ("torch", "transformers", "ray", "sqlalchemy")),
    # Registries are read on the driver to validate specs: they must stay light.
    ("import workers.methods as m; m.methods()", ("torch", "transformers", "tokenizers")),
    ("import workers.evaluators as e; e.evaluators()", ("torch", "transformers", "tokenizers")),
    ("import workers.models.builtin", ("torch", "transformers", "tokenizers")),
])
def test_light_modules_import_no_heavy_library(statement, heavy):
    code = f"import sys\n{statement}\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_help_works():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "--help"],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, COLUMNS="120"))
    assert out.returncode == 0
    for command in ("launch", "validate", "status", "leaderboard", "list", "methods"):
        assert command in out.stdout
