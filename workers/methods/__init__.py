"""Compression methods, registered by name (lm-evaluation-harness style).

Each method is one module with a pydantic config (``extra="forbid"``) and an
``apply`` function decorated with :func:`register_method`::

    @register_method("drop_layers", config=DropLayersConfig, description="...")
    def apply(model, rate, config, ctx) -> MethodOutcome: ...

``apply`` receives a private copy of the base model and returns the variant (with the
compression baked into its weights/structure, so it survives save → reload) plus a
small JSON-able dict of what it did. Modules import torch inside functions only, so the
registry is cheap to import on the driver where specs are validated.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base of method configs: unknown keys are errors, so a typo in a spec fails loudly."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NoParams(MethodConfig):
    """Config of a method without parameters."""


@dataclass
class MethodContext:
    """What a method may use besides the model: the tokenizer, calibration text, seed."""

    tokenizer: Any
    family: Any
    seed: int
    device: str
    calibration_documents: Callable[[str, str | None, int], list[str]]


@dataclass
class MethodOutcome:
    """The variant and a JSON-able description of what the method did to it."""

    model: Any
    info: dict[str, Any] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    """Variant parameter name → base parameter name, for structure changes that rename."""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    description: str
    config: type[MethodConfig]
    apply: Callable[..., MethodOutcome]
    rate_meaning: str
    changes_model: bool = True


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, config: type[MethodConfig], description: str,
                    rate_meaning: str, changes_model: bool = True):
    """Register ``apply`` as method ``name`` with its config class."""

    def wrap(apply: Callable[..., MethodOutcome]) -> Callable[..., MethodOutcome]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodInfo(name, description, config, apply, rate_meaning, changes_model)
        return apply

    return wrap


def methods() -> dict[str, MethodInfo]:
    """Every registered method by name (imports each method module once)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_METHODS)


def get_method(name: str) -> MethodInfo:
    """The method registered as ``name``; KeyError when unknown."""
    return methods()[name]
