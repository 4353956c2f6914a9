"""Model sources, family adapters and the loaded-model bundle.

A model id in a spec is resolved by its *source*:

- ``builtin:NAME``  — a model this project builds itself (``builtin:tiny-llama``),
- ``llama2c:PATH``  — a llama2.c checkpoint (``.bin`` + tokenizer ``.bin``),
- a local directory — a transformers checkpoint (``config.json`` + weights),
- anything else     — a hub id, loaded by transformers.

A spec's ``source`` (builtin, llama2c, local, hub) makes the choice explicit.

A *family* adapter (``@register_model_family("llama")``) tells methods and
evaluators where the decoder layers, attention modules, heads, MLPs, norms and (for
vision-language models) the vision side are: ``llama`` (llama, mistral), ``qwen``
(qwen2, qwen3), ``exaone4``, ``mamba``, ``llava``, ``qwen2_5_vl``. Hub ids are checked
against the local cache on the driver when ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import os
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
    """A base model ready for compression and evaluation.

    ``processor`` is the transformers processor of a vision-language model (images and
    text → model inputs); None for text-only models. ``tokenizer`` is always the text
    tokenizer (for a VLM, the processor's tokenizer).
    """

    model: Any  # transformers PreTrainedModel
    tokenizer: TextTokenizer
    family: ModelFamily
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    processor: Any = None


# Config fields holding one entry per decoder layer: kept in step with the layers when
# layers are removed, so the reloaded model rebuilds each kept layer as it was.
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types")


class ModelFamily:
    """Where things are in a model of one architecture family.

    Subclasses are registered with :func:`register_model_family` and matched to a
    loaded model by ``config.model_type``. Methods and evaluators reach layers, heads,
    norms and projections only through this interface, so a method written once works
    on every family that has what it needs; a family that lacks something (Mamba has no
    attention, a text model has no vision tower) raises ``ValueError`` saying so.

    For vision-language models every text-side accessor (``decoder_layers``,
    ``num_heads``, ``final_norm``, …) refers to the inner language model, so
    layer- and head-level methods compress the language model.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    has_attention: bool = True
    """False for families without attention heads (Mamba)."""
    is_post_norm: bool = False
    """True when each sub-block normalises its *output* (EXAONE 4) instead of its input:
    then the residual stream never sees an unnormalised sub-block output, so rescaling a
    sub-block's output projection is undone by its norm."""
    is_vision_language: bool = False

    # ------------------------------------------------------------------ model level

    def language_model(self, model: Any) -> Any:
        """The text decoder module holding the layers, embeddings and final norm."""
        raise NotImplementedError

    def text_config(self, model: Any) -> Any:
        """The config of the language model (``model.config`` for text-only models)."""
        return model.config

    def decoder_layers(self, model: Any) -> Any:
        """The ``nn.ModuleList`` of decoder layers."""
        return self.language_model(model).layers

    def decoder_layers_prefix(self, model: Any) -> str:
        """Parameter-name prefix of the decoder layers (``model.layers``): layer ``i``'s
        parameters are named ``f"{prefix}.{i}.…"`` in ``model.named_parameters()``."""
        target = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is target:
                return name
        raise ValueError("the decoder layers are not a submodule of the model")

    def num_layers(self, model: Any) -> int:
        """Number of decoder layers."""
        return len(self.decoder_layers(model))

    def set_decoder_layers(self, model: Any, layers: list[Any],
                           kept: list[int] | None = None) -> list[int]:
        """Keep only ``layers`` (some of the current decoder layers, in the new order) and
        update the config so the model saves and reloads as it is now.

        ``kept`` are the current indices of ``layers``; when omitted they are found by
        identity among the current layers (so ``[layers[i] for i in kept]`` needs no
        ``kept``). Per-layer config lists (``layer_types``: sliding-window vs global
        attention, …) keep the entries of the kept layers by index, not a prefix, and
        every ``layer_idx`` (the KV cache / SSM state index) is renumbered. Returns
        ``kept``.
        """
        import torch

        current = list(self.decoder_layers(model))
        kept = self._kept_indices(current, layers) if kept is None else [int(i) for i in kept]
        if len(kept) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(kept)} kept indices")
        if not layers:
            raise ValueError("cannot remove every decoder layer")
        if len(set(kept)) != len(kept) or not all(0 <= i < len(current) for i in kept):
            raise ValueError(f"kept indices {kept} are not distinct indices of the "
                             f"{len(current)} current layers")
        for new_index, layer in enumerate(layers):
            # The KV cache (and Mamba's state cache) is indexed by layer_idx; a stale
            # index after removing layers would make generation read another layer's cache.
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        language_model = self.language_model(model)
        language_model.layers = torch.nn.ModuleList(layers)
        configs = [self.text_config(model)]
        inner = getattr(language_model, "config", None)
        if inner is not None and inner is not configs[0]:
            configs.append(inner)  # a copy rather than the same object: keep both in step
        for config in configs:
            for name in PER_LAYER_CONFIG_FIELDS:
                if isinstance(getattr(type(config), name, None), property):
                    continue  # derived from num_hidden_layers (Mamba): follows it by itself
                values = getattr(config, name, None)
                if isinstance(values, list | tuple) and len(values) == len(current):
                    setattr(config, name, [values[i] for i in kept])
            config.num_hidden_layers = len(layers)
        layer_types = getattr(configs[0], "layer_types", None)
        if hasattr(language_model, "has_sliding_layers") and layer_types is not None:
            # Computed once at construction; the mask code reads it on every forward.
            language_model.has_sliding_layers = "sliding_attention" in layer_types
        return kept

    @staticmethod
    def _kept_indices(current: list[Any], layers: list[Any]) -> list[int]:
        """Current index of each of ``layers``: by identity, else by its ``layer_idx``
        (which :meth:`set_decoder_layers` keeps equal to the position)."""
        position = {id(layer): index for index, layer in enumerate(current)}
        kept = []
        for layer in layers:
            if id(layer) in position:
                kept.append(position[id(layer)])
                continue
            indices = [m.layer_idx for m in layer.modules()
                       if isinstance(getattr(m, "layer_idx", None), int)]
            if not indices:
                raise ValueError("a layer passed to set_decoder_layers is not one of the "
                                 "model's current layers and has no layer_idx; pass kept=")
            kept.append(indices[0])
        return kept

    def embeddings(self, model: Any) -> Any:
        """The input token embedding (``nn.Embedding``)."""
        return model.get_input_embeddings()

    def lm_head(self, model: Any) -> Any:
        """The output projection to vocabulary logits (may share its weight with
        :meth:`embeddings` when the checkpoint ties them)."""
        return model.get_output_embeddings()

    def final_norm(self, model: Any) -> Any:
        """The norm applied after the last decoder layer, before ``lm_head``."""
        return self.language_model(model).norm

    def runtime_info(self, model: Any) -> dict[str, Any]:
        """JSON-able facts about how this model runs here (recorded in ``LoadedModel.info``)."""
        return {}

    # ------------------------------------------------------------------ attention

    def _no_attention(self) -> ValueError:
        return ValueError(f"{self.name} models have no attention heads; use a method that does "
                          "not need them (e.g. drop_layers)")

    def num_heads(self, model: Any) -> int:
        """Query heads per attention layer."""
        return int(self.text_config(model).num_attention_heads)

    def num_kv_heads(self, model: Any) -> int:
        """Key/value heads per attention layer (fewer than query heads under GQA)."""
        config = self.text_config(model)
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def head_dim(self, model: Any) -> int:
        """Width of one head: read from the attention module, which is what its reshapes
        use (Qwen2.5-VL ignores ``config.head_dim``; Qwen3 sets it apart from
        hidden/heads)."""
        attention = self.attention(self.decoder_layers(model)[0])
        value = getattr(attention, "head_dim", None)
        if value is not None:
            return int(value)
        config = self.text_config(model)
        return int(getattr(config, "head_dim", None)
                   or config.hidden_size // config.num_attention_heads)

    def heads_per_kv_group(self, model: Any) -> int:
        """Query heads sharing one key/value head."""
        heads, kv_heads = self.num_heads(model), self.num_kv_heads(model)
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not split into {kv_heads} KV groups")
        return heads // kv_heads

    def kv_group(self, model: Any, head: int) -> int:
        """The key/value head that query head ``head`` reads (transformers' ``repeat_kv``
        order: heads ``g·n … g·n + n − 1`` share KV head ``g``)."""
        heads = self.num_heads(model)
        if not 0 <= head < heads:
            raise ValueError(f"head {head} out of range for {heads} heads")
        return head // self.heads_per_kv_group(model)

    def attention(self, layer: Any) -> Any:
        """The self-attention module of one decoder layer."""
        raise NotImplementedError

    def attention_projections(self, layer: Any) -> dict[str, Any]:
        """``{"q": q_proj, "k": k_proj, "v": v_proj, "o": o_proj}`` of one layer."""
        raise NotImplementedError

    def attention_output_projection(self, layer: Any) -> Any:
        """The linear layer that mixes the concatenated head outputs (``o_proj``)."""
        return self.attention_projections(layer)["o"]

    # ------------------------------------------------------------------ layer parts

    def mlp(self, layer: Any) -> Any:
        """The feed-forward block of one decoder layer."""
        raise NotImplementedError

    def mlp_projections(self, layer: Any) -> dict[str, Any]:
        """The MLP's linear layers by role: ``gate``, ``up``, ``down`` where they exist."""
        raise NotImplementedError

    def norms(self, layer: Any) -> dict[str, Any]:
        """Every norm of one layer, by its module name relative to the layer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ vision

    def _not_vision_language(self) -> ValueError:
        return ValueError(f"{self.name} models are not vision-language models")

    def vision_tower(self, model: Any) -> Any:
        """The image encoder of a vision-language model."""
        raise self._not_vision_language()

    def multimodal_projector(self, model: Any) -> Any:
        """The module mapping vision features into the language model's embedding space."""
        raise self._not_vision_language()

    def image_token_id(self, model: Any) -> int:
        """The placeholder token id the processor repeats once per image feature."""
        raise self._not_vision_language()

    def image_token_mask(self, model: Any, input_ids: Any) -> Any:
        """Bool tensor shaped like ``input_ids``: True at the positions whose embedding
        the model replaces by an image feature (the language model's image positions)."""
        return input_ids == self.image_token_id(model)


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


def family_for_model_type(model_type: str | None) -> ModelFamily:
    """The family adapter registered for ``model_type``."""
    _import_all()
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(known)}")


def family_for(model: Any) -> ModelFamily:
    """The family adapter of a loaded transformers model."""
    return family_for_model_type(getattr(model.config, "model_type", None))


def _import_all() -> None:
    from workers.models import exaone, llama, llava, mamba, qwen, qwen_vl  # noqa: F401


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


def hub_offline() -> bool:
    """Whether Hugging Face Hub access is switched off (read now, not at import time).

    Same variables and truth values as ``huggingface_hub`` (which reads them once, when
    it is imported): ``HF_HUB_OFFLINE``, or the older ``TRANSFORMERS_OFFLINE``.
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache directory as ``huggingface_hub`` resolves it from the
    environment (``HF_HUB_CACHE``, legacy ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``/hub,
    ``XDG_CACHE_HOME``/huggingface/hub, ``~/.cache/huggingface/hub``), read now."""
    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return expand(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return expand(cache_home) / "huggingface" / "hub"


def check_hub_id(repo_id: str, revision: str | None = None) -> ModelSourceCheck:
    """Whether hub model ``repo_id`` (at ``revision``) can load: always when the hub is
    reachable; under ``HF_HUB_OFFLINE`` only when its ``config.json`` is in the cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return ModelSourceCheck(False, f"{repo_id!r} is neither a local checkpoint directory "
                                       f"nor a valid Hugging Face Hub id: {exc}")
    if not hub_offline():
        return ModelSourceCheck(True)  # availability is checked when it loads
    cache = hub_cache_dir()
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    if isinstance(found, str):
        return ModelSourceCheck(True)
    at = f" at revision {revision!r}" if revision else ""
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return ModelSourceCheck(False, (
        f"hub model {repo_id}{at} is not in the local Hugging Face cache ({cache}) and "
        f"HF_HUB_OFFLINE is set, so it cannot be downloaded: download it on a machine with "
        f"access (`{command}`, or `huggingface-cli download` with older huggingface_hub) and "
        f"copy the cache here or set HF_HUB_CACHE to one that has it, or unset HF_HUB_OFFLINE"
    ))


def check_model_id(model_id: str, source: str | None = None,
                   revision: str | None = None) -> ModelSourceCheck:
    """Cheap driver-side check that ``model_id`` can be loaded (no torch import).

    Hub ids are checked against the local cache when ``HF_HUB_OFFLINE`` is set (at
    ``revision``: a branch, tag or commit), so a sweep that could only fail at load
    time is refused before anything is scheduled.
    """
    model_id = qualified_id(model_id, source)
    if model_id.startswith("hub:"):
        return check_hub_id(model_id.removeprefix("hub:"), revision)
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
    return check_hub_id(model_id, revision)


def model_type_of(model_id: str, source: str | None = None,
                  revision: str | None = None) -> str | None:
    """The ``config.model_type`` of a model, read without loading it (no torch import);
    None when it cannot be known here (a hub id not in the local cache)."""
    model_id = qualified_id(model_id, source)
    if model_id.startswith(("builtin:", "llama2c:")):
        return "llama"
    config = model_config_of(model_id, None, revision)
    value = None if config is None else config.get("model_type")
    return value if isinstance(value, str) else None


def model_config_of(model_id: str, source: str | None = None,
                    revision: str | None = None) -> dict[str, Any] | None:
    """The checkpoint's ``config.json`` as a dict, read without loading the model (local
    directories and the hub cache); None when it cannot be read here."""
    import json

    model_id = qualified_id(model_id, source)
    if model_id.startswith(("builtin:", "llama2c:")):
        return None
    config_path: str | Path | None = None
    plain = model_id.split(":", 1)[1] if model_id.startswith(("hub:", "local:")) else model_id
    path = Path(plain).expanduser()
    if not model_id.startswith("hub:") and (path / "config.json").is_file():
        config_path = path / "config.json"
    elif not model_id.startswith("local:"):
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(plain, "config.json", cache_dir=hub_cache_dir(),
                                           revision=revision)
        except Exception:  # noqa: BLE001 - an invalid id is reported by check_model_id
            found = None
        config_path = found if isinstance(found, str) else None
    if config_path is None:
        return None
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_model(model_id: str, dtype: str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, source: str | None = None, *,
               attn_implementation: str | None = None,
               revision: str | None = None) -> LoadedModel:
    """Load ``model_id`` (see module docstring) onto ``device``, in eval mode.

    ``attn_implementation`` (``"eager"``, ``"sdpa"``, …; None = transformers' default)
    and ``revision`` (hub branch, tag or commit) are passed to ``from_pretrained``;
    ``revision`` only means something for hub ids.
    """
    model_id = qualified_id(model_id, source)
    if model_id.startswith(("hub:", "local:")):
        return _load_hf(model_id.split(":", 1)[1], dtype, device, trust_remote_code,
                        attn_implementation, revision)
    if model_id.startswith("builtin:"):
        from workers.models.builtin import ensure_builtin_model

        directory = ensure_builtin_model(model_id.removeprefix("builtin:"))
        loaded = _load_hf(str(directory), dtype, device, False, attn_implementation, None)
        loaded.source = model_id
        return loaded
    if model_id.startswith("llama2c:"):
        from workers.models.llama2c import load_llama2c

        loaded = load_llama2c(model_id.removeprefix("llama2c:"), dtype=dtype, device=device)
        if attn_implementation is not None:
            loaded.model.set_attn_implementation(attn_implementation)
            loaded.info["attn_implementation"] = loaded.model.config._attn_implementation
        loaded.source = model_id
        return loaded
    return _load_hf(model_id, dtype, device, trust_remote_code, attn_implementation, revision)


def _load_hf(path: str, dtype: str | None, device: str, trust_remote_code: bool,
             attn_implementation: str | None, revision: str | None) -> LoadedModel:
    from workers.models.hf import load_hf_model

    return load_hf_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         attn_implementation=attn_implementation, revision=revision)
