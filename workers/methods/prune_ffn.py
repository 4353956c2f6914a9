"""Remove MLP intermediate channels by activation-weighted magnitude: a smaller model.

Every supported MLP computes ``down(act(gate(x)) ⊙ up(x))``. Write
``a(x) = act(gate(x)) ⊙ up(x)`` for the input of ``down_proj`` (``I`` channels). The
**score** of channel ``j`` of a layer is

    s_j = mean over calibration tokens t of |a(x_t)_j|  ×  ‖W_down[:, j]‖₂

(the mean magnitude of what the channel feeds into ``down_proj`` times the norm of the
column that carries it into the residual stream), computed in float64 from
``a(x)`` as ``down_proj`` receives it, over ``calibration_samples`` sequences of
``calibration_length`` tokens of ``calibration_dataset`` (head_mask's calibration text).

``rate`` is the fraction of intermediate channels removed; counts are rounded half up
(``⌊x + ½⌋``), at least one channel when ``rate > 0``, none at rate 0 (the identity),
and never all of a layer's (refused with the largest valid rate).

- ``layout: uniform``: every layer removes its ``round(rate · I)`` lowest-scoring
  channels (needs the same ``I`` in every layer), so every layer keeps the same
  intermediate size, written to the config's ``intermediate_size``: the model reloads
  with stock ``from_pretrained``.
- ``layout: per_layer``: channels are ranked over all layers by score (ties by layer,
  then channel); the ``round(rate · Σ_l I_l)`` lowest are removed, skipping any that
  would remove a layer's last channel. The per-layer sizes are recorded in the config
  (:mod:`workers.models.structure`) and the model reloads through this project's loader
  (unless every layer happens to keep the same size: then as for ``uniform``).

Rows of ``gate_proj`` and ``up_proj`` (and their biases) and columns of ``down_proj``
are kept in their original order; ``down_proj``'s bias stays. Removing channel ``j`` is
exactly zeroing column ``j`` of ``down_proj`` in the unpruned model.
"""

from __future__ import annotations

from typing import Any, Literal

from workers.methods import (
    MethodContext,
    MethodOutcome,
    TextCalibration,
    register_method,
    run_calibration,
)
from workers.methods.head_mask import calibration_batches
from workers.methods.prune_heads import removal_count


class PruneFFNConfig(TextCalibration):
    """How channel counts spread over layers, and calibration text."""

    layout: Literal["uniform", "per_layer"] = "uniform"


def channel_scores(model: Any, family: Any, batches: list[Any]) -> list[Any]:
    """Per decoder layer, a float64 CPU tensor [I_l] of channel scores ``s_j`` (module
    docstring): mean |input of down_proj| over the calibration tokens × column norms."""
    import torch

    layers = list(family.decoder_layers(model))
    downs = [family.mlp_projections(layer)["down"] for layer in layers]
    totals = [torch.zeros(down.in_features, dtype=torch.float64) for down in downs]
    tokens = [0] * len(layers)

    def hook_for(index: int):
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            flat = x.reshape(-1, x.shape[-1])
            totals[index] += flat.abs().sum(dim=0).cpu()
            tokens[index] += flat.shape[0]
        return hook

    run_calibration(model, batches, [(down, hook_for(i)) for i, down in enumerate(downs)])
    return [(total / max(count, 1)) * down.weight.detach().to(torch.float64).norm(dim=0).cpu()
            for total, count, down in zip(totals, tokens, downs, strict=True)]


def channels_to_remove(scores: list[Any], rate: float, layout: str) -> list[list[int]]:
    """Per layer, the intermediate channels removed at ``rate`` (module docstring)."""
    widths = [int(s.numel()) for s in scores]
    if layout == "uniform":
        if len(set(widths)) != 1:
            raise ValueError(f"layout: uniform needs the same intermediate size in every layer; "
                             f"this model has {widths}; use layout: per_layer")
        count = removal_count(rate, widths[0], widths[0] - 1, "channels of each layer")
        return [sorted(sorted(range(width), key=lambda j, s=s: (float(s[j]), j))[:count])
                for s, width in zip(scores, widths, strict=True)]
    total = sum(widths)
    count = removal_count(rate, total, total - len(widths), "intermediate channels")
    order = sorted((float(s[j]), layer, j) for layer, s in enumerate(scores)
                   for j in range(widths[layer]))
    removed: list[list[int]] = [[] for _ in scores]
    taken = 0
    for _, layer, j in order:
        if taken == count:
            break
        if len(removed[layer]) < widths[layer] - 1:  # never a layer's last channel
            removed[layer].append(j)
            taken += 1
    return [sorted(channels) for channels in removed]


def prune_layer_channels(family: Any, layer: Any, kept: list[int]) -> None:
    """Keep only intermediate channels ``kept`` (ascending) of one layer's MLP."""
    import torch

    from workers.models.structure import set_mlp_width, slice_linear

    index = torch.tensor(kept, dtype=torch.long)
    projections = family.mlp_projections(layer)
    slice_linear(projections["gate"], rows=index)
    slice_linear(projections["up"], rows=index)
    slice_linear(projections["down"], columns=index)
    set_mlp_width(family.mlp(layer), len(kept))


@register_method(
    "prune_ffn", config=PruneFFNConfig,
    description="Remove the MLP intermediate channels with the lowest activation-weighted "
                "magnitude (mean |act(gate)·up| × ‖down column‖) on calibration text: a "
                "smaller model, uniform or per-layer sizes.",
    rate_meaning="fraction of MLP intermediate channels removed (rounded half up, at least "
                 "one, never all of a layer's)",
    requires=("mlp",),
)
def apply(model: Any, rate: float, config: PruneFFNConfig, ctx: MethodContext) -> MethodOutcome:
    """Remove channels as the module docstring defines; ``info`` says what is left."""
    from workers.models.structure import (
        adopt_sizes_in_config,
        has_structure,
        record_structure,
    )

    family = ctx.family
    layers = list(family.decoder_layers(model))
    widths = [int(family.mlp_projections(layer)["down"].in_features)  # Mamba: refused
              for layer in layers]
    rate = float(rate or 0.0)
    # Refuse a bad layout or rate before calibrating (the counts channels_to_remove uses).
    if config.layout == "uniform":
        if len(set(widths)) != 1:
            raise ValueError(f"layout: uniform needs the same intermediate size in every layer; "
                             f"this model has {widths}; use layout: per_layer")
        removal_count(rate, widths[0], widths[0] - 1, "channels of each layer")
    else:
        removal_count(rate, sum(widths), sum(widths) - len(widths), "intermediate channels")
    params_before = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {
        "layout": config.layout, "intermediate_size_before": widths,
        "calibration": {"dataset": config.calibration_dataset, "split": config.calibration_split,
                        "samples": config.calibration_samples,
                        "length": config.calibration_length},
    }
    if rate == 0:  # the identity
        info.update(intermediate_size_per_layer=widths, channels_removed=0,
                    channels_removed_per_layer=[0] * len(widths), parameters_removed=0,
                    stock_reload=not has_structure(model.config))
        return MethodOutcome(model=model, info=info)

    # The widths are in the key: scores of another structure must never be reused.
    key = ("ffn_channel_scores", config.calibration_dataset, config.calibration_split,
           config.calibration_samples, config.calibration_length, ctx.seed, widths)
    scores = ctx.cached(key, lambda: channel_scores(model, family,
                                                    calibration_batches(ctx, config)))
    removed = channels_to_remove(scores, rate, config.layout)
    for layer, gone, width in zip(layers, removed, widths, strict=True):
        drop = set(gone)
        prune_layer_channels(family, layer, [j for j in range(width) if j not in drop])
    sizes = [width - len(gone) for width, gone in zip(widths, removed, strict=True)]
    if len(set(sizes)) == 1:
        adopt_sizes_in_config(model, family, {"intermediate_size": sizes[0]})
    recorded = record_structure(model, family)
    info.update(
        intermediate_size_per_layer=sizes,
        channels_removed=sum(len(gone) for gone in removed),
        channels_removed_per_layer=[len(gone) for gone in removed],
        channels_total=sum(widths),
        parameters_removed=params_before - sum(p.numel() for p in model.parameters()),
        stock_reload=not recorded,
    )
    return MethodOutcome(model=model, info=info)

