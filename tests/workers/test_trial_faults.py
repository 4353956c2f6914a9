"""Faults inside a trial on the real built-in model: injected OOM, and a trial over its limit."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch

from workers import result_files, trial

EVALUATION = {"metrics": ["perplexity"], "batch_size": 8, "max_length": 64, "stride": 32,
              "probe_length": 24,
              "speed": {"warmup": 1, "repeats": 2, "prompt_length": 16, "new_tokens": 4,
                        "batch_size": 1}}


def config(limit: int = 40, limits: dict | None = None, batch_size: int = 8) -> dict:
    return {"trial_key": "f" * 64, "sweep": "t", "model": {"id": "builtin:tiny-llama"},
            "method": {"name": "drop_layers", "params": {"from": "top"}, "rate": 0.25},
            "dataset": {"name": "builtin:pydoc", "split": "test", "limit": limit},
            "evaluation": dict(EVALUATION, batch_size=batch_size), "seed": 0,
            "is_baseline": False, "limits": limits or {}}


class InjectedOOM:
    """Makes the cached base model (and every deep copy of it) run out of memory on
    batches wider than ``max_batch`` or windows longer than ``max_tokens``."""

    def __init__(self, max_batch: int, max_tokens: int = 10**9) -> None:
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.handle = None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and (ids.shape[0] > self.max_batch or ids.shape[1] > self.max_tokens):
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {ids.numel()} MiB (injected)")

    def __enter__(self) -> InjectedOOM:
        model = trial.base_model(config(), "cpu").model
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def clean_result(tiny_llama_dir):
    return trial.run_trial(config())


def test_oom_halves_the_batch_records_it_and_measures_the_same(clean_result) -> None:
    with InjectedOOM(max_batch=2):
        result = trial.attempt(config())
    assert result["status"] == "done", result.get("error")
    batch = result["evidence"]["details"]["evaluation"]["perplexity"]
    assert batch == {"batch_size": 2, "requested_batch_size": 8, "out_of_memory_at": [8, 4]}
    assert clean_result["evidence"]["details"]["evaluation"]["perplexity"]["batch_size"] == 8
    # The batch size changes how windows are grouped, never what is measured.
    assert result["metrics"]["perplexity"]["value"] == pytest.approx(
        clean_result["metrics"]["perplexity"]["value"], rel=1e-5)


def test_oom_at_batch_size_one_fails_with_reason_out_of_memory(tiny_llama_dir) -> None:
    # The probe (24 tokens) fits; every 64-token evaluation window does not.
    with InjectedOOM(max_batch=0 + 10**6, max_tokens=40):
        result = trial.attempt(config())
    assert result["status"] == "failed"
    error = result["error"]
    assert error["reason"] == "out_of_memory"
    assert "ran out of memory at batch size 1" in error["message"]
    assert "OutOfMemoryError" in error["traceback"]


def test_a_trial_over_its_limit_is_stopped_with_where_it_was(tiny_llama_dir) -> None:
    # 10k tokens at batch size 1 take a few seconds here.
    slow = config(limit=100, batch_size=1, limits={"evaluation_timeout_s": 0.3})
    started = time.perf_counter()
    result, timed_out = trial._run_within_limits(slow)
    assert timed_out and time.perf_counter() - started < 30
    assert result["status"] == "timed_out"
    assert result["error"]["reason"] == "timed_out"
    assert "evaluation perplexity ran for more than evaluation.timeout_s = 0.3 s" in \
        result["error"]["message"]
    assert "perplexity.py" in result["error"]["traceback"]  # where it was stuck
    assert re.search(rf"worker process {os.getpid()}\b", result["error"]["traceback"])
    # In a worker the process now exits; here the abandoned thread must finish before the
    # interpreter does (torch aborts when a thread is still inside it at shutdown).
    for thread in threading.enumerate():
        if thread.name.startswith("trial-"):
            thread.join()


def test_within_its_limits_a_trial_runs_normally(tiny_llama_dir) -> None:
    result, timed_out = trial._run_within_limits(config(limits={"trial_timeout_s": 600}))
    assert not timed_out and result["status"] == "done"


def test_result_files_are_atomic_and_read_back(tmp_path) -> None:
    result = {"status": "done", "metrics": {"perplexity": {"value": 3.5}}}
    path = result_files.write(tmp_path / "r", "a" * 64, result)
    (tmp_path / "r" / "broken.json").write_text("{not json")
    assert path.name == "a" * 64 + ".json"
    assert result_files.read_all(tmp_path / "r") == {"a" * 64: result}
    assert not list((tmp_path / "r").glob("*.tmp"))
    result_files.remove(tmp_path / "r", "a" * 64)
    assert "a" * 64 not in result_files.read_all(tmp_path / "r")
