"""Remove a fraction of the decoder layers, giving a real smaller model.

``rate`` is the fraction of decoder layers removed: ``round(rate · L)`` layers, at least
one, never all. ``from: top`` removes the last layers (nearest the output), ``bottom``
the first ones, ``block_influence`` the layers with the lowest Block Influence
(ShortGPT, Men et al. 2024):

    BI_i = 1 − mean over calibration tokens t of cos(x_in_i[t], x_out_i[t])

where ``x_in_i`` / ``x_out_i`` are the hidden states entering and leaving decoder layer
``i`` (the residual stream, read by hooks on the family's decoder-layer modules: the
language model of a vision-language model, the blocks of Mamba), on calibration text
set like head_mask's (``calibration_dataset``, ``calibration_split``,
``calibration_samples`` sequences of ``calibration_length`` tokens). A layer that
barely turns its input is the cheapest to remove. Ties go to the lower layer index.
Calibration settings are accepted only with ``from: block_influence``.

The config's ``num_hidden_layers`` is updated and each remaining attention module gets
its new ``layer_idx`` (the KV cache is indexed by it), so the variant saves and reloads
with stock ``from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from workers.methods import (
    MethodConfig,
    MethodContext,
    MethodOutcome,
    register_method,
    run_calibration,
)
from workers.methods.head_mask import HeadMaskConfig, calibration_batches

CALIBRATION_FIELDS = ("calibration_dataset", "calibration_split", "calibration_samples",
                      "calibration_length")


class DropLayersConfig(MethodConfig):
    """Which layers to remove, and the calibration text of ``from: block_influence``."""

    from_: Literal["top", "bottom", "block_influence"] = Field(default="top", alias="from")
    calibration_dataset: str = "builtin:pydoc"
    calibration_split: str | None = "train"
    calibration_samples: int = Field(default=16, ge=1, le=4096)
    calibration_length: int = Field(default=128, ge=8)

    @model_validator(mode="after")
    def _calibration_only_for_block_influence(self) -> DropLayersConfig:
        given = sorted(self.model_fields_set & set(CALIBRATION_FIELDS))
        if given and self.from_ != "block_influence":
            raise ValueError(f"{', '.join(given)}: calibration settings are used only with "
                             f"from: block_influence, not from: {self.from_}")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_calibration(self, handler: Any) -> dict[str, Any]:
        # Top/bottom removal dumps as it did before block_influence existed, so the trial
        # keys of existing drop_layers sweeps (hashes of the dumped params) do not change.
        data = handler(self)
        if self.from_ != "block_influence":
            for name in CALIBRATION_FIELDS:
                data.pop(name, None)
        return data


def drop_count(num_layers: int, rate: float) -> int:
    """``round(rate · num_layers)``, at least one; an error when it is every layer."""
    count = max(1, round(rate * num_layers))
    if count >= num_layers:
        raise ValueError(f"rate {rate} would drop all {num_layers} layers; use a rate below "
                         f"{(num_layers - 0.5) / num_layers:.3f}")
    return count


def layers_to_drop(num_layers: int, rate: float, end: str) -> list[int]:
    """Indices of the layers removed at ``rate`` from ``end`` of a stack of ``num_layers``."""
    count = drop_count(num_layers, rate)
    if end == "top":
        return list(range(num_layers - count, num_layers))
    return list(range(count))


def lowest_influence_layers(influence: list[float], rate: float) -> list[int]:
    """Indices (ascending) of the ``round(rate · L)`` layers with the lowest Block Influence;
    ties go to the lower index."""
    count = drop_count(len(influence), rate)
    ranked = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(ranked[:count])


def block_influence(model: Any, family: Any, batches: list[Any]) -> list[float]:
    """BI of each decoder layer over the tokens of ``batches`` (see module docstring).

    Cosines are computed in float64 from the hidden states each layer receives (its first
    positional argument or ``hidden_states`` keyword) and returns (its output, or the
    first element of a tuple output).
    """
    import torch
    import torch.nn.functional as F

    layers = family.decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook_for(index: int):
        def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple | list) else output
            cos = F.cosine_similarity(x_in.detach().to(torch.float64),
                                      x_out.detach().to(torch.float64), dim=-1)
            sums[index] += float(cos.sum())
            counts[index] += cos.numel()
        return hook

    run_calibration(model, batches,
                    forward_hooks=[(layer, hook_for(i)) for i, layer in enumerate(layers)])
    if not all(counts):
        missing = [i for i, c in enumerate(counts) if not c]
        raise RuntimeError(f"decoder layers {missing} were not called in the forward pass")
    return [1.0 - s / c for s, c in zip(sums, counts, strict=True)]


def _calibration(config: DropLayersConfig) -> HeadMaskConfig:
    """The calibration settings in head_mask's config, which :func:`calibration_batches` reads."""
    return HeadMaskConfig(**{name: getattr(config, name) for name in CALIBRATION_FIELDS})


@register_method(
    "drop_layers", config=DropLayersConfig,
    description="Remove decoder layers from the top or bottom of the stack, or those with the "
                "lowest Block Influence (ShortGPT) on calibration text (a smaller model).",
    rate_meaning="fraction of decoder layers removed (rounded, at least one)",
)
def apply(model: Any, rate: float, config: DropLayersConfig, ctx: MethodContext) -> MethodOutcome:
    """Drop ``round(rate · L)`` layers chosen by ``config.from_``."""
    family = ctx.family
    layers = list(family.decoder_layers(model))
    prefix = family.decoder_layers_prefix(model)  # model.layers, backbone.layers, …
    extra: dict[str, Any] = {}
    if config.from_ == "block_influence":
        calibration = _calibration(config)
        # The same for every rate of a sweep: computed once per base model and settings.
        influence = ctx.cached(
            ["block_influence", ctx.seed, calibration.model_dump(include=set(CALIBRATION_FIELDS))],
            lambda: block_influence(model, family, calibration_batches(ctx, calibration)))
        dropped = lowest_influence_layers(influence, rate)
        extra = {"from": "block_influence", "block_influence": influence,
                 "calibration": {"dataset": config.calibration_dataset,
                                 "split": config.calibration_split,
                                 "samples": config.calibration_samples,
                                 "length": config.calibration_length}}
    else:
        dropped = layers_to_drop(len(layers), rate, config.from_)
    kept = [i for i in range(len(layers)) if i not in dropped]
    family.set_decoder_layers(model, [layers[i] for i in kept], kept)
    # Bottom removal shifts layer indices; map names so evidence compares like with like.
    renamed = {}
    for new_index, old_index in enumerate(kept):
        if new_index != old_index:
            for name, _ in layers[old_index].named_parameters():
                renamed[f"{prefix}.{new_index}.{name}"] = f"{prefix}.{old_index}.{name}"
    info = {"layers_before": len(layers), "layers_after": len(kept), "dropped_layers": dropped,
            **extra}
    return MethodOutcome(model=model, info=info, renamed=renamed)
