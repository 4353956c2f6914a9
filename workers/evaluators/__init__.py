"""Evaluators, registered by name; each declares its metrics and their directions.

An evaluator is a function ``evaluate(model, tokenizer, data, settings, device=...,
processor=None) -> dict`` returning ``{metric_name: value}``: ``data`` is a
:class:`workers.data.Dataset`, ``settings`` the spec's ``evaluation`` section as a plain
dict, ``processor`` the model's image processor for vision-language models. Each
evaluator declares the dataset kinds it can score (``kinds``); the spec is refused when
a dataset's kind is not among them. Modules import torch inside functions only.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"] | None


@dataclass(frozen=True)
class EvaluatorInfo:
    """A registered evaluator and the metrics it produces."""

    name: str
    description: str
    metrics: dict[str, Direction]
    evaluate: Callable[..., dict[str, float]]
    # Path of the setting that sets its batch size, halved when the evaluation runs out
    # of memory; None when the evaluator has no batch to shrink.
    batch_setting: tuple[str, ...] | None = None
    # Dataset kinds (workers.data.KINDS) it can score.
    kinds: tuple[str, ...] = ("text",)
    # The settings of the spec's ``evaluation`` section it reads (dotted paths).
    settings: tuple[str, ...] = ()
    # What it does with images: "ignored" (scores text only), "optional" (image questions
    # need a vision-language model), "required" (needs a vision-language model and images).
    images: str = "ignored"


_EVALUATORS: dict[str, EvaluatorInfo] = {}


def register_evaluator(name: str, *, metrics: dict[str, Direction], description: str,
                       kinds: tuple[str, ...], batch_setting: tuple[str, ...] | None = None,
                       settings: tuple[str, ...] = (), images: str = "ignored"):
    """Register ``evaluate`` under ``name``; ``metrics`` maps metric name → direction.

    ``batch_setting`` is the path of the evaluation setting holding the evaluator's batch
    size (``("batch_size",)``, ``("speed", "batch_size")``), halved on out-of-memory.
    ``kinds`` are the dataset kinds it scores; ``settings`` the evaluation settings it
    reads (``"max_length"``, ``"speed"`` for a whole section), for ``sweep evaluators``;
    ``images`` what it needs of the model for image questions (see ``EvaluatorInfo``).
    """
    from workers.data import KINDS

    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"evaluator {name!r}: kinds must be a non-empty subset of {KINDS}")
    if images not in ("ignored", "optional", "required"):
        raise ValueError(f"evaluator {name!r}: images must be ignored, optional or required")

    def wrap(evaluate: Callable[..., dict[str, float]]) -> Callable[..., dict[str, float]]:
        if name in _EVALUATORS:
            raise ValueError(f"evaluator {name!r} registered twice")
        _EVALUATORS[name] = EvaluatorInfo(name, description, dict(metrics), evaluate,
                                          batch_setting, tuple(kinds), tuple(settings),
                                          images)
        return evaluate

    return wrap


def evaluators() -> dict[str, EvaluatorInfo]:
    """Every registered evaluator by name."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(_EVALUATORS)


# Metrics every trial records from its evidence, whatever evaluators it runs.
MODEL_METRICS: dict[str, Direction] = {"params": "lower", "size_mb": "lower"}


def metric_directions() -> dict[str, Direction]:
    """Direction of every metric any evaluator (or the trial itself) can produce."""
    out: dict[str, Direction] = dict(MODEL_METRICS)
    for info in evaluators().values():
        out.update(info.metrics)
    return out
