"""speed: the measurement protocol (what is timed, how often, with the KV cache)."""

from __future__ import annotations

from workers.data import Dataset
from workers.evaluators import evaluators
from workers.evaluators.speed import evaluate

SETTINGS = {"speed": {"warmup": 2, "repeats": 3, "prompt_length": 12, "new_tokens": 5,
                      "batch_size": 2}}


def test_protocol_prefill_then_cached_single_token_steps(random_llama, byte_tokenizer):
    calls: list[tuple[int, int, bool]] = []

    def hook(_module, args, kwargs):
        ids = kwargs["input_ids"]
        calls.append((ids.shape[0], ids.shape[1], kwargs.get("past_key_values") is not None))

    handle = random_llama.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = evaluate(random_llama, byte_tokenizer, Dataset.of_texts(["short text"]),
                          SETTINGS)
    finally:
        handle.remove()
    runs = 2 + 3
    assert len(calls) == runs * (1 + 5)
    for run in range(runs):
        prefill, *steps = calls[run * 6:(run + 1) * 6]
        assert prefill == (2, 12, False)
        assert steps == [(2, 1, True)] * 5
    assert result["prefill_tokens_per_s"] > 0 and result["decode_ms_per_token"] > 0
    # tokens/s is the batch divided by the median step time, not an independent number.
    assert result["decode_tokens_per_s"] == 2 * 1000.0 / result["decode_ms_per_token"]
    assert result["decode_ms_per_token_iqr"] >= 0 and result["peak_memory_mb"] >= 0


def test_directions_declared():
    metrics = evaluators()["speed"].metrics
    assert metrics["decode_ms_per_token"] == "lower"
    assert metrics["prefill_tokens_per_s"] == "higher"
    assert metrics["peak_memory_mb"] == "lower"
