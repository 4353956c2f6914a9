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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MethodConfig(BaseModel):
    """Base of method configs: unknown keys are errors, so a typo in a spec fails loudly."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def dataset_entries(self) -> dict[str, dict[str, Any]]:
        """Dataset entries among the parameters (parameter name → entry), so the driver
        checks before Ray starts that they can be read, as it does the spec's datasets."""
        return {}

    def family_problem(self, family: Any, model_config: Mapping[str, Any] | None = None
                       ) -> str | None:
        """Why this configuration cannot handle a model of ``family`` whose
        ``config.json`` is ``model_config`` (None when it cannot be read on the driver):
        checked before Ray starts, beyond the method's ``requires``; None when it can."""
        return None


class NoParams(MethodConfig):
    """Config of a method without parameters."""


class TextCalibration(MethodConfig):
    """Calibration text of a method: ``calibration_samples`` sequences of
    ``calibration_length`` tokens from a text dataset's split (by default the built-in
    text's ``train`` split: never evaluation text)."""

    calibration_dataset: str = "builtin:pydoc"
    calibration_split: str | None = "train"
    calibration_samples: int = Field(default=16, ge=1, le=4096)
    calibration_length: int = Field(default=128, ge=8)


def run_calibration(model: Any, batches: list[Any], pre_hooks: list[tuple[Any, Any]] = (),
                    forward_hooks: list[tuple[Any, Any]] = ()) -> None:
    """Forward each token batch through ``model`` without gradients, with every
    ``(module, hook)`` forward pre-hook, and forward hook (called with the module's
    keyword arguments too), registered for the duration only."""
    import torch

    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    handles += [module.register_forward_hook(hook, with_kwargs=True)
                for module, hook in forward_hooks]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class MethodContext:
    """What a method may use besides the model.

    ``calibration_documents(name, split, seed)`` gives the text documents of a dataset;
    ``calibration_dataset(entry)`` the samples of a dataset entry written like a spec's
    (``{"name", "format", "fields", "split", "limit", …}``, see ``workers.data``), for
    methods that calibrate on questions (and their images). ``processor`` is the model's
    processor for vision-language models. ``cached(key, compute)`` keeps what ``compute``
    returns for the life of the worker process under ``key`` (extended with
    ``model_key``, which names the base model and device), so calibration statistics are
    computed once for all rates of a sweep; ``cache_hits`` counts reuses and ``cache_misses``
    computations, for the evidence.
    """

    tokenizer: Any
    family: Any
    seed: int
    device: str
    calibration_documents: Callable[[str, str | None, int], list[str]]
    calibration_dataset: Callable[[Mapping[str, Any]], Any] | None = None
    processor: Any = None
    model_key: str = ""
    _cache: dict[str, Any] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it returned before for the same ``key`` and base model."""
        from workers.cache import stable_hash

        full = stable_hash([self.model_key, key])
        if full in self._cache:
            self.cache_hits += 1
            return self._cache[full]
        self.cache_misses += 1
        value = compute()
        self._cache[full] = value
        return value


@dataclass
class MethodOutcome:
    """The variant and a JSON-able description of what the method did to it."""

    model: Any
    info: dict[str, Any] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    """Variant parameter name → base parameter name, for structure changes that rename."""


# What a method may need of a model family (checked on the driver, before Ray starts):
# "attention_heads" (attention with heads: not Mamba), "mlp" (gate/up/down projections:
# not Mamba), "state_space" (Mamba mixers), "vision_language" (an image encoder).
REQUIREMENTS = ("attention_heads", "mlp", "state_space", "vision_language")


def family_lacks(family: Any, requires: tuple[str, ...]) -> str | None:
    """What of ``requires`` the model family lacks, as a phrase; None when it has it all."""
    has = {
        "attention_heads": family.has_attention,
        "mlp": family.has_attention,  # every family with attention here has a gated MLP
        "state_space": not family.has_attention,
        "vision_language": family.is_vision_language,
    }
    missing = [need for need in requires if not has[need]]
    if not missing:
        return None
    words = {"attention_heads": "attention heads", "mlp": "MLP projections",
             "state_space": "state-space (Mamba) mixers", "vision_language": "an image encoder"}
    return " and ".join(words[m] for m in missing)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    description: str
    config: type[MethodConfig]
    apply: Callable[..., MethodOutcome]
    rate_meaning: str
    changes_model: bool = True
    requires: tuple[str, ...] = ()
    # False for methods without a rate (a dtype cast): ``apply`` gets rate None.
    uses_rate: bool = True


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, config: type[MethodConfig], description: str,
                    rate_meaning: str, changes_model: bool = True,
                    requires: tuple[str, ...] = (), uses_rate: bool = True):
    """Register ``apply`` as method ``name`` with its config class; ``requires`` lists what
    it needs of a model family (:data:`REQUIREMENTS`); ``uses_rate=False`` for a method
    swept without rates (one trial, ``rate`` None)."""
    unknown = [r for r in requires if r not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"method {name!r}: unknown requirement {unknown[0]!r}; "
                         f"one of {REQUIREMENTS}")

    def wrap(apply: Callable[..., MethodOutcome]) -> Callable[..., MethodOutcome]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodInfo(name, description, config, apply, rate_meaning, changes_model,
                                    tuple(requires), uses_rate)
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
