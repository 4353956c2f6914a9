from __future__ import annotations

import pytest

from workers.methods import MethodContext
from workers.models import family_for

CALIBRATION = ["Calibration text about attention heads and layers. " * 8,
               "A second calibration document, with different words in it. " * 8]


@pytest.fixture
def context(random_llama, byte_tokenizer):
    return MethodContext(tokenizer=byte_tokenizer, family=family_for(random_llama), seed=0,
                         device="cpu", calibration_documents=lambda name, split, seed: CALIBRATION)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of the tiny checkpoint of a model type (tests/tiny_models.py), built once."""
    import tiny_models  # tests/ is on sys.path (rootdir conftest)

    root = tmp_path_factory.mktemp("tiny-method-models")
    built = {}

    def directory(model_type):
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return directory


@pytest.fixture
def calibration_context():
    """A fresh MethodContext for a LoadedModel, calibrating on CALIBRATION (fresh cache)."""

    def make(loaded):
        return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0,
                             device="cpu", calibration_documents=lambda name, split, seed:
                             CALIBRATION)

    return make


@pytest.fixture
def trial_config():
    """A run_trial config (no Ray) for a local checkpoint: short perplexity evaluation."""

    def make(model_dir, method, params, rate):
        return {"trial_key": "p" * 64, "sweep": "t", "model": {"id": f"local:{model_dir}"},
                "method": {"name": method, "params": params, "rate": rate},
                "dataset": {"name": "builtin:pydoc", "split": "test", "limit": 10},
                "evaluation": {"metrics": ["perplexity"], "batch_size": 4, "max_length": 32,
                               "stride": 16, "probe_length": 16},
                "seed": 0, "is_baseline": False}

    return make
