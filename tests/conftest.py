"""Shared fixtures: one real local Ray per test session, a session cache directory for
the built-in model, real SQLite files, and the real data in ../shared/data when present."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_TOOLS = ROOT.parent / "shared" / "tools"

# Set before anything starts Ray: worker processes inherit the driver's environment.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="csw-"))
os.environ.setdefault("COMPRESS_SWEEP_CACHE", str(_SESSION_DIR / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A scratch directory for the whole session (short path: Ray's sockets live under it)."""
    return _SESSION_DIR


@pytest.fixture(scope="session")
def ray_session(session_dir: Path):
    """A real local Ray, started once per test session."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(session_dir / "ray"),
                 log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The trained built-in model (trained once per session into the session cache)."""
    from workers.models.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny-llama", progress=False)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    """The built-in model loaded (shared; tests must deep-copy before changing it)."""
    from workers.models import load_model

    return load_model("builtin:tiny-llama")


@pytest.fixture
def random_llama():
    """A tiny random Llama with GQA (8 heads, 2 KV heads, 4 layers) and a byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    model = LlamaForCausalLM(config).eval()
    return model


class ByteTokenizer:
    """UTF-8 bytes as token ids (BOS 256): a tokenizer with nothing to get wrong."""

    bos_id = 256
    eos_id = 257
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def llama2c_reference(shared_data: Path):
    """``../shared/tools/llama2c_reference.py``: the independent NumPy llama2.c forward
    pass and tokenizer, imported from its file (skips cleanly when absent)."""
    import importlib.util

    tool = shared_data.parent / "tools" / "llama2c_reference.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/llama2c_reference.py is not present")
    spec = importlib.util.spec_from_file_location("llama2c_reference", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite results database URL."""
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture(scope="session")
def postgres_admin_url():
    """Admin URL of a PostgreSQL server for this test session (given or started here)."""
    from postgres_server import PG_BIN, POSTGRES_ADMIN_URL, running_postgres

    if POSTGRES_ADMIN_URL:
        yield POSTGRES_ADMIN_URL
        return
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15: {PG_BIN / 'initdb'} absent")
    with running_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def s3():
    """A local S3 endpoint (moto's server) with an empty bucket, for the session."""
    from s3_server import have_moto, running_s3

    if not have_moto():
        pytest.skip("moto[server] is not installed (the dev extra has it)")
    with running_s3() as server:
        yield server
