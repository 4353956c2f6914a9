"""Quantize the weights of the model's linear layers to 8 or 4 bits.

Schemes (``scheme``):

- ``int8_dynamic`` (CPU only): ``torch.ao.quantization.quantize_dynamic`` replaces each
  chosen ``nn.Linear`` by a dynamically quantized linear: the weight is stored as qint8,
  symmetric, one scale per output channel; at run time each input tensor is quantized
  to 8 bits with one scale computed from the whole tensor (fbgemm / qnnpack), the
  product is computed in integers and dequantized to float32. Because that activation
  scale spans the whole input (every position and every sequence of the batch), a
  token's output depends, by a rounding amount, on the other tokens of the batch,
  future ones included. The trial's causality check sees this and refuses the variant
  (on aidreams260K the logits before position t move by up to 0.92 when later tokens
  change; its threshold is 1e-4 of the logit scale). The model must be float32 (the
  quantized kernels take float32 input). Refused on CUDA.
- ``int8_weight_only`` / ``int4_weight_only`` (CUDA only): weights stored in 8 / 4 bits
  and dequantized for the matmul, through torchao (``Int8WeightOnlyConfig``: per output
  channel; ``Int4WeightOnlyConfig``: groups of 128 along the input, tinygemm's
  ``tile_packed_to_4d`` layout, which needs a bfloat16 model and a GPU of compute
  capability 8.0 or more) or bitsandbytes (``Linear8bitLt``: LLM.int8(), int8 weights
  per output row with int8 row-wise activations and float16 outlier columns above 6.0;
  ``Linear4bit``: NF4 in blocks of 64, computed in the model's dtype). ``library: auto``
  takes torchao when it is installed, else bitsandbytes. Refused on CPU, and when no
  library for the scheme is installed (:func:`weight_only_libraries`).

``skip`` lists module-name patterns (``fnmatch``: ``lm_head``, ``*.vision_tower.*``) kept
in floating point; a pattern also covers the modules inside the module it names. By
default the LM head and the input embeddings are kept. Modules whose weight the model
code reads directly instead of calling them (Mamba's ``dt_proj``: ``dt_proj.weight @ x``)
cannot be replaced and are always kept (:data:`READ_DIRECTLY`).

Info records the quantized and kept modules, and the bytes per parameter before and
after: bytes of all tensors (``workers.trial.model_bytes``'s definition: a qint8 weight
is 1 byte per value plus a float64 scale and an int64 zero point per output channel)
divided by the number of parameters of the float model (the quantized weights are
no longer parameters of the variant, but they are still its weights).

Quantized variants are evaluated in the process that built them: saving them with
``save_pretrained`` and reloading with ``from_pretrained`` is not supported (the packed
torch.ao weights are not transformers checkpoint tensors).
"""

from __future__ import annotations

import importlib
import warnings
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import model_validator

from workers.methods import MethodConfig, MethodContext, MethodOutcome, register_method
from workers.methods.cast import check_finite_logits

# Linear layers whose weight the family's model code reads as a tensor (so a quantized
# replacement breaks it): transformers' Mamba mixer computes ``dt_proj.weight @ x``.
READ_DIRECTLY: dict[str, tuple[str, ...]] = {"mamba": ("*.dt_proj",)}

WEIGHT_ONLY_LIBRARIES = ("torchao", "bitsandbytes")
INT4_GROUP_SIZE = 128
BNB_INT8_THRESHOLD = 6.0

# torch.ao's eager quantization warns on every call that it is deprecated in favour of
# torchao; the warning says nothing about this model, so it is silenced here.
_DEPRECATION_MESSAGES = ("torch.ao.quantization is deprecated",
                         "torch.quantize_per_tensor, torch.quantize_per_channel")


class QuantizeConfig(MethodConfig):
    """The scheme, the modules kept in floating point, the library for weight-only schemes."""

    scheme: Literal["int8_dynamic", "int8_weight_only", "int4_weight_only"]
    skip: list[str] | None = None
    """Module-name patterns kept in floating point; None = the LM head and embeddings."""
    library: Literal["auto", "torchao", "bitsandbytes"] = "auto"

    @model_validator(mode="after")
    def _library_only_for_weight_only(self) -> QuantizeConfig:
        if self.scheme == "int8_dynamic" and self.library != "auto":
            raise ValueError("library applies to int8_weight_only / int4_weight_only; "
                             "int8_dynamic always uses torch.ao")
        return self


def weight_only_libraries() -> dict[str, str | None]:
    """Version of each weight-only quantization library that imports here (None when it is
    missing or fails to import, e.g. bitsandbytes built for another CUDA)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in WEIGHT_ONLY_LIBRARIES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            found[name] = None
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = str(getattr(module, "__version__", "unknown"))
    return found


def module_names(model: Any, module: Any) -> list[str]:
    """Names under which ``module`` appears in ``model`` (empty when it does not)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module]


def default_skip(model: Any, family: Any) -> list[str]:
    """The LM head's and the input embeddings' module names."""
    names: list[str] = []
    for accessor in (family.lm_head, family.embeddings):
        module = accessor(model)
        if module is not None:
            names.extend(module_names(model, module))
    return sorted(set(names))


def _matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` or one of its parent modules matches one of ``patterns``."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:end]), pattern)
               for pattern in patterns for end in range(1, len(parts) + 1))


def choose_linears(model: Any, family: Any, skip: list[str] | None) -> tuple[list[str],
                                                                              list[str]]:
    """(names of the ``nn.Linear`` modules to quantize, names of those kept in float).

    ``skip`` None means :func:`default_skip`; the family's :data:`READ_DIRECTLY` modules
    are always kept. A pattern of ``skip`` that matches no module is an error (a typo
    would otherwise quantize what the user meant to keep).
    """
    import torch

    patterns = default_skip(model, family) if skip is None else list(skip)
    every = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(_matches(name, [pattern]) for name in every):
            raise ValueError(f"skip pattern {pattern!r} matches no module of the model")
    patterns += list(READ_DIRECTLY.get(family.name, ()))
    linears = [name for name, module in model.named_modules()
               if type(module) is torch.nn.Linear]
    kept = [name for name in linears if _matches(name, patterns)]
    chosen = [name for name in linears if name not in kept]
    if not chosen:
        raise ValueError(f"no nn.Linear module is left to quantize ({len(linears)} linear "
                         f"layers, all kept by skip={patterns}); quantization would change "
                         "nothing")
    return chosen, kept


def _device_type(ctx: MethodContext) -> str:
    return str(ctx.device).split(":", 1)[0]


def _float_dtypes(model: Any) -> set[Any]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def quantize_int8_dynamic(model: Any, names: list[str]) -> None:
    """Replace the linears ``names`` by torch.ao dynamic qint8 linears (per-channel weights)."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # announced for removal upstream in favour of torchao
        raise ValueError(f"int8_dynamic needs torch.ao.quantization, which this torch "
                         f"({torch.__version__}) does not have: {exc}") from exc
    if torch.backends.quantized.engine in (None, "none"):
        raise ValueError("int8_dynamic: this torch build has no quantized engine "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names},
                         inplace=True)


def _torchao_weight_only(model: Any, names: list[str],
                         scheme: str) -> tuple[list[str], dict[str, Any]]:
    import torch
    from torchao.quantization import quantize_

    if scheme == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
        detail: dict[str, Any] = {"granularity": "per output channel"}
    else:
        from torchao.quantization import Int4WeightOnlyConfig

        if _float_dtypes(model) != {torch.bfloat16}:
            raise ValueError("int4_weight_only with torchao (tinygemm int4 kernels) needs a "
                             "bfloat16 model; load it with dtype: bfloat16, or use library: "
                             "bitsandbytes")
        capability = torch.cuda.get_device_capability()
        if capability[0] < 8:
            raise ValueError(f"int4_weight_only with torchao needs a GPU of compute capability "
                             f"8.0 or more; this one has {capability[0]}.{capability[1]}: use "
                             "library: bitsandbytes")
        try:
            config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE,
                                          int4_packing_format="tile_packed_to_4d")
        except TypeError as exc:
            raise ValueError("this torchao has no Int4WeightOnlyConfig(int4_packing_format=...) "
                             f"({exc}): upgrade torchao") from exc
        # torchao leaves a weight whose input width is not a multiple of the group size
        # as it is (and only logs it): keep such layers out of the quantized list.
        names = [n for n in names if model.get_submodule(n).in_features % INT4_GROUP_SIZE == 0]
        if not names:
            raise ValueError(f"int4_weight_only: no linear layer has an input width divisible "
                             f"by the group size {INT4_GROUP_SIZE}")
        detail = {"group_size": INT4_GROUP_SIZE, "packing": "tile_packed_to_4d"}
    chosen = set(names)
    quantize_(model, config, filter_fn=lambda _module, fqn: fqn in chosen)
    return names, detail


def _bitsandbytes_weight_only(model: Any, names: list[str], scheme: str,
                              device: str) -> tuple[list[str], dict[str, Any]]:
    import bitsandbytes as bnb

    compute_dtype = next(iter(_float_dtypes(model)))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        has_bias = linear.bias is not None
        if scheme == "int8_weight_only":
            replacement = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                              bias=has_bias, has_fp16_weights=False,
                                              threshold=BNB_INT8_THRESHOLD)
        else:
            replacement = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                            bias=has_bias, compute_dtype=compute_dtype,
                                            quant_type="nf4")
        # bitsandbytes' documented path: float weights loaded into the (CPU) module are
        # quantized when the module moves to the GPU.
        replacement.load_state_dict(linear.state_dict())
        setattr(parent, child, replacement.to(device))
    if scheme == "int8_weight_only":
        return names, {"method": "LLM.int8()", "outlier_threshold": BNB_INT8_THRESHOLD}
    return names, {"quant_type": "nf4", "blocksize": 64,
                   "compute_dtype": str(compute_dtype).removeprefix("torch.")}


def quantize_weight_only(model: Any, names: list[str], scheme: str, library: str,
                         device: str) -> tuple[list[str], dict[str, Any]]:
    """Quantize the linears ``names`` weight-only with ``library`` (``auto``: torchao,
    else bitsandbytes); returns the names actually quantized and what was used. Refuses
    when no library for it is installed."""
    available = weight_only_libraries()
    installed = [name for name in WEIGHT_ONLY_LIBRARIES if available.get(name)]
    if library == "auto":
        if not installed:
            raise ValueError(f"{scheme} needs torchao or bitsandbytes and neither is installed "
                             "here: pip install torchao (or bitsandbytes)")
        library = installed[0]
    elif not available.get(library):
        raise ValueError(f"{scheme} with library {library} needs {library}, which is not "
                         f"installed here: pip install {library}"
                         + (f", or use library: {installed[0]}" if installed else ""))
    if library == "torchao":
        done, detail = _torchao_weight_only(model, names, scheme)
    else:
        done, detail = _bitsandbytes_weight_only(model, names, scheme, device)
    return done, {"library": library, "library_version": available[library], **detail}


@register_method(
    "quantize", config=QuantizeConfig,
    description="Quantize linear layers: int8 dynamic (CPU, torch.ao) or int8/int4 weight-only "
                "(GPU, torchao or bitsandbytes).",
    rate_meaning="no rate: one variant per scheme",
    uses_rate=False,
)
def apply(model: Any, rate: None, config: QuantizeConfig, ctx: MethodContext) -> MethodOutcome:
    """Quantize the chosen linear layers of ``model`` with ``config.scheme``; the variant
    must still give finite probe logits."""
    from workers.trial import model_bytes  # the definition the trial's size_mb uses

    device_type = _device_type(ctx)
    if config.scheme == "int8_dynamic" and device_type != "cpu":
        raise ValueError(f"int8_dynamic runs on CPU only (torch.ao dynamic quantization has no "
                         f"{device_type} kernels) and this trial's device is {ctx.device}: use "
                         "scheme int8_weight_only or int4_weight_only on a GPU")
    if config.scheme != "int8_dynamic" and device_type != "cuda":
        raise ValueError(f"{config.scheme} needs a CUDA GPU (its kernels are GPU-only) and "
                         f"this trial's device is {ctx.device}: use scheme int8_dynamic on CPU")
    import torch

    if config.scheme == "int8_dynamic" and _float_dtypes(model) != {torch.float32}:
        dtypes = sorted(str(d).removeprefix("torch.") for d in _float_dtypes(model))
        raise ValueError(f"int8_dynamic needs a float32 model (its kernels take float32 "
                         f"input); this one is {', '.join(dtypes)}: load it with dtype: float32")
    chosen, kept = choose_linears(model, ctx.family, config.skip)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    bytes_before = model_bytes(model)
    sizes = {name: sum(p.numel() for p in model.get_submodule(name).parameters())
             for name in chosen}
    if config.scheme == "int8_dynamic":
        quantize_int8_dynamic(model, chosen)
        detail = {"library": "torch.ao", "weights": "qint8, per output channel",
                  "activations": "quint8, one scale per input tensor, at run time",
                  "engine": torch.backends.quantized.engine}
    else:
        done, detail = quantize_weight_only(model, chosen, config.scheme, config.library,
                                            ctx.device)
        kept += [name for name in chosen if name not in done]
        chosen = done
    check_finite_logits(model, ctx, f"the {config.scheme} variant")
    bytes_after = model_bytes(model)
    info = {
        "scheme": config.scheme,
        **detail,
        "quantized_modules": chosen,
        "kept_modules": kept,
        "skip": config.skip,
        "parameters": parameters,
        "quantized_parameters": sum(sizes[name] for name in chosen),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "bytes_per_parameter_before": bytes_before / parameters if parameters else 0.0,
        "bytes_per_parameter_after": bytes_after / parameters if parameters else 0.0,
    }
    return MethodOutcome(model=model, info=info)
