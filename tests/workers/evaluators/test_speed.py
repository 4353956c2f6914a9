"""speed: the measurement protocols (what is timed, how often, with the KV cache), the
arithmetic of every metric, and the CUDA timer against a fake ``torch.cuda``."""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from workers.data import Dataset, Sample
from workers.evaluators import evaluators
from workers.evaluators import speed as speed_module
from workers.evaluators.speed import (
    CpuTimer,
    CudaTimer,
    PeakMemory,
    evaluate,
    iqr,
    make_timer,
    percentile,
    real_prompts,
)

SETTINGS = {"speed": {"warmup": 2, "repeats": 3, "prompt_length": 12, "new_tokens": 5,
                      "batch_size": 2}}
FIXED_METRICS = {"prefill_tokens_per_s", "prefill_tokens_per_s_iqr", "decode_ms_per_token",
                 "decode_tokens_per_s", "decode_ms_per_token_iqr", "peak_memory_mb"}
REAL_METRICS = {"latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_p50_iqr",
                "samples_per_s", "generated_tokens_per_s", "prompt_tokens_mean"}
LONG = "a text much longer than the twelve tokens a prompt may have"
TEXTS = ["short", LONG, "mid text", "fourth, never used"]
BOS = 256


def tiny(**changes) -> dict:
    settings = {"warmup": 2, "repeats": 2, "prompt_length": 12, "new_tokens": 3,
                "batch_size": 2, "prompts": 3}
    return {"speed": dict(settings, **changes)}


class Recorder:
    """Every forward call of a model: input ids, cache length before it, and its output."""

    def __init__(self, model):
        self.inputs: list[torch.Tensor] = []
        self.cached: list[int | None] = []
        self.next_tokens: list[torch.Tensor] = []
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after)]

    def _before(self, _module, _args, kwargs):
        self.inputs.append(kwargs["input_ids"].clone())
        past = kwargs.get("past_key_values")
        self.cached.append(None if past is None else past.get_seq_length())

    def _after(self, _module, _args, output):
        self.next_tokens.append(output.logits[:, -1:, :].argmax(dim=-1))

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def shapes(self) -> list[tuple[int, int, bool]]:
        return [(ids.shape[0], ids.shape[1], c is not None)
                for ids, c in zip(self.inputs, self.cached, strict=True)]


def run(model, tokenizer, data, settings, monkeypatch=None):
    """evaluate() with every forward call recorded (and every timed region, if asked)."""
    regions: list[float] = []
    if monkeypatch is not None:
        # A real CPU timer that also keeps what it measured (not a mock: it times for real).
        class Keeping(CpuTimer):
            @contextmanager
            def region(self):
                with super().region() as timing:
                    yield timing
                regions.append(timing.ms)

        monkeypatch.setattr(speed_module, "make_timer", lambda device: Keeping())
    recorder = Recorder(model)
    try:
        result = evaluate(model, tokenizer, data, settings)
    finally:
        recorder.remove()
    return result, recorder, regions


def check_greedy_with_cache(recorder, first: int, prompt: torch.Tensor, new_tokens: int):
    """Calls first … first+new_tokens are one prefill of ``prompt`` and its decode steps."""
    assert torch.equal(recorder.inputs[first], prompt)
    assert recorder.cached[first] is None
    for step in range(1, new_tokens + 1):
        call = first + step
        # Each step feeds the argmax of the previous call and extends the same KV cache.
        assert torch.equal(recorder.inputs[call], recorder.next_tokens[call - 1])
        assert recorder.cached[call] == prompt.shape[1] + step - 1


@pytest.mark.parametrize("prompts", [{}, {"prompts": 0}], ids=["absent", "zero"])
def test_fixed_protocol_prefill_then_cached_single_token_steps(random_llama, byte_tokenizer,
                                                               prompts):
    settings = {"speed": dict(SETTINGS["speed"], **prompts)}
    result, recorder, _ = run(random_llama, byte_tokenizer, Dataset.of_texts(["short text"]),
                              settings)
    runs = 2 + 3
    assert len(recorder.inputs) == runs * (1 + 5)
    # The stream is "<BOS>short text" reused from its start to fill 2 × 12 tokens.
    stream = ([BOS, *b"short text"] * 3)[:24]
    fixed = torch.tensor(stream).reshape(2, 12)
    for run_index in range(runs):
        check_greedy_with_cache(recorder, run_index * 6, fixed, 5)
    assert recorder.shapes()[:6] == [(2, 12, False)] + [(2, 1, True)] * 5
    # Only the fixed protocol ran: the real-prompt metrics are omitted, not zero.
    assert set(result) == FIXED_METRICS
    assert result["prefill_tokens_per_s"] > 0 and result["decode_ms_per_token"] > 0
    # tokens/s is the batch divided by the median step time, not an independent number.
    assert result["decode_tokens_per_s"] == 2 * 1000.0 / result["decode_ms_per_token"]
    assert result["decode_ms_per_token_iqr"] >= 0 and result["prefill_tokens_per_s_iqr"] >= 0
    assert result["peak_memory_mb"] >= 0
    assert all(math.isfinite(v) for v in result.values())


def test_real_prompts_protocol(random_llama, byte_tokenizer):
    result, recorder, _ = run(random_llama, byte_tokenizer, Dataset.of_texts(TEXTS), tiny())
    fixed_calls = (2 + 2) * (1 + 3)
    assert recorder.shapes()[:fixed_calls] == ([(2, 12, False)] + [(2, 1, True)] * 3) * 4
    # The first 3 samples in order, BOS first; the long one keeps BOS and its last 11 bytes.
    prompts = [[BOS, *b"short"], [BOS, *LONG.encode()[-11:]], [BOS, *b"mid text"]]
    # 2 warm-up requests (prompts taken in turn), then 2 timed passes over all 3 prompts.
    order = [0, 1] + [0, 1, 2] * 2
    assert len(recorder.inputs) == fixed_calls + len(order) * (1 + 3)
    for request, index in enumerate(order):
        first = fixed_calls + request * (1 + 3)
        check_greedy_with_cache(recorder, first, torch.tensor([prompts[index]]), 3)
        assert recorder.shapes()[first + 1:first + 4] == [(1, 1, True)] * 3  # batch 1
    assert set(result) == FIXED_METRICS | REAL_METRICS
    assert result["prompt_tokens_mean"] == statistics.fmean(len(p) for p in prompts)
    assert result["latency_ms_p50"] <= result["latency_ms_p90"] <= result["latency_ms_p99"]
    assert result["peak_memory_mb"] >= 0
    assert all(math.isfinite(v) for v in result.values())


def test_every_metric_is_the_documented_function_of_the_timed_regions(
        random_llama, byte_tokenizer, monkeypatch):
    result, _, regions = run(random_llama, byte_tokenizer, Dataset.of_texts(TEXTS), tiny(),
                             monkeypatch)
    # Regions in order: per fixed repeat one prefill and 3 steps; then one per request.
    fixed, requests = regions[:4 * 4], regions[4 * 4:]
    assert len(requests) == 2 + 2 * 3
    timed = [fixed[r * 4:(r + 1) * 4] for r in (2, 3)]  # after 2 warm-up repeats
    prefill_rates = [2 * 12 * 1000.0 / repeat[0] for repeat in timed]
    decode_ms = [float(np.median(repeat[1:])) for repeat in timed]
    assert result["prefill_tokens_per_s"] == pytest.approx(np.median(prefill_rates))
    assert result["prefill_tokens_per_s_iqr"] == pytest.approx(
        np.subtract(*np.percentile(prefill_rates, [75, 25])))
    assert result["decode_ms_per_token"] == pytest.approx(np.median(decode_ms))
    assert result["decode_ms_per_token_iqr"] == pytest.approx(
        np.subtract(*np.percentile(decode_ms, [75, 25])))
    passes = [requests[2:5], requests[5:8]]  # after 2 warm-up requests
    latencies = passes[0] + passes[1]
    for q in (50, 90, 99):
        assert result[f"latency_ms_p{q}"] == pytest.approx(np.percentile(latencies, q))
    medians = [np.median(p) for p in passes]
    assert result["latency_ms_p50_iqr"] == pytest.approx(abs(medians[0] - medians[1]) / 2)
    assert result["samples_per_s"] == pytest.approx(6 / (sum(latencies) / 1000))
    # 4 forward passes per request, each generating one token.
    assert result["generated_tokens_per_s"] == pytest.approx(6 * 4 / (sum(latencies) / 1000))


def test_decoding_does_not_stop_at_eos(random_llama, byte_tokenizer):
    def always_eos(_module, _args, output):
        output.logits[..., byte_tokenizer.eos_id] = 1e4
        return output

    handle = random_llama.register_forward_hook(always_eos)
    try:
        _, recorder, _ = run(random_llama, byte_tokenizer, Dataset.of_texts(TEXTS),
                             tiny(warmup=0, repeats=1, prompts=2))
    finally:
        handle.remove()
    # Fixed: 1 repeat of prefill + 3 steps; real: 2 requests of prefill + 3 steps.
    assert len(recorder.inputs) == 4 + 2 * 4
    assert all(bool((ids == byte_tokenizer.eos_id).all())
               for ids, cached in zip(recorder.inputs, recorder.cached, strict=True)
               if cached is not None)


def test_multiple_choice_samples_give_their_prompts(random_llama, byte_tokenizer):
    samples = (Sample(id="0", question="Which is red?", choices=("sky", "blood"), answer=1,
                      context="Colours."),
               Sample(id="1", question="Two plus two?", choices=("4", "5"), answer=0))
    data = Dataset(name="mc", kind="multiple_choice", format="multiple_choice",
                   samples=samples)
    expected = [[BOS, *b"Colours.\nWhich is red?"], [BOS, *b"Two plus two?"]]
    assert real_prompts(byte_tokenizer, data, 2, 64) == expected
    # More prompts asked than samples: all of them, in order.
    _, recorder, _ = run(random_llama, byte_tokenizer, data,
                         tiny(warmup=0, repeats=1, prompt_length=64, prompts=5))
    prefills = [ids for ids, cached in zip(recorder.inputs, recorder.cached, strict=True)
                if cached is None and ids.shape[0] == 1]
    assert [ids[0].tolist() for ids in prefills] == expected


class NoBosTokenizer:
    """Bytes as ids and no BOS: a text of no bytes is a prompt of no tokens."""

    bos_id = None
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def test_prompt_selection_and_truncation(byte_tokenizer):
    data = Dataset.of_texts(["", "abcdefgh", "xyz", "later"])
    # The first 3 samples; the empty one is skipped, not replaced by a later sample.
    assert real_prompts(NoBosTokenizer(), data, 3, 5) == [list(b"defgh"), list(b"xyz")]
    assert real_prompts(byte_tokenizer, data, 3, 5) == [[BOS], [BOS, *b"efgh"], [BOS, *b"xyz"]]
    assert real_prompts(byte_tokenizer, data, 10, 1) == [[BOS]] * 4
    assert real_prompts(byte_tokenizer, data, 2, 9) == [[BOS], [BOS, *b"abcdefgh"]]


def test_no_usable_prompt_is_an_error_not_missing_metrics(random_llama):
    data = Dataset.of_texts(["", "", "text for the fixed protocol"])
    with pytest.raises(ValueError, match="speed.prompts = 2"):
        evaluate(random_llama, NoBosTokenizer(), data, tiny(prompts=2))


def test_percentile_known_values():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    assert percentile(list(range(1, 11)), 99) == pytest.approx(9.91)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    assert iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0 and iqr([3.0]) == 0.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(values=st.lists(finite, min_size=1, max_size=50), q=st.floats(0, 100))
def test_percentile_is_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(
        float(np.percentile(values, q, method="linear")), rel=1e-9, abs=1e-6)


@given(values=st.lists(finite, min_size=2, max_size=50))
def test_iqr_is_the_spread_stored_before(values):
    # The first version stored decode_ms_per_token_iqr from statistics.quantiles.
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    assert iqr(values) == pytest.approx(high - low, rel=1e-9, abs=1e-6)


# --------------------------------------------------------------------------- CUDA, faked


class FakeEvent:
    def __init__(self, cuda: FakeCuda, enable_timing: bool):
        self.cuda, self.enable_timing = cuda, enable_timing
        self.completed = False

    def record(self, stream=None):
        self.cuda.log.append(("record", self, stream))
        self.cuda.pending.append(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        # As CUDA: both events must have completed (a synchronize after the end record).
        if not (self.completed and end.completed):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        self.cuda.log.append(("elapsed_time", self, end))
        return self.cuda.elapsed_ms


class FakeCuda:
    """The part of ``torch.cuda`` the timer and the memory tracker use, with a call log."""

    def __init__(self, elapsed_ms: float = 12.5):
        self.elapsed_ms = elapsed_ms
        self.log: list[tuple] = []
        self.pending: list[FakeEvent] = []
        self.events: list[FakeEvent] = []

    def Event(self, enable_timing: bool = False) -> FakeEvent:
        event = FakeEvent(self, enable_timing)
        self.events.append(event)
        return event

    def current_stream(self, device=None):
        return ("stream", device)

    def synchronize(self, device=None):
        self.log.append(("synchronize", device))
        for event in self.pending:
            event.completed = True
        self.pending.clear()

    def reset_peak_memory_stats(self, device=None):
        self.log.append(("reset_peak_memory_stats", device))

    def memory_allocated(self, device=None) -> int:
        return 100 * 2**20

    def max_memory_allocated(self, device=None) -> int:
        return 164 * 2**20


def test_cuda_timer_records_events_around_the_region_and_synchronizes(monkeypatch):
    cuda = FakeCuda(elapsed_ms=12.5)
    monkeypatch.setattr(torch, "cuda", cuda)
    timer = make_timer("cuda:0")
    assert isinstance(timer, CudaTimer)
    with timer.region() as timing:
        cuda.log.append(("body",))
    device = torch.device("cuda:0")
    start, end = cuda.events
    assert start.enable_timing and end.enable_timing
    assert cuda.log == [("synchronize", device), ("record", start, ("stream", device)),
                        ("body",), ("record", end, ("stream", device)),
                        ("synchronize", device), ("elapsed_time", start, end)]
    assert timing.ms == 12.5
    # A second region has its own events.
    with timer.region() as second:
        pass
    assert len(cuda.events) == 4 and second.ms == 12.5


def test_cpu_timer_on_cpu_never_touches_cuda(monkeypatch):
    monkeypatch.setattr(torch, "cuda", None)  # any use of torch.cuda would raise
    timer = make_timer("cpu")
    assert isinstance(timer, CpuTimer)
    with timer.region() as timing:
        sum(range(1000))
    assert math.isfinite(timing.ms) and timing.ms >= 0


def test_cuda_peak_memory_is_max_allocated_minus_the_start(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(torch, "cuda", cuda)
    memory = PeakMemory("cuda")
    assert cuda.log == [("reset_peak_memory_stats", torch.device("cuda"))]
    memory.sample()
    assert memory.peak_mb() == 64.0


def test_directions_declared():
    info = evaluators()["speed"]
    assert set(info.metrics) == FIXED_METRICS | REAL_METRICS
    assert info.metrics["decode_ms_per_token"] == "lower"
    assert info.metrics["prefill_tokens_per_s"] == "higher"
    assert info.metrics["decode_tokens_per_s"] == "higher"
    assert info.metrics["peak_memory_mb"] == "lower"
    for q in (50, 90, 99):
        assert info.metrics[f"latency_ms_p{q}"] == "lower"
    assert info.metrics["samples_per_s"] == "higher"
    assert info.metrics["generated_tokens_per_s"] == "higher"
    for name in ("prompt_tokens_mean", "prefill_tokens_per_s_iqr", "decode_ms_per_token_iqr",
                 "latency_ms_p50_iqr"):
        assert info.metrics[name] is None
    assert info.batch_setting == ("speed", "batch_size") and info.settings == ("speed",)
