"""Mamba (``MambaForCausalLM``): a state-space model without attention.

Blocks at ``model.backbone.layers``; each block is ``norm`` (RMSNorm) then ``mixer``
(``MambaMixer``: ``in_proj`` → causal depthwise ``conv1d`` → selective scan with
``x_proj``/``dt_proj``/``A_log``/``D`` → ``out_proj``). There are no attention heads
and no separate MLP, so head-level methods are refused with a ``ValueError`` that says
so, instead of failing later on a missing attribute.

Kernels. transformers runs Mamba's selective scan through ``mamba_ssm`` and its
convolution through ``causal_conv1d`` when those packages import, and through its
reference PyTorch code otherwise (``modeling_mamba`` binds each function once, at
import, via ``use_kernel_func_from_hub_with_fallback``). Both packages are CUDA-only;
transformers' availability checks ``is_mamba_ssm_available()`` and
``is_causal_conv1d_available()`` (``transformers.utils.import_utils``) are true only
when the package is installed *and* CUDA is available. Which path a loaded model runs
is recorded in ``LoadedModel.info`` (:meth:`MambaFamily.runtime_info`): a kernel is
used only on a CUDA device, when transformers reports it available and bound it.
"""

from __future__ import annotations

from typing import Any

from workers.models import ModelFamily, register_model_family

# transformers' function in modeling_mamba → the package whose kernel replaces it.
KERNEL_FUNCTIONS = {
    "mamba_selective_scan": "mamba_ssm",
    "mamba_selective_state_update": "mamba_ssm",
    "mamba_inner_fn": "mamba_ssm",
    "causal_conv1d_fn": "causal_conv1d",
    "causal_conv1d_update": "causal_conv1d",
}


def kernel_availability() -> dict[str, bool]:
    """transformers' own availability checks of the CUDA kernel packages."""
    from transformers.utils import import_utils

    return {"mamba_ssm": bool(import_utils.is_mamba_ssm_available()),
            "causal_conv1d": bool(import_utils.is_causal_conv1d_available())}


def bound_kernels() -> dict[str, bool | None]:
    """For each package: whether transformers bound its kernel into ``modeling_mamba``
    (None when that cannot be read, e.g. if transformers changes how it wraps them)."""
    import inspect

    from transformers.models.mamba import modeling_mamba

    bound: dict[str, bool | None] = {}
    for function_name, package in KERNEL_FUNCTIONS.items():
        function = getattr(modeling_mamba, function_name, None)
        try:
            flag = inspect.getclosurevars(function).nonlocals.get("is_new_implementation")
        except TypeError:
            flag = None
        flag = flag if isinstance(flag, bool) else None
        previous = bound.get(package, True)
        # A package counts as bound only if every one of its functions is.
        bound[package] = None if flag is None or previous is None else (previous and flag)
    return bound


def select_kernels(device_type: str, available: dict[str, bool],
                   bound: dict[str, bool | None]) -> dict[str, str]:
    """The implementation of the scan and of the convolution on ``device_type``.

    A package's kernel runs only on CUDA, when transformers reports it available and
    bound it (an unknown binding counts as bound when available: transformers binds
    whatever imports). Everything else runs transformers' PyTorch reference code.
    """
    def choose(package: str) -> str:
        usable = (device_type == "cuda" and available.get(package, False)
                  and bound.get(package) is not False)
        return package if usable else "pytorch"

    return {"selective_scan": choose("mamba_ssm"), "causal_conv1d": choose("causal_conv1d")}


@register_model_family("mamba")
class MambaFamily(ModelFamily):
    """Mamba: blocks at ``model.backbone.layers``, ``mixer`` and ``norm`` per block."""

    model_types = ("mamba",)
    has_attention = False

    def language_model(self, model: Any) -> Any:
        return model.backbone

    def final_norm(self, model: Any) -> Any:
        return model.backbone.norm_f

    def mixer(self, layer: Any) -> Any:
        """The block's ``MambaMixer`` (projections, convolution and selective scan)."""
        return layer.mixer

    def norms(self, layer: Any) -> dict[str, Any]:
        return {"norm": layer.norm}

    def runtime_info(self, model: Any) -> dict[str, Any]:
        """Which implementation the scan and the convolution use on the model's device."""
        device_type = next(model.parameters()).device.type
        available = kernel_availability()
        bound = bound_kernels()
        kernels = select_kernels(device_type, available, bound)
        info: dict[str, Any] = {
            "mamba_kernels": kernels,
            "mamba_cuda_kernels": all(v != "pytorch" for v in kernels.values()),
        }
        if device_type != "cuda" and any(bound.values()):
            # transformers binds a kernel wherever its package imports, whatever the device
            # the model is on: a CUDA kernel fed CPU tensors fails at the first forward.
            info["mamba_kernel_warning"] = (
                f"transformers bound CUDA kernels ({', '.join(p for p, b in bound.items() if b)})"
                f" but the model is on {device_type}; its forward will fail there")
        return info

    # Mamba has no attention heads and no MLP: say so instead of an AttributeError.

    def num_heads(self, model: Any) -> int:
        raise self._no_attention()

    def num_kv_heads(self, model: Any) -> int:
        raise self._no_attention()

    def head_dim(self, model: Any) -> int:
        raise self._no_attention()

    def attention(self, layer: Any) -> Any:
        raise self._no_attention()

    def attention_projections(self, layer: Any) -> dict[str, Any]:
        raise self._no_attention()

    def attention_output_projection(self, layer: Any) -> Any:
        raise self._no_attention()

    def mlp(self, layer: Any) -> Any:
        raise ValueError("mamba blocks have no MLP; the mixer (in_proj, out_proj) holds their "
                         "projections")

    def mlp_projections(self, layer: Any) -> dict[str, Any]:
        return self.mlp(layer)
