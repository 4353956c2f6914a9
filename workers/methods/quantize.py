"""Quantize the weights of the model's linear layers to 8 or 4 bits.

Schemes (``scheme``; the default is ``int8_dynamic``):

- ``int8_dynamic`` (CPU only): each chosen ``nn.Linear`` becomes an
  :class:`Int8PerTokenLinear` (this module), per-token dynamic int8 quantization. Its
  weight ``W`` (out × in) is stored as int8 ``Wq`` with one float32 scale per output
  channel, ``s_w[o] = max_i |W[o, i]| / 127``, ``Wq = round(W / s_w)`` (symmetric, in
  [-127, 127]; ``round`` is half to even). At run time every row ``x`` of the input (one
  token position of one sequence) is quantized with its own scale ``s_x = max |x| / 127``,
  ``xq = round(x / s_x)``; the product is computed in integers with int32 accumulation and
  rescaled: ``y[o] = (Σ_i xq[i]·Wq[o, i]) · s_x · s_w[o] + b[o]`` (float32; the bias stays
  float). A zero row gets scale 0 and output ``b``. Because a position's scale depends on
  that position only, the layer is exactly position-wise and a causal model stays causal
  (the trial's causality check measures 0). The integer product is ``torch._int_mm``
  (on CPU in torch 2.13 it takes any 2-D int8 × int8 pair of matching inner size: no
  size or alignment constraint, measured; the CUDA kernel's constraints do not apply, the
  layer runs on CPU only), or, when this torch has no ``_int_mm``, an int32 matmul of the
  same int8 values (exact too, but then the layer is ~60x slower, ~13x slower than float32
  on 512 × 2048 through 2048 × 2048, one thread); both are exact because the layer refuses
  input widths above :data:`MAX_INT8_INPUT_FEATURES` (where ``in · 127²`` would overflow
  int32). The weights are still weights of the model: ``workers.trial.parameter_count``
  counts the int8 values as parameters, ``model_bytes`` counts the int8 weight and
  float32 scale buffers.
- ``int8_dynamic_per_tensor`` (CPU only): ``torch.ao.quantization.quantize_dynamic``
  replaces each chosen ``nn.Linear`` by a dynamically quantized linear: the weight is
  stored as qint8, symmetric, one scale per output channel; at run time each input tensor
  is quantized to 8 bits with ONE scale computed from the whole tensor (fbgemm /
  qnnpack), the product is computed in integers and dequantized to float32. Because that
  activation scale spans the whole input (every position and every sequence of the
  batch), a token's output depends, by a rounding amount, on the other tokens of the
  batch, future ones included: the variant is NOT causal, and its language-model
  evaluations are invalid by construction. The trial's causality check sees this and
  refuses the variant (on aidreams260K the logits before position t move by up to 0.92
  when later tokens change; its threshold is 1e-4 of the logit scale). Kept to measure
  exactly that, and for models that are not evaluated as causal language models.
- Both int8 dynamic schemes need a float32 model (torch.ao's kernels take float32 input;
  the per-token layer computes its scales and rescaled outputs in float32) and are
  refused on CUDA.
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

Info records the quantized and kept modules, the number of weight values stored in int8
(``quantized_parameters``), and the bytes per parameter before and after: bytes of all
tensors (``workers.trial.model_bytes``'s definition: a torch.ao qint8 weight is 1 byte per
value plus a float64 scale and an int64 zero point per output channel; an
:class:`Int8PerTokenLinear` 1 byte per value plus a float32 scale per output channel)
divided by the number of parameters of the float model.

Quantized variants are evaluated in the process that built them: saving them with
``save_pretrained`` and reloading with ``from_pretrained`` is not supported (neither the
packed torch.ao weights nor :class:`Int8PerTokenLinear`'s int8 buffers are tensors a stock
transformers model class knows how to load).
"""

from __future__ import annotations

import importlib
import warnings
from fnmatch import fnmatchcase
from functools import lru_cache
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
DYNAMIC_SCHEMES = ("int8_dynamic", "int8_dynamic_per_tensor")

INT8_MAX = 127
MAX_INT8_INPUT_FEATURES = (2**31 - 1) // INT8_MAX**2
"""Widest input of an :class:`Int8PerTokenLinear`: a dot product of this many int8 values
in [-127, 127] cannot overflow its int32 accumulator."""

# torch.ao's eager quantization warns on every call that it is deprecated in favour of
# torchao; the warning says nothing about this model, so it is silenced here.
_DEPRECATION_MESSAGES = ("torch.ao.quantization is deprecated",
                         "torch.quantize_per_tensor, torch.quantize_per_channel")


class QuantizeConfig(MethodConfig):
    """The scheme, the modules kept in floating point, the library for weight-only schemes."""

    scheme: Literal["int8_dynamic", "int8_dynamic_per_tensor", "int8_weight_only",
                    "int4_weight_only"] = "int8_dynamic"
    skip: list[str] | None = None
    """Module-name patterns kept in floating point; None = the LM head and embeddings."""
    library: Literal["auto", "torchao", "bitsandbytes"] = "auto"

    @model_validator(mode="after")
    def _library_only_for_weight_only(self) -> QuantizeConfig:
        if self.scheme in DYNAMIC_SCHEMES and self.library != "auto":
            raise ValueError("library applies to int8_weight_only / int4_weight_only; "
                             "int8_dynamic uses this project's per-token int8 linear and "
                             "int8_dynamic_per_tensor torch.ao")
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


def quantize_rows(t: Any) -> tuple[Any, Any]:
    """``(q, scale)``: each row of the 2-D float32 tensor ``t`` quantized to int8 with its own
    symmetric scale ``max |row| / 127``: ``q = round(t / scale)`` (half to even) clamped to
    [-127, 127], ``scale`` float32 of shape (rows, 1). A zero row has scale 0 and q 0."""
    import torch

    scale = t.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(t / divisor).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_matmul(a: Any, w: Any) -> Any:
    """``a @ w.T`` for int8 matrices ``a`` (m × k) and ``w`` (n × k), exactly, as int32.

    ``torch._int_mm`` when this torch has it: on CPU (torch 2.13) it takes any 2-D int8 ×
    int8 pair of matching inner size, with no constraint on the sizes (unlike its CUDA
    kernel; this layer runs on CPU only). Otherwise an int32 matmul of the same values.
    Both are exact for k ≤ :data:`MAX_INT8_INPUT_FEATURES`.
    """
    import torch

    if hasattr(torch, "_int_mm"):
        return torch._int_mm(a, w.t())
    return a.to(torch.int32) @ w.t().to(torch.int32)


def int8_matmul_kernel() -> str:
    """The name of what :func:`int8_matmul` runs in this torch."""
    import torch

    return "torch._int_mm" if hasattr(torch, "_int_mm") else "int32 matmul (no torch._int_mm)"


@lru_cache(maxsize=1)
def _per_token_linear_class() -> type:
    # Defined on first use: importing this module (the method registry, read on the
    # driver) must not import torch.
    import torch

    class Int8PerTokenLinear(torch.nn.Module):
        """A linear layer with int8 weights, one symmetric float32 scale per output channel,
        whose input is quantized to int8 one row (token position) at a time with its own
        scale: scheme ``int8_dynamic`` (see the module docstring for the exact definition).

        The int8 weight and its scales are buffers (``weight_int8``, ``weight_scale``), so
        ``state_dict`` and the trial's ``model_bytes`` see them; the float bias stays a
        parameter. Build it from a float ``nn.Linear`` with :meth:`from_linear`.
        """

        def __init__(self, in_features: int, out_features: int, bias: bool = True,
                     device: Any = None, dtype: Any = torch.float32) -> None:
            super().__init__()
            if not 0 < in_features <= MAX_INT8_INPUT_FEATURES:
                raise ValueError(f"Int8PerTokenLinear takes 1 to {MAX_INT8_INPUT_FEATURES} "
                                 f"input features (beyond, an int8 dot product can overflow "
                                 f"its int32 accumulator); got {in_features}")
            self.in_features = in_features
            self.out_features = out_features
            self.register_buffer("weight_int8", torch.zeros(
                out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.zeros(
                out_features, dtype=torch.float32, device=device))
            if bias:
                self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype,
                                                           device=device))
            else:
                self.register_parameter("bias", None)

        @classmethod
        def from_linear(cls, linear: Any) -> Any:
            """The int8 twin of the float ``nn.Linear`` ``linear`` (same bias, same mode)."""
            weight = linear.weight.detach()
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                        device=weight.device, dtype=weight.dtype)
            values, scales = quantize_rows(weight.float())
            with torch.no_grad():
                layer.weight_int8.copy_(values)
                layer.weight_scale.copy_(scales.squeeze(1))
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias.detach())
                    layer.bias.requires_grad_(linear.bias.requires_grad)
            return layer.train(linear.training)

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features).float()
            values, scales = quantize_rows(rows)
            out = int8_matmul(values, self.weight_int8).to(torch.float32)
            out.mul_(scales).mul_(self.weight_scale)
            if self.bias is not None:
                out.add_(self.bias)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"bias={self.bias is not None}, weights=int8 per output channel, "
                    "activations=int8 per token")

    Int8PerTokenLinear.__qualname__ = "Int8PerTokenLinear"
    return Int8PerTokenLinear


def __getattr__(name: str) -> Any:
    # ``Int8PerTokenLinear`` is a torch class built on first access (see above).
    if name == "Int8PerTokenLinear":
        return _per_token_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize_int8_per_token(model: Any, names: list[str]) -> None:
    """Replace the linears ``names`` by :class:`Int8PerTokenLinear` (under every name each
    one appears, so a shared linear stays shared)."""
    layer_class = _per_token_linear_class()
    replaced: dict[int, Any] = {}
    targets: list[tuple[str, Any]] = []
    for name in names:
        linear = model.get_submodule(name)
        if id(linear) not in replaced:
            replaced[id(linear)] = layer_class.from_linear(linear)
            targets += [(alias, replaced[id(linear)]) for alias in module_names(model, linear)]
    for alias, layer in targets:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)


def quantize_int8_dynamic_per_tensor(model: Any, names: list[str]) -> None:
    """Replace the linears ``names`` by torch.ao dynamic qint8 linears (per-channel weights,
    one activation scale per input tensor: not causal)."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # announced for removal upstream in favour of torchao
        raise ValueError(f"int8_dynamic_per_tensor needs torch.ao.quantization, which this torch "
                         f"({torch.__version__}) does not have: {exc}") from exc
    if torch.backends.quantized.engine in (None, "none"):
        raise ValueError("int8_dynamic_per_tensor: this torch build has no quantized engine "
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
    description="Quantize linear layers: int8 dynamic per token (CPU, causal), int8 dynamic "
                "per tensor (CPU, torch.ao, not causal) or int8/int4 weight-only (GPU, torchao "
                "or bitsandbytes).",
    rate_meaning="no rate: one variant per scheme",
    uses_rate=False,
)
def apply(model: Any, rate: None, config: QuantizeConfig, ctx: MethodContext) -> MethodOutcome:
    """Quantize the chosen linear layers of ``model`` with ``config.scheme``; the variant
    must still give finite probe logits."""
    # The definitions behind the trial's params and size_mb.
    from workers.trial import model_bytes, parameter_count

    device_type = _device_type(ctx)
    dynamic = config.scheme in DYNAMIC_SCHEMES
    if dynamic and device_type != "cpu":
        raise ValueError(f"{config.scheme} runs on CPU only (its int8 kernels are CPU ones: "
                         f"torch._int_mm / torch.ao; none is wired for {device_type}) and this "
                         f"trial's device is {ctx.device}: use scheme int8_weight_only or "
                         "int4_weight_only on a GPU")
    if not dynamic and device_type != "cuda":
        raise ValueError(f"{config.scheme} needs a CUDA GPU (its kernels are GPU-only) and "
                         f"this trial's device is {ctx.device}: use scheme int8_dynamic on CPU")
    import torch

    if dynamic and _float_dtypes(model) != {torch.float32}:
        dtypes = sorted(str(d).removeprefix("torch.") for d in _float_dtypes(model))
        raise ValueError(f"{config.scheme} needs a float32 model (its scales and rescaled "
                         f"outputs are float32, torch.ao's kernels take float32 input); this "
                         f"one is {', '.join(dtypes)}: load it with dtype: float32")
    chosen, kept = choose_linears(model, ctx.family, config.skip)
    parameters = parameter_count(model)
    bytes_before = model_bytes(model)
    weights = {name: model.get_submodule(name).weight.numel() for name in chosen}
    if config.scheme == "int8_dynamic":
        quantize_int8_per_token(model, chosen)
        detail = {"library": "compress-sweep (Int8PerTokenLinear)",
                  "weights": "int8, symmetric, one float32 scale per output channel",
                  "activations": "int8, symmetric, one scale per token (input row), at run "
                                 "time",
                  "matmul": int8_matmul_kernel(), "causal": True}
    elif config.scheme == "int8_dynamic_per_tensor":
        quantize_int8_dynamic_per_tensor(model, chosen)
        detail = {"library": "torch.ao", "weights": "qint8, per output channel",
                  "activations": "quint8, one scale per input tensor, at run time",
                  "engine": torch.backends.quantized.engine, "causal": False}
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
        "quantized_parameters": sum(weights[name] for name in chosen),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "bytes_per_parameter_before": bytes_before / parameters if parameters else 0.0,
        "bytes_per_parameter_after": bytes_after / parameters if parameters else 0.0,
    }
    return MethodOutcome(model=model, info=info)
