"""``builtin:tiny-llama``: a real, stock-loadable Llama with GQA, trained once and cached.

The real recipe is trained once per session (about a minute and a half on two cores)
into the session cache; cache mechanics (concurrency, crash recovery, determinism)
use a tiny recipe in per-test cache directories so they take seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.models import builtin
from workers.models.builtin import (
    RECIPE_VERSION,
    TINY_LLAMA_RECIPE,
    builtin_model_dir,
    ensure_builtin_model,
    heldout_perplexity,
    packed_token_stream,
    train_tiny_llama,
)

ROOT = Path(__file__).resolve().parents[3]

# Small enough to train in about a second, big enough to exercise every code path.
TINY_RECIPE = dataclasses.replace(
    TINY_LLAMA_RECIPE, vocab_size=300, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, seq_len=64,
    batch_size=4, steps=20, warmup_steps=2,
)


@pytest.fixture(scope="session")
def builtin_cache() -> Iterator[Path]:
    """The session's cache root; a private one unless the suite already set one."""
    if os.environ.get("COMPRESS_SWEEP_CACHE"):
        yield Path(os.environ["COMPRESS_SWEEP_CACHE"])
        return
    with tempfile.TemporaryDirectory(prefix="csw-builtin-") as tmp:
        os.environ["COMPRESS_SWEEP_CACHE"] = tmp
        try:
            yield Path(tmp)
        finally:
            os.environ.pop("COMPRESS_SWEEP_CACHE", None)


@pytest.fixture(scope="session")
def trained_dir(builtin_cache: Path) -> Path:
    """The real ``builtin:tiny-llama`` checkpoint (trained on first use in this cache)."""
    return ensure_builtin_model("tiny-llama", progress=False)


@pytest.fixture(scope="session")
def stock(trained_dir: Path):
    """Model and tokenizer loaded with nothing but stock transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def test_stream(stock) -> list[int]:
    from workers.data.builtin import pydoc_documents

    return packed_token_stream(stock[1], pydoc_documents("test"))


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_SWEEP_CACHE", str(cache))
    return cache


def _state(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


# --- the real model --------------------------------------------------------------


def test_checkpoint_is_a_standard_transformers_directory(trained_dir: Path) -> None:
    assert trained_dir.parent == builtin_cache_models()
    assert trained_dir.name.startswith(f"tiny-llama-{RECIPE_VERSION}-")
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "recipe.json"):
        assert (trained_dir / name).is_file(), name
    assert not list(trained_dir.parent.glob(".*.tmp"))


def builtin_cache_models() -> Path:
    return Path(os.environ["COMPRESS_SWEEP_CACHE"]) / "models"


def test_architecture_is_llama_with_grouped_query_attention(stock) -> None:
    from transformers import LlamaForCausalLM

    model, _ = stock
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert config.num_attention_heads >= 8
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.num_hidden_layers >= 6
    assert config.max_position_embeddings >= 256
    head_dim = config.hidden_size // config.num_attention_heads
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == config.num_key_value_heads * head_dim
    assert attention.q_proj.out_features == config.num_attention_heads * head_dim


def test_tokenizer_is_byte_level_and_round_trips_any_text(stock) -> None:
    _, tokenizer = stock
    for token in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(tokenizer, token) is not None, token
    assert 1024 <= len(tokenizer) <= 2048
    samples = ["def f(x):\n\treturn x ** 2  # comment", "naïve café — 東京 🐍 \x00\x7f",
               "   leading and trailing   ", ""]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # Like Llama tokenizers, encoding with special tokens starts with BOS.
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id


def test_recipe_file_records_the_recipe_and_its_results(trained_dir: Path, stock) -> None:
    record = json.loads((trained_dir / "recipe.json").read_text())
    assert record["recipe"] == dataclasses.asdict(TINY_LLAMA_RECIPE)
    assert record["recipe_version"] == RECIPE_VERSION
    assert record["recipe"]["split"] == "train"
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["parameters"] == sum(p.numel() for p in stock[0].parameters())
    assert 0 < record["final_train_loss"] < 6
    assert 1 < record["validation_perplexity"] < 100
    assert record["training_seconds"] > 0


def test_trained_model_is_far_better_than_untrained(stock, test_stream: list[int]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model, tokenizer = stock
    trained = heldout_perplexity(model, test_stream, TINY_LLAMA_RECIPE.seq_len)
    torch.manual_seed(0)
    untrained = heldout_perplexity(LlamaForCausalLM(model.config).eval(), test_stream,
                                   TINY_LLAMA_RECIPE.seq_len)
    assert untrained > 0.5 * len(tokenizer)  # a random model is about uniform
    assert trained < 100
    assert trained < untrained / 10


def test_dropping_half_the_layers_hurts(trained_dir: Path, stock,
                                        test_stream: list[int]) -> None:
    from transformers import AutoModelForCausalLM

    from workers.models.llama import LlamaFamily

    base = heldout_perplexity(stock[0], test_stream, TINY_LLAMA_RECIPE.seq_len)
    model = AutoModelForCausalLM.from_pretrained(trained_dir).eval()
    layers = list(model.model.layers)
    LlamaFamily().set_decoder_layers(model, layers[: len(layers) // 2])
    dropped = heldout_perplexity(model, test_stream, TINY_LLAMA_RECIPE.seq_len)
    assert dropped > 1.05 * base


def test_generation_works_with_stock_generate(stock) -> None:
    model, tokenizer = stock
    inputs = tokenizer("The for statement is used to", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] == inputs.input_ids.shape[1] + 8


def test_second_call_reuses_the_checkpoint(trained_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in trained_dir.iterdir()}
    started = time.perf_counter()
    again = ensure_builtin_model("tiny-llama", progress=False)
    assert time.perf_counter() - started < 5
    assert again == trained_dir
    assert {p.name: p.stat().st_mtime_ns for p in trained_dir.iterdir()} == before


def test_unknown_builtin_is_refused_with_the_list_of_builtins() -> None:
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        ensure_builtin_model("huge-llama")


# --- cache mechanics, with a tiny recipe -----------------------------------------


def test_every_recipe_gets_its_own_directory(private_cache: Path) -> None:
    assert builtin_model_dir("tiny-llama", TINY_RECIPE) != builtin_model_dir("tiny-llama")
    assert builtin_model_dir("tiny-llama").name.startswith(f"tiny-llama-{RECIPE_VERSION}-")


def test_training_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    import torch

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    train_tiny_llama(first, TINY_RECIPE, progress=False)
    train_tiny_llama(second, TINY_RECIPE, progress=False)
    # In-process training leaves the caller's torch settings as they were.
    assert torch.get_num_threads() == threads
    assert torch.get_rng_state().equal(rng)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    loss_a = json.loads((first / "recipe.json").read_text())["final_train_loss"]
    loss_b = json.loads((second / "recipe.json").read_text())["final_train_loss"]
    assert loss_a == loss_b


_CONCURRENT_CALLER = """
import json, sys, time
from pathlib import Path
from workers.models.builtin import TinyLlamaRecipe, ensure_builtin_model
recipe = TinyLlamaRecipe(**json.loads(sys.argv[1]))
print("ready", flush=True)  # both callers start from here at the same moment
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(ensure_builtin_model("tiny-llama", recipe=recipe), flush=True)
"""


def test_concurrent_processes_train_once_and_share_the_result(private_cache: Path,
                                                              tmp_path: Path) -> None:
    go = tmp_path / "go"
    recipe = json.dumps(dataclasses.asdict(TINY_RECIPE))
    callers = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_CALLER, recipe, str(go)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, COMPRESS_SWEEP_CACHE=str(private_cache)))
        for _ in range(2)
    ]
    for caller in callers:
        assert caller.stdout is not None
        assert caller.stdout.readline().strip() == "ready"
    go.touch()
    results = [caller.communicate(timeout=300) for caller in callers]
    assert [caller.returncode for caller in callers] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert paths == {str(builtin_model_dir("tiny-llama", TINY_RECIPE))}
    trainers = [err for _, err in results if "(first use, cached in" in err]
    waiters = [err for _, err in results if "waiting for another process" in err]
    assert len(trainers) == 1 and len(waiters) == 1, results
    models = private_cache / "models"
    checkpoints = [p for p in models.iterdir() if p.is_dir()]
    assert checkpoints == [Path(paths.pop())]
    assert (checkpoints[0] / "recipe.json").is_file()


def test_failed_training_leaves_nothing_visible(private_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out_dir: Path, *args: object, **kwargs: object) -> None:
        (out_dir / "config.json").write_text("{}")  # half a checkpoint
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(builtin, "_train_in_subprocess", crash)
    with pytest.raises(RuntimeError, match="mid-training"):
        ensure_builtin_model("tiny-llama", recipe=TINY_RECIPE, progress=False)
    models = private_cache / "models"
    assert [p for p in models.iterdir() if p.is_dir()] == []


def test_a_failing_training_process_is_reported(private_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="exit code 1"):
        ensure_builtin_model("tiny-llama", recipe=TINY_RECIPE, progress=False)
    assert [p for p in (private_cache / "models").iterdir() if p.is_dir()] == []


def test_invalid_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        dataclasses.replace(TINY_RECIPE, num_key_value_heads=3)
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(TINY_RECIPE, seq_len=TINY_RECIPE.max_position_embeddings + 1)


def test_leftovers_of_a_dead_trainer_are_cleaned_up(private_cache: Path) -> None:
    target = builtin_model_dir("tiny-llama", TINY_RECIPE)
    stale = target.parent / f".{target.name}.dead.tmp"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    target.mkdir()  # a target without recipe.json is incomplete, not a checkpoint
    assert ensure_builtin_model("tiny-llama", recipe=TINY_RECIPE, progress=False) == target
    assert not stale.exists()
    assert (target / "recipe.json").is_file()
    assert _state(target)
