"""Out-of-memory backoff: halve the batch down to 1, record it, then fail as out_of_memory."""

from __future__ import annotations

import pytest
import torch

from workers.memory import OutOfMemory, is_out_of_memory, run_with_backoff


def fits_up_to(limit: int, error: type[BaseException] = MemoryError):
    """An evaluation that runs out of memory above ``limit`` samples per batch."""
    seen: list[int] = []

    def evaluate(settings: dict) -> dict[str, float]:
        size = settings["speed"]["batch_size"]
        seen.append(size)
        if size > limit:
            raise error(f"tried to allocate {size} GiB")
        return {"value": float(size)}

    return evaluate, seen


def test_batch_is_halved_until_it_fits_and_the_request_is_untouched() -> None:
    evaluate, seen = fits_up_to(3)
    settings = {"speed": {"batch_size": 16}, "other": 1}
    values, run = run_with_backoff(evaluate, settings, ("speed", "batch_size"), "speed")
    assert seen == [16, 8, 4, 2]
    assert values == {"value": 2.0}
    assert run.as_dict() == {"batch_size": 2, "requested_batch_size": 16,
                             "out_of_memory_at": [16, 8, 4]}
    assert settings == {"speed": {"batch_size": 16}, "other": 1}


def test_cuda_out_of_memory_is_handled_like_memory_error() -> None:
    evaluate, seen = fits_up_to(1, torch.cuda.OutOfMemoryError)
    _, run = run_with_backoff(evaluate, {"speed": {"batch_size": 5}}, ("speed", "batch_size"),
                              "speed")
    assert seen == [5, 2, 1] and run.used == 1


def test_out_of_memory_at_batch_size_one_fails_with_the_reason() -> None:
    evaluate, seen = fits_up_to(0)
    with pytest.raises(OutOfMemory, match="evaluation speed ran out of memory at batch size 1"):
        run_with_backoff(evaluate, {"speed": {"batch_size": 4}}, ("speed", "batch_size"), "speed")
    assert seen == [4, 2, 1]


def test_an_evaluator_without_a_batch_fails_at_once() -> None:
    calls = []

    def evaluate(settings: dict) -> dict[str, float]:
        calls.append(1)
        raise MemoryError

    with pytest.raises(OutOfMemory, match="ran out of memory"):
        run_with_backoff(evaluate, {}, None, "whole")
    assert len(calls) == 1


def test_other_errors_are_not_retried() -> None:
    calls = []

    def evaluate(settings: dict) -> dict[str, float]:
        calls.append(settings["batch_size"])
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_with_backoff(evaluate, {"batch_size": 8}, ("batch_size",), "perplexity")
    assert calls == [8]


@pytest.mark.parametrize(("exc", "expected"), [
    (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 1099511627776 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_what_counts_as_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_a_real_cpu_allocation_failure_is_recognised() -> None:
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises must be recognised
        assert is_out_of_memory(exc), repr(exc)
    else:  # pragma: no cover - no machine has 4 EiB
        pytest.fail("allocating 4 EiB succeeded")
