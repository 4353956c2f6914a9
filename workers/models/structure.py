"""Per-layer structure of structurally pruned models, and reloading them.

Structural methods (``prune_heads``, ``prune_ffn``) shrink the attention and MLP
projections of each decoder layer. When every layer keeps the same sizes, the config
says so (``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``,
``intermediate_size``) and the model reloads with stock ``from_pretrained``. When the
sizes differ from layer to layer, no stock config field can describe them: the sizes
are recorded in the model's (top-level) config as

    config.compress_sweep_structure = {"attention_heads": [h_0, …, h_{L-1}],
                                       "kv_heads": [g_0, …], "intermediate_size": [i_0, …]}

(one entry per decoder layer, JSON-serialisable, so it survives ``save_pretrained``),
while the config's global sizes stay those the model was built with. Loading such a
checkpoint (:func:`load_structured_model`, used by ``workers.models.hf``) builds the
model class as ``from_pretrained`` does, then — before any weight is read —
:func:`restore_structure` gives every recorded module correctly shaped (empty) weights,
so transformers' own loader (key renaming, sharded files, tied weights, dtype) fills
them, and any missing, unexpected or mis-shaped weight is an error. Stock
``from_pretrained`` refuses such a checkpoint with a shape mismatch rather than
loading it wrongly.

:func:`record_structure` is what a method calls once it has changed a model: it writes
the record only when the config alone cannot rebuild the model, removes a stale one
otherwise, and checks (by building the model on the meta device) that the config plus
the record rebuild every parameter shape, so a saved variant is known to reload.
"""

from __future__ import annotations

import copy
from typing import Any

STRUCTURE_KEY = "compress_sweep_structure"
STRUCTURE_FIELDS = ("attention_heads", "kv_heads", "intermediate_size")


# --------------------------------------------------------------------------- modules


def slice_linear(linear: Any, *, rows: Any = None, columns: Any = None) -> None:
    """Keep only ``rows`` (output features, with their bias entries) and/or ``columns``
    (input features) of an ``nn.Linear``, in the given order (1-D index tensors)."""
    import torch

    weight = linear.weight
    if tuple(weight.shape) != (linear.out_features, linear.in_features):
        raise ValueError(f"{type(linear).__name__} stores its weight packed as "
                         f"{tuple(weight.shape)} (a quantized layer?): prune before quantizing")
    with torch.no_grad():
        new = weight.detach()
        if rows is not None:
            new = new.index_select(0, rows.to(weight.device))
        if columns is not None:
            new = new.index_select(1, columns.to(weight.device))
        linear.weight = torch.nn.Parameter(new.contiguous(), requires_grad=weight.requires_grad)
        if rows is not None and linear.bias is not None:
            bias = linear.bias.detach().index_select(0, rows.to(weight.device)).contiguous()
            linear.bias = torch.nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def resize_linear(linear: Any, out_features: int, in_features: int) -> None:
    """Give an ``nn.Linear`` uninitialised weights (and bias) of a new shape, same dtype
    and device (meta while ``from_pretrained`` builds a model): to be loaded into."""
    import torch

    if tuple(linear.weight.shape) == (out_features, in_features):
        return
    weight = linear.weight
    linear.weight = torch.nn.Parameter(
        torch.empty(out_features, in_features, dtype=weight.dtype, device=weight.device),
        requires_grad=weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias
        linear.bias = torch.nn.Parameter(
            torch.empty(out_features, dtype=bias.dtype, device=bias.device),
            requires_grad=bias.requires_grad)
    linear.out_features, linear.in_features = out_features, in_features


def set_attention_heads(attention: Any, heads: int, kv_heads: int) -> None:
    """Set the head counts an attention module's forward reads (transformers 5.23):
    ``num_key_value_groups`` (``repeat_kv`` / SDPA's GQA), and ``num_heads`` /
    ``num_attention_heads`` / ``num_key_value_heads`` where the module stores them
    (EXAONE 4, Qwen2.5-VL). Reshapes use ``head_dim`` and ``-1``, so they follow."""
    if kv_heads < 1 or heads < kv_heads or heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    attention.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads),
                        ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def set_mlp_width(mlp: Any, width: int) -> None:
    """Set the MLP module's ``intermediate_size`` attribute where it stores one."""
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = width


def attention_head_dim(family: Any, model: Any, layer: Any) -> int:
    """Width of one head in ``layer``'s attention (the module's own ``head_dim``)."""
    value = getattr(family.attention(layer), "head_dim", None)
    return int(value) if value is not None else family.head_dim(model)


# --------------------------------------------------------------------------- structure


def measure_structure(model: Any, family: Any) -> dict[str, list[int]]:
    """The sizes each decoder layer really has, read from its weight shapes:
    ``attention_heads`` = q_proj out features / head_dim, ``kv_heads`` = k_proj out
    features / head_dim, ``intermediate_size`` = up_proj out features."""
    structure: dict[str, list[int]] = {name: [] for name in STRUCTURE_FIELDS}
    for layer in family.decoder_layers(model):
        head_dim = attention_head_dim(family, model, layer)
        projections = family.attention_projections(layer)
        structure["attention_heads"].append(int(projections["q"].out_features) // head_dim)
        structure["kv_heads"].append(int(projections["k"].out_features) // head_dim)
        structure["intermediate_size"].append(int(family.mlp_projections(layer)["up"]
                                                  .out_features))
    return structure


def has_structure(config: Any) -> bool:
    """Whether a (top-level) config carries a per-layer structure record."""
    return getattr(config, STRUCTURE_KEY, None) is not None


def restore_structure(model: Any, family: Any) -> None:
    """Shape a freshly built model like its config's structure record says.

    Every decoder layer's q/k/v/o projections get ``attention_heads`` / ``kv_heads`` ×
    ``head_dim`` rows (columns for o), gate/up/down ``intermediate_size`` rows (columns
    for down), with uninitialised values — weights to be loaded; the attention and MLP
    modules' size attributes are updated. No record: nothing happens.
    """
    record = getattr(model.config, STRUCTURE_KEY, None)
    if record is None:
        return
    layers = family.decoder_layers(model)
    _check_record(record, len(layers))
    for index, layer in enumerate(layers):
        heads = record["attention_heads"][index]
        kv_heads = record["kv_heads"][index]
        width = record["intermediate_size"][index]
        head_dim = attention_head_dim(family, model, layer)
        attention = family.attention_projections(layer)
        hidden = attention["q"].in_features
        resize_linear(attention["q"], heads * head_dim, hidden)
        resize_linear(attention["k"], kv_heads * head_dim, attention["k"].in_features)
        resize_linear(attention["v"], kv_heads * head_dim, attention["v"].in_features)
        resize_linear(attention["o"], attention["o"].out_features, heads * head_dim)
        set_attention_heads(family.attention(layer), heads, kv_heads)
        mlp = family.mlp_projections(layer)
        resize_linear(mlp["gate"], width, mlp["gate"].in_features)
        resize_linear(mlp["up"], width, mlp["up"].in_features)
        resize_linear(mlp["down"], mlp["down"].out_features, width)
        set_mlp_width(family.mlp(layer), width)


def _check_record(record: Any, num_layers: int) -> None:
    if not isinstance(record, dict) or set(record) != set(STRUCTURE_FIELDS):
        raise ValueError(f"{STRUCTURE_KEY} must be a mapping with exactly the keys "
                         f"{', '.join(STRUCTURE_FIELDS)}; got {record!r}")
    for name in STRUCTURE_FIELDS:
        values = record[name]
        if (not isinstance(values, list) or len(values) != num_layers
                or not all(isinstance(v, int) and v >= 1 for v in values)):
            raise ValueError(f"{STRUCTURE_KEY}[{name!r}] must list one positive integer per "
                             f"decoder layer ({num_layers}); got {values!r}")


def parameter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the model's state dict."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def rebuilt_shapes(model: Any, family: Any,
                   record: dict[str, list[int]] | None) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a model of ``type(model)`` gets when built from a copy of
    its config (with ``record`` as the structure record, or none), then restored as
    :func:`load_structured_model` does. Built on the meta device: no memory, no init."""
    import torch

    config = copy.deepcopy(model.config)
    if STRUCTURE_KEY in config.__dict__:
        delattr(config, STRUCTURE_KEY)
    if record is not None:
        setattr(config, STRUCTURE_KEY, copy.deepcopy(record))
    with torch.device("meta"):
        probe = type(model)(config)
    restore_structure(probe, family)
    return parameter_shapes(probe)


def record_structure(model: Any, family: Any) -> bool:
    """Make ``model.config`` describe the model's per-layer sizes; True when a record
    was needed (the model then reloads through :func:`load_structured_model` only).

    No record when the config alone rebuilds every parameter shape (stock reload);
    otherwise the measured sizes (:func:`measure_structure`). Raises ``ValueError`` when
    even the record cannot rebuild the model (a change this module cannot describe).
    """
    if STRUCTURE_KEY in model.config.__dict__:
        delattr(model.config, STRUCTURE_KEY)
    shapes = parameter_shapes(model)
    if rebuilt_shapes(model, family, None) == shapes:
        return False
    record = measure_structure(model, family)
    rebuilt = rebuilt_shapes(model, family, record)
    if rebuilt != shapes:
        differ = sorted(name for name in set(shapes) | set(rebuilt)
                        if shapes.get(name) != rebuilt.get(name))
        raise ValueError(f"the model's structure cannot be described by its config and a "
                         f"per-layer record; these tensors would not reload: {differ[:5]}")
    setattr(model.config, STRUCTURE_KEY, record)
    return True


def text_configs(model: Any, family: Any) -> list[Any]:
    """Every distinct config object the language model's modules read sizes from: the
    text config, the language model's own, and each attention / MLP module's."""
    candidates = [family.text_config(model),
                  getattr(family.language_model(model), "config", None)]
    for layer in family.decoder_layers(model):
        candidates.append(getattr(family.attention(layer), "config", None))
        candidates.append(getattr(family.mlp(layer), "config", None))
    unique: dict[int, Any] = {}
    for config in candidates:
        if config is not None:
            unique.setdefault(id(config), config)
    return list(unique.values())


def adopt_sizes_in_config(model: Any, family: Any, values: dict[str, int]) -> bool:
    """Write layer sizes every layer now shares (``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``intermediate_size``) into the text config(s),
    if the updated config still loads (it survives ``to_dict`` → ``from_dict``, which
    runs the config class's validation) and a model built from it has this model's
    shapes (with the measured per-layer record for whatever else differs). Reverted,
    returning False, when not: Qwen2.5-VL derives ``head_dim`` from ``hidden_size /
    heads`` whatever the config says, and transformers' ``LlamaConfig`` refuses a head
    count that does not divide ``hidden_size`` even with an explicit ``head_dim``.
    """
    missing = object()
    configs = text_configs(model, family)
    saved = [{name: config.__dict__.get(name, missing) for name in values} for config in configs]
    for config in configs:
        for name, value in values.items():
            setattr(config, name, value)
    if (_config_reloads(model.config) and all(_config_reloads(c) for c in configs)
            and rebuilt_shapes(model, family, measure_structure(model, family))
            == parameter_shapes(model)):
        return True
    for config, before in zip(configs, saved, strict=True):
        for name, value in before.items():
            if value is missing:
                delattr(config, name)
            else:
                setattr(config, name, value)
    return False


def _config_reloads(config: Any) -> bool:
    """Whether ``config`` can be rebuilt from its saved form (as loading it does)."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        type(config).from_dict(config.to_dict())
    except (StrictDataclassError, ValueError, TypeError):  # its class's validation refuses it
        return False
    return True


# --------------------------------------------------------------------------- loading


def model_class_for(auto_class: Any, config: Any) -> type:
    """The model class ``auto_class.from_pretrained`` would build for ``config``."""
    found = auto_class._model_mapping[type(config)]
    if isinstance(found, list | tuple):
        names = set(getattr(config, "architectures", None) or ())
        found = next((c for c in found if c.__name__ in names), found[0])
    return found


def load_structured_model(auto_class: Any, path: str, config: Any, **options: Any) -> Any:
    """Load a checkpoint whose config carries a structure record.

    The model class ``auto_class`` would use is built by ``from_pretrained`` (same
    options: dtype, attention implementation, revision, …) through a subclass that calls
    :func:`restore_structure` right after construction, so the checkpoint's weights load
    into correctly shaped modules; the loaded model is then given back its stock class.
    Loading is strict: any missing, unexpected or mis-shaped weight raises ``ValueError``.
    """
    from workers.models import family_for

    model_class = model_class_for(auto_class, config)

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **kwargs)
        restore_structure(self, family_for(self))

    shaped = type(model_class.__name__, (model_class,), {
        "__init__": __init__, "__module__": model_class.__module__,
        "__doc__": f"{model_class.__name__} shaped by its {STRUCTURE_KEY} record."})
    model, info = shaped.from_pretrained(path, config=config, output_loading_info=True,
                                         **options)
    model.__class__ = model_class  # a stock instance from here on (copy, pickle, save)
    problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
    if problems:
        raise ValueError(f"{path}: the weights do not match the per-layer structure recorded "
                         f"in its config ({STRUCTURE_KEY}): {problems}")
    return model
