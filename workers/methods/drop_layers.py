"""Remove a fraction of the decoder layers, giving a real smaller model.

``rate`` is the fraction of decoder layers removed: ``round(rate · L)`` layers, at least
one, never all. ``from: top`` removes the last layers (nearest the output), ``bottom``
the first ones. The config's ``num_hidden_layers`` is updated and each remaining
attention module gets its new ``layer_idx`` (the KV cache is indexed by it), so the
variant saves and reloads with stock ``from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from workers.methods import MethodConfig, MethodContext, MethodOutcome, register_method


class DropLayersConfig(MethodConfig):
    """Which end of the stack to remove layers from."""

    from_: Literal["top", "bottom"] = Field(default="top", alias="from")


def layers_to_drop(num_layers: int, rate: float, end: str) -> list[int]:
    """Indices of the layers removed at ``rate`` from ``end`` of a stack of ``num_layers``."""
    count = max(1, round(rate * num_layers))
    if count >= num_layers:
        raise ValueError(f"rate {rate} would drop all {num_layers} layers; use a rate below "
                         f"{(num_layers - 0.5) / num_layers:.3f}")
    if end == "top":
        return list(range(num_layers - count, num_layers))
    return list(range(count))


@register_method(
    "drop_layers", config=DropLayersConfig,
    description="Remove decoder layers from the top or bottom of the stack (a smaller model).",
    rate_meaning="fraction of decoder layers removed (rounded, at least one)",
)
def apply(model: Any, rate: float, config: DropLayersConfig, ctx: MethodContext) -> MethodOutcome:
    """Drop ``round(rate · L)`` layers from ``config.from_``."""
    family = ctx.family
    layers = list(family.decoder_layers(model))
    prefix = family.decoder_layers_prefix(model)  # model.layers, backbone.layers, …
    dropped = layers_to_drop(len(layers), rate, config.from_)
    kept = [i for i in range(len(layers)) if i not in dropped]
    family.set_decoder_layers(model, [layers[i] for i in kept], kept)
    # Bottom removal shifts layer indices; map names so evidence compares like with like.
    renamed = {}
    for new_index, old_index in enumerate(kept):
        if new_index != old_index:
            for name, _ in layers[old_index].named_parameters():
                renamed[f"{prefix}.{new_index}.{name}"] = f"{prefix}.{old_index}.{name}"
    info = {"layers_before": len(layers), "layers_after": len(kept), "dropped_layers": dropped}
    return MethodOutcome(model=model, info=info, renamed=renamed)
