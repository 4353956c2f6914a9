"""Speed and memory: prefill throughput, decode time per token, peak memory.

Protocol. Inputs are ``batch_size × prompt_length`` token ids taken from the dataset's
own text. Each repeat runs one prefill forward pass (timed → prefill tokens/s) and then
``new_tokens`` greedy decode steps with the KV cache (each step timed → ms per token).
``warmup`` untimed repeats come first; reported values are medians over ``repeats``,
with the inter-quartile range of decode time stored as its noise estimate.

Timing uses ``time.perf_counter``; on CUDA each timed region is bracketed by
``torch.cuda.synchronize()`` because kernel launches are asynchronous. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU and, on CPU, the growth of the process's
resident set size over the measurement (sampled after every step).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from workers.data import KINDS, Dataset, token_stream
from workers.evaluators import register_evaluator


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@register_evaluator(
    "speed",
    metrics={"prefill_tokens_per_s": "higher", "decode_ms_per_token": "lower",
             "decode_tokens_per_s": "higher", "decode_ms_per_token_iqr": None,
             "peak_memory_mb": "lower"},
    description="Prefill tokens/s and greedy decode ms/token with KV cache (median of repeats), "
                "peak memory.",
    batch_setting=("speed", "batch_size"),
    kinds=KINDS,
    settings=("speed",),
)
def evaluate(model: Any, tokenizer: Any, data: Dataset, settings: dict[str, Any],
             device: str = "cpu", processor: Any = None) -> dict[str, float]:
    """Measure the speed of ``model`` as described in the module docstring."""
    import torch

    speed = settings["speed"]
    prompt_length, new_tokens = int(speed["prompt_length"]), int(speed["new_tokens"])
    batch_size = int(speed["batch_size"])
    needed = batch_size * prompt_length
    ids = token_stream(tokenizer, data.documents(), max_tokens=needed)
    if len(ids) < needed:
        ids = (ids * (needed // max(len(ids), 1) + 1))  # short datasets: reuse their text
    prompts = torch.tensor(ids[:needed], dtype=torch.long, device=device)
    prompts = prompts.reshape(batch_size, prompt_length)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    rss_peak = rss_before

    prefill_rates: list[float] = []
    decode_ms: list[float] = []
    with torch.inference_mode():
        for repeat in range(int(speed["warmup"]) + int(speed["repeats"])):
            timed = repeat >= int(speed["warmup"])
            sync()
            start = time.perf_counter()
            out = model(input_ids=prompts, use_cache=True)
            sync()
            prefill_s = time.perf_counter() - start
            past = out.past_key_values
            token = out.logits[:, -1:, :].argmax(dim=-1)
            steps: list[float] = []
            for _ in range(new_tokens):
                sync()
                start = time.perf_counter()
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                sync()
                steps.append(time.perf_counter() - start)
                past = out.past_key_values
                token = out.logits[:, -1:, :].argmax(dim=-1)
            rss_peak = max(rss_peak, _rss_bytes())
            if timed:
                prefill_rates.append(batch_size * prompt_length / prefill_s)
                decode_ms.append(1000.0 * statistics.median(steps))
    low, high = _quartiles(decode_ms)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - memory_before) / 2**20
    else:
        peak_mb = (rss_peak - rss_before) / 2**20
    median_ms = statistics.median(decode_ms)
    return {
        "prefill_tokens_per_s": statistics.median(prefill_rates),
        "decode_ms_per_token": median_ms,
        "decode_tokens_per_s": batch_size * 1000.0 / median_ms,
        "decode_ms_per_token_iqr": high - low,
        "peak_memory_mb": max(peak_mb, 0.0),
    }
