"""Tiny random checkpoints of every model family, built once per test session.

``tiny_checkpoint("qwen3")`` returns the directory of that family's checkpoint
(``tests/tiny_models.py`` builds it on first request, in well under a second);
``tiny_loaded("qwen3")`` loads it through ``load_model("local:…")``, fresh each call, so
a test may change the model it gets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Directory of the tiny checkpoint of a model type, built on first request."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def checkpoint(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return checkpoint


@pytest.fixture
def tiny_loaded(tiny_checkpoint: Callable[[str], Path]):
    """``load_model("local:<dir>")`` of a tiny checkpoint (a fresh copy per call)."""
    from workers.models import load_model

    def load(model_type: str, **options):
        return load_model(f"local:{tiny_checkpoint(model_type)}", **options)

    return load
