"""Zero the least important attention heads, baked into the output projection.

Importance of a head = mean |value| of that head's output (the slice of ``o_proj``'s
input belonging to it) over calibration text. The ``round(rate · H_total)`` least
important heads (``scope: global``, ranked over all layers) or ``round(rate · H)`` per
layer (``scope: layer``) are masked by zeroing their columns of ``o_proj.weight``:
the head's contribution to the residual stream is removed in the weights themselves,
so the mask survives save → reload (no runtime hook, no ``head_mask`` argument, which
Llama-family models in transformers 5 do not have). The parameter count is unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from workers.data import token_stream
from workers.methods import (
    MethodContext,
    MethodOutcome,
    TextCalibration,
    register_method,
    run_calibration,
)


class HeadMaskConfig(TextCalibration):
    """Ranking scope and calibration text."""

    scope: Literal["global", "layer"] = "global"


def head_importance(model: Any, family: Any, batches: list[Any]) -> Any:
    """Tensor [layers, heads]: mean |output| of each head over the calibration tokens."""
    import torch

    layers = family.decoder_layers(model)
    heads, head_dim = family.num_heads(model), family.head_dim(model)
    totals = torch.zeros(len(layers), heads, dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(index: int):
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)  # [batch, seq, heads * head_dim]
            per_head = x.reshape(*x.shape[:-1], heads, head_dim).abs().mean(dim=-1)
            totals[index] += per_head.reshape(-1, heads).sum(dim=0)
            counts[index] += per_head.reshape(-1, heads).shape[0]
        return hook

    run_calibration(model, batches, [(family.attention_output_projection(layer), hook_for(i))
                                     for i, layer in enumerate(layers)])
    return totals / counts.clamp(min=1).unsqueeze(1)


def select_heads(importance: Any, rate: float, scope: str) -> list[tuple[int, int]]:
    """(layer, head) pairs to mask: the least important ones, ties broken by position."""
    layers, heads = importance.shape
    order = sorted((float(importance[l_, h]), l_, h) for l_ in range(layers)
                    for h in range(heads))
    if scope == "global":
        count = max(1, round(rate * layers * heads))
        return sorted((l_, h) for _, l_, h in order[:count])
    per_layer = max(1, round(rate * heads))
    if per_layer >= heads:
        raise ValueError(f"rate {rate} would mask all {heads} heads of every layer")
    chosen = []
    for layer in range(layers):
        ranked = [(v, l_, h) for v, l_, h in order if l_ == layer]
        chosen.extend((layer, h) for _, _, h in ranked[:per_layer])
    return sorted(chosen)


def calibration_batches(ctx: MethodContext, config: HeadMaskConfig) -> list[Any]:
    """Token batches of ``calibration_length`` from the calibration text (BOS-separated)."""
    import torch

    documents = ctx.calibration_documents(config.calibration_dataset, config.calibration_split,
                                          ctx.seed)
    needed = config.calibration_samples * config.calibration_length
    ids = token_stream(ctx.tokenizer, documents, max_tokens=needed)
    if len(ids) < config.calibration_length:
        raise ValueError(f"calibration text {config.calibration_dataset} has only {len(ids)} "
                         f"tokens; need at least calibration_length={config.calibration_length}")
    samples = [ids[i:i + config.calibration_length]
               for i in range(0, len(ids) - config.calibration_length + 1,
                              config.calibration_length)][: config.calibration_samples]
    tensor = torch.tensor(samples, dtype=torch.long, device=ctx.device)
    return list(tensor.split(8))


def cached_head_importance(model: Any, ctx: MethodContext, config: TextCalibration) -> Any:
    """:func:`head_importance` of the base ``model`` on ``config``'s calibration text,
    computed once per base model, calibration set and seed in a worker process: a sweep
    over rates (and ``prune_heads`` on the same base) calibrates once."""
    family = ctx.family
    layers = family.decoder_layers(model)
    # The shapes are in the key: importance of another structure must never be reused.
    key = ("head_importance", config.calibration_dataset, config.calibration_split,
           config.calibration_samples, config.calibration_length, ctx.seed,
           len(layers), family.num_heads(model), family.num_kv_heads(model),
           family.head_dim(model))
    return ctx.cached(key, lambda: head_importance(model, family,
                                                   calibration_batches(ctx, config)))


@register_method(
    "head_mask", config=HeadMaskConfig,
    description="Zero the least important attention heads (mean |output| on calibration text) "
                "in o_proj.",
    rate_meaning="fraction of attention heads masked (global ranking, or per layer)",
    requires=("attention_heads",),
)
def apply(model: Any, rate: float, config: HeadMaskConfig, ctx: MethodContext) -> MethodOutcome:
    """Mask the least important heads by zeroing their ``o_proj`` input columns."""
    import torch

    family = ctx.family
    importance = cached_head_importance(model, ctx, config)
    chosen = select_heads(importance, rate, config.scope)
    head_dim = family.head_dim(model)
    layers = family.decoder_layers(model)
    with torch.no_grad():
        for layer_index, head in chosen:
            weight = family.attention_output_projection(layers[layer_index]).weight
            weight[:, head * head_dim:(head + 1) * head_dim] = 0
    per_layer: dict[str, list[int]] = {}
    for layer_index, head in chosen:
        per_layer.setdefault(str(layer_index), []).append(head)
    info = {
        "heads_masked": len(chosen),
        "heads_total": int(importance.numel()),
        "masked_heads_per_layer": per_layer,
        "scope": config.scope,
        "calibration": {"dataset": config.calibration_dataset, "split": config.calibration_split,
                        "samples": config.calibration_samples,
                        "length": config.calibration_length},
    }
    return MethodOutcome(model=model, info=info)
