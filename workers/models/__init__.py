"""Model sources, family adapters and the loaded-model bundle.

A model id in a spec is resolved by its *source*:

- ``builtin:NAME``  — a model this project builds itself (``builtin:tiny-llama``),
- ``llama2c:PATH``  — a llama2.c checkpoint (``.bin`` + tokenizer ``.bin``),
- a local directory — a transformers checkpoint (``config.json`` + weights),
- anything else     — a hub id, loaded by transformers.

A spec's ``source`` (builtin, llama2c, local, hub) makes the choice explicit.

A *family* adapter (``@register_model_family("llama")``) tells methods and
evaluators where the decoder layers, attention modules and heads are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class TextTokenizer(Protocol):
    """The small tokenizer interface evaluators and methods rely on."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...


@dataclass
class LoadedModel:
    """A base model ready for compression and evaluation."""

    model: Any  # transformers PreTrainedModel
    tokenizer: TextTokenizer
    family: ModelFamily
    source: str
    info: dict[str, Any] = field(default_factory=dict)


class ModelFamily:
    """Where things are in a model of one architecture family.

    Subclasses are registered with :func:`register_model_family` and matched to a
    loaded model by ``config.model_type``.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()

    def decoder_layers(self, model: Any) -> Any:
        """The ``nn.ModuleList`` of decoder layers."""
        raise NotImplementedError

    def set_decoder_layers(self, model: Any, layers: list[Any]) -> None:
        """Replace the decoder layers and update the config so the model reloads."""
        raise NotImplementedError

    def attention(self, layer: Any) -> Any:
        """The self-attention module of one decoder layer."""
        raise NotImplementedError

    def num_heads(self, model: Any) -> int:
        raise NotImplementedError

    def num_kv_heads(self, model: Any) -> int:
        raise NotImplementedError

    def head_dim(self, model: Any) -> int:
        raise NotImplementedError

    def attention_output_projection(self, layer: Any) -> Any:
        """The linear layer that mixes the concatenated head outputs (``o_proj``)."""
        raise NotImplementedError


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(name: str):
    """Class decorator registering a :class:`ModelFamily` under ``name``."""

    def wrap(cls: type[ModelFamily]) -> type[ModelFamily]:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        instance = cls()
        instance.name = name
        _FAMILIES[name] = instance
        return cls

    return wrap


def model_families() -> dict[str, ModelFamily]:
    """All registered families by name."""
    _import_all()
    return dict(_FAMILIES)


def family_for(model: Any) -> ModelFamily:
    """The family adapter of a loaded transformers model."""
    _import_all()
    model_type = getattr(model.config, "model_type", None)
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(known)}")


def _import_all() -> None:
    from workers.models import llama  # noqa: F401


@dataclass(frozen=True)
class ModelSourceCheck:
    """Result of checking a model id on the driver without loading it."""

    ok: bool
    message: str = ""


SOURCES = ("builtin", "llama2c", "local", "hub")


def qualified_id(model_id: str, source: str | None) -> str:
    """``model_id`` with its source made explicit when the spec names one.

    ``source: builtin`` / ``llama2c`` add the prefix when it is missing; ``local`` and
    ``hub`` become ``local:`` / ``hub:`` so a hub id is never mistaken for a path that
    happens to exist, nor a missing local directory for a hub id.
    """
    if source is None:
        return model_id
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; sources: {', '.join(SOURCES)}")
    prefix = f"{source}:"
    return model_id if model_id.startswith(prefix) else prefix + model_id


def check_model_id(model_id: str, source: str | None = None) -> ModelSourceCheck:
    """Cheap driver-side check that ``model_id`` can be loaded (no torch import)."""
    model_id = qualified_id(model_id, source)
    if model_id.startswith("hub:"):
        return ModelSourceCheck(True)  # availability is checked when it loads
    forced_local = model_id.startswith("local:")
    if forced_local:
        model_id = model_id.removeprefix("local:")
    if model_id.startswith("builtin:"):
        from workers.models.builtin import BUILTIN_MODEL_NAMES

        name = model_id.removeprefix("builtin:")
        if name not in BUILTIN_MODEL_NAMES:
            return ModelSourceCheck(False, f"unknown built-in model {name!r}; built-ins: "
                                           + ", ".join(BUILTIN_MODEL_NAMES))
        return ModelSourceCheck(True)
    if model_id.startswith("llama2c:"):
        from workers.models.llama2c import find_llama2c_files

        try:
            find_llama2c_files(model_id.removeprefix("llama2c:"))
        except FileNotFoundError as exc:
            return ModelSourceCheck(False, str(exc))
        return ModelSourceCheck(True)
    path = Path(model_id).expanduser()
    if forced_local or path.exists() or model_id.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            return ModelSourceCheck(
                False, f"{model_id} is not a transformers checkpoint directory (no config.json)"
            )
        return ModelSourceCheck(True)
    return ModelSourceCheck(True)  # a hub id: availability is checked when it loads


def load_model(model_id: str, dtype: str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, source: str | None = None) -> LoadedModel:
    """Load ``model_id`` (see module docstring) onto ``device``, in eval mode."""
    model_id = qualified_id(model_id, source)
    if model_id.startswith(("hub:", "local:")):
        return _load_hf(model_id.split(":", 1)[1], dtype, device, trust_remote_code)
    if model_id.startswith("builtin:"):
        from workers.models.builtin import ensure_builtin_model

        directory = ensure_builtin_model(model_id.removeprefix("builtin:"))
        loaded = _load_hf(str(directory), dtype, device, False)
        loaded.source = model_id
        return loaded
    if model_id.startswith("llama2c:"):
        from workers.models.llama2c import load_llama2c

        loaded = load_llama2c(model_id.removeprefix("llama2c:"), dtype=dtype, device=device)
        loaded.source = model_id
        return loaded
    return _load_hf(model_id, dtype, device, trust_remote_code)


def _load_hf(path: str, dtype: str | None, device: str, trust_remote_code: bool) -> LoadedModel:
    from workers.models.hf import load_hf_model

    return load_hf_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
