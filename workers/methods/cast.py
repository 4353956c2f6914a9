"""Cast a model's weights to float16 or bfloat16 (the users' "FP16" variant).

What is cast: every floating-point parameter and every *persistent* floating-point
buffer, i.e. exactly the tensors ``save_pretrained`` writes. Non-persistent buffers
(rotary ``inv_freq`` tables, …) stay as the model code built them, because that is
what ``from_pretrained`` rebuilds when the variant is reloaded: the variant in memory
and its reloaded copy then give identical logits. Parameters that the model class
asks to keep in float32 (``_keep_in_fp32_modules`` for float16,
``_keep_in_fp32_modules_strict`` for float16 and bfloat16) stay float32, as
``from_pretrained(dtype=...)`` keeps them. The configs' ``dtype`` is updated so the
saved checkpoint reloads in the new dtype with stock ``from_pretrained``.

Device support: a device *supports* a dtype when a small linear layer (matmul + bias),
a layer norm, an RMS norm and a softmax run there in that dtype without error and give
finite results within :data:`SUPPORT_TOLERANCE` of the same computation in float32
(:func:`dtype_support`). Older torch versions had no float16 kernels on CPU for some
of these ops; a kernel that runs but returns wrong numbers is no support either.
float16 on a device without it is refused with the device named and bfloat16 suggested.

After the cast a probe forward pass must give finite logits: float16's range ends at
±65504, and a model whose activations exceed it is refused with the first module whose
output overflowed, rather than returning a variant that evaluates to NaN. Info records
the dtypes and the bytes per parameter before and after.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from workers.methods import MethodConfig, MethodContext, MethodOutcome, register_method

# Relative tolerance of the support check, a few units of each dtype's rounding error
# (float16: 2^-11 ≈ 4.9e-4, bfloat16: 2^-8 ≈ 3.9e-3) on results of magnitude ~1.
SUPPORT_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}

# A fixed English sentence for the probe forward pass (any tokenizer encodes it).
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. It was 1999, and all was well."


class CastConfig(MethodConfig):
    """The target dtype."""

    dtype: Literal["float16", "bfloat16"]


def _support_problem(device: str, dtype_name: str) -> str | None:
    """Why ``device`` does not support ``dtype_name`` (see module docstring); None when it does."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=generator)
    weight = torch.randn(16, 32, generator=generator) / 32**0.5
    bias = torch.randn(16, generator=generator)
    norm_weight = torch.rand(16, generator=generator) + 0.5

    def compute(x: Any, weight: Any, bias: Any, norm_weight: Any) -> list[Any]:
        hidden = F.linear(x, weight, bias)
        return [hidden, F.layer_norm(hidden, (16,), norm_weight),
                F.rms_norm(hidden, (16,), norm_weight, eps=1e-6), torch.softmax(hidden, dim=-1)]

    expected = compute(x, weight, bias, norm_weight)
    try:
        with torch.inference_mode():
            got = compute(*(t.to(device=device, dtype=dtype) for t in (x, weight, bias,
                                                                        norm_weight)))
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # no kernel for the dtype
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    names = ("matmul", "layer_norm", "rms_norm", "softmax")
    tolerance = SUPPORT_TOLERANCE[dtype_name]
    for name, want, have in zip(names, expected, got, strict=True):
        have = have.float().cpu()
        if have.dtype != torch.float32 or not bool(torch.isfinite(have).all()):
            return f"{name} in {dtype_name} gives non-finite values"
        error = float((have - want).abs().max())
        if error > tolerance * max(1.0, float(want.abs().max())):
            return f"{name} in {dtype_name} is off by {error:.3g} from float32"
    return None


@lru_cache(maxsize=16)
def dtype_support(device: str, dtype_name: str) -> str | None:
    """:func:`_support_problem`, measured once per process for each device and dtype."""
    return _support_problem(device, dtype_name)


def probe_input_ids(ctx: MethodContext) -> Any:
    """A [1, T] batch of :data:`PROBE_TEXT` tokens (BOS first when there is one)."""
    import torch

    ids = ctx.tokenizer.encode(PROBE_TEXT)
    if ctx.tokenizer.bos_id is not None:
        ids = [ctx.tokenizer.bos_id, *ids]
    return torch.tensor([ids], dtype=torch.long, device=ctx.device)


def first_non_finite_module(model: Any, input_ids: Any) -> str | None:
    """Name of the first module (in execution order) whose output has a NaN or an infinity
    on ``input_ids``; None when every output is finite."""
    import torch

    found: list[str] = []
    names = {id(module): name for name, module in model.named_modules()}

    def tensors(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, tuple | list):
            return [t for item in value for t in tensors(item)]
        return []

    def hook(module: Any, _args: Any, output: Any) -> None:
        if found:
            return
        for tensor in tensors(output):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                found.append(names.get(id(module)) or type(module).__name__)
                return

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    # Hooks fire on exit, so a parent finishes after its children: the first recorded
    # module is the innermost one that produced the first non-finite value.
    return found[0] if found else None


def check_finite_logits(model: Any, ctx: MethodContext, what: str) -> None:
    """Raise ``ValueError`` naming the first overflowing module when the probe logits of
    ``model`` (built by ``what``) are not all finite."""
    import torch

    probe = probe_input_ids(ctx)
    with torch.inference_mode():
        logits = model(input_ids=probe).logits
    if bool(torch.isfinite(logits).all()):
        return
    culprit = first_non_finite_module(model, probe)
    where = f"; the first module with a non-finite output is {culprit}" if culprit else ""
    raise ValueError(f"{what} gives non-finite logits on a probe sentence (its activations "
                     f"leave the dtype's range){where}")


def keeps_float32(model: Any, dtype_name: str) -> list[str]:
    """Patterns of parameters the model class keeps in float32 when loaded in ``dtype_name``
    (transformers' ``_keep_in_fp32_modules`` for float16, ``…_strict`` for both)."""
    patterns = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype_name == "float16":
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sorted(patterns)


def parameter_bytes(model: Any) -> tuple[int, int]:
    """(bytes, count) of the model's parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}
    return (sum(p.numel() * p.element_size() for p in unique.values()),
            sum(p.numel() for p in unique.values()))


def float_dtypes(model: Any) -> list[str]:
    """Names of the floating-point dtypes of the model's parameters."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                   if p.is_floating_point()})


def cast_model(model: Any, dtype_name: str) -> list[str]:
    """Cast parameters and persistent buffers to ``dtype_name`` in place (see module
    docstring); returns the names of the parameters kept in float32."""
    import torch

    dtype = getattr(torch, dtype_name)
    # transformers matches each pattern with a regex search in the parameter name,
    # "*" standing for any text (core_model_loading.build_glob_alternation).
    keep = [re.compile(p.replace("*", ".*")) for p in keeps_float32(model, dtype_name)]
    kept: list[str] = []
    done: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done or not param.is_floating_point():
                continue
            done.add(id(param))
            target = torch.float32 if any(k.search(prefix + name) for k in keep) else dtype
            if target != dtype:
                kept.append(prefix + name)
            with torch.no_grad():
                param.data = param.data.to(target)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if (buffer is None or not buffer.is_floating_point()
                    or name in module._non_persistent_buffers_set):
                continue
            module._buffers[name] = buffer.to(dtype)
    configs = [model.config, *(getattr(model.config, key, None)
                               for key in getattr(model.config, "sub_configs", {}) or {})]
    for config in configs:
        if config is not None:
            config.dtype = dtype
    return kept


@register_method(
    "cast", config=CastConfig,
    description="Cast the weights to float16 or bfloat16 (checked for device support and "
                "overflow).",
    rate_meaning="no rate: one variant per dtype",
    uses_rate=False,
)
def apply(model: Any, rate: None, config: CastConfig, ctx: MethodContext) -> MethodOutcome:
    """Cast ``model`` to ``config.dtype`` after checking the device supports it; refuse a
    variant whose probe logits are not finite."""
    import torch

    problem = dtype_support(ctx.device, config.dtype)
    if problem is not None:
        hint = ""
        if config.dtype == "float16":
            hint = ("; use dtype: bfloat16 instead" if dtype_support(ctx.device, "bfloat16")
                    is None else "; bfloat16 is not supported there either")
        raise ValueError(f"{config.dtype} is not supported on device {ctx.device} ({problem})"
                         f"{hint}")
    before = float_dtypes(model)
    if before == [config.dtype]:
        raise ValueError(f"the model is already in {config.dtype}: casting would change nothing")
    bytes_before, count = parameter_bytes(model)
    limit = torch.finfo(getattr(torch, config.dtype)).max
    kept = cast_model(model, config.dtype)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise ValueError(f"parameter {name} has values beyond the {config.dtype} range "
                             f"(±{limit:.5g}); use dtype: bfloat16, which has float32's range")
    check_finite_logits(model, ctx, f"the {config.dtype} variant")
    bytes_after, _ = parameter_bytes(model)
    info = {
        "dtype": config.dtype,
        "dtypes_before": before,
        "dtypes_after": float_dtypes(model),
        "kept_float32": kept,
        "bytes_per_parameter_before": bytes_before / count if count else 0.0,
        "bytes_per_parameter_after": bytes_after / count if count else 0.0,
        "device": ctx.device,
    }
    return MethodOutcome(model=model, info=info)
