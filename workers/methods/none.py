"""The baseline: the base model unchanged."""

from __future__ import annotations

from typing import Any

from workers.methods import MethodOutcome, NoParams, register_method


@register_method("none", config=NoParams, rate_meaning="no rate",
                 description="Baseline: the base model, unchanged.", changes_model=False)
def apply(model: Any, rate: float | None, config: NoParams, ctx: Any) -> MethodOutcome:
    """Return the model as it is."""
    return MethodOutcome(model=model, info={})
