"""Out-of-memory handling: recognise it, free what can be freed, retry at half the batch.

An evaluation that runs out of memory is retried with its batch size halved, down to 1;
the batch size actually used is recorded with the trial. Out of memory at batch size 1
fails the trial with reason ``out_of_memory``.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class OutOfMemory(RuntimeError):
    """An evaluation ran out of memory even at batch size 1 (or has no batch to shrink)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA, host, or Python's MemoryError)."""
    if isinstance(exc, MemoryError | OutOfMemory):
        return True
    try:
        import torch

        cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
        if cuda_oom is not None and isinstance(exc, cuda_oom):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency of every worker
        pass
    # torch's CPU allocator and older CUDA builds raise plain RuntimeErrors.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def free_memory() -> None:
    """Drop garbage and the CUDA caching allocator's unused blocks before a retry."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class BatchRun:
    """How an evaluation ran: the batch size asked for, the one used, the OOMs on the way."""

    requested: int | None
    used: int | None
    out_of_memory: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.used, "requested_batch_size": self.requested,
                "out_of_memory_at": self.out_of_memory}


def _get(settings: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = settings
    for part in path:
        node = node[part]
    return node


def _set(settings: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = settings
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def run_with_backoff(evaluate: Callable[[dict[str, Any]], dict[str, float]],
                     settings: dict[str, Any], batch_setting: tuple[str, ...] | None,
                     name: str) -> tuple[dict[str, float], BatchRun]:
    """``evaluate(settings)``, retried at half the batch size on out-of-memory.

    ``settings`` is not changed; each retry gets a copy with the smaller batch size.
    """
    current = copy.deepcopy(settings)
    requested = None if batch_setting is None else int(_get(current, batch_setting))
    run = BatchRun(requested=requested, used=requested)
    while True:
        try:
            return evaluate(current), run
        except Exception as exc:  # noqa: BLE001 - only allocation failures are handled
            if not is_out_of_memory(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if run.used is None or run.used <= 1:
                where = "" if run.used is None else " at batch size 1"
                raise OutOfMemory(f"evaluation {name} ran out of memory{where}: {message}") \
                    from exc
        # Out of the except block, so the failed attempt's frames (and tensors) are freed.
        assert batch_setting is not None  # run.used is None without one: raised above
        run.out_of_memory.append(run.used)
        free_memory()
        run.used = max(1, run.used // 2)
        _set(current, batch_setting, run.used)
