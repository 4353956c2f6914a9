"""Remove attention heads from the weights: a smaller, faster model that stays valid GQA.

**Importance** is head_mask's (:func:`workers.methods.head_mask.head_importance`): for
query head ``h`` of layer ``l``, the mean over calibration tokens of the mean |value| of
that head's slice of the ``o_proj`` input (its attention output). A KV group's
importance is the sum of the importances of the query heads that read it.

**What is removed** (``rate`` is the fraction removed, of query heads for
``groups: query_heads``, of KV groups for ``groups: kv_groups``). With ``H`` query heads
and ``G`` KV groups per layer, ``n = H / G`` query heads per group and ``L`` layers,
counts are rounded half up (``⌊x + ½⌋``), at least one unit when ``rate > 0``, none at
rate 0 (the identity); a rate whose count would empty a group (query_heads) or a layer
(kv_groups) is refused with the largest valid rate.

- ``query_heads`` keeps every KV group and removes the same number of query heads from
  each group of a layer, its least important ones, so the layer stays valid GQA.
  ``uniform``: ``k = round(rate · n)`` per group in every layer (``G·k`` heads per layer;
  needs ``k < n``). ``per_layer``: a *unit* ``(l, j)`` is the ``j``-th least important
  query head of every group of layer ``l`` (``j < n − 1``) with cost = the sum of those
  ``G`` importances; the ``round(rate · L · n)`` cheapest units (ties by layer, then
  ``j``) are removed; costs grow with ``j``, so layer ``l`` loses its ``r_l`` least
  important heads of every group, ``r_l ≤ n − 1``. Not defined for multi-head attention
  (``n = 1``): there a query head is a whole KV group, use ``kv_groups``.
- ``kv_groups`` removes whole KV groups with their ``n`` query heads. ``uniform``:
  ``round(rate · G)`` least important groups in every layer (needs fewer than ``G``).
  ``per_layer``: groups ranked over all layers by importance (ties by layer, group),
  the ``round(rate · L · G)`` least important removed, skipping any that would remove
  the last group of its layer.

**How**: rows of q_proj (head ``h`` = rows ``h·d … h·d + d − 1``, ``d = head_dim``) and
k/v_proj (per kept group) with their biases (Qwen2), and the matching columns of o_proj,
are kept in their original order; q_norm / k_norm (Qwen3, EXAONE 4) act on ``head_dim``
and stay. Each attention module's ``num_key_value_groups`` (and head counts where it
stores them) follow. Removing a head is exactly zeroing its o_proj columns in the
unpruned model: the other heads' softmax and values do not involve it.

**Layouts and reload**: when every layer ends with the same counts (``uniform``, or a
``per_layer`` ranking that happens to be even), the text config gets the new
``num_attention_heads`` / ``num_key_value_heads`` and an explicit ``head_dim`` (which
``hidden_size / heads`` no longer gives), and the model reloads with stock
``from_pretrained`` (as vLLM needs). Otherwise — and for Qwen2.5-VL, whose attention
derives head_dim from ``hidden_size / heads`` whatever the config says — the per-layer
counts are recorded in the config (:mod:`workers.models.structure`) and the model
reloads through this project's loader (``load_model("local:…")``); ``info.stock_reload``
says which.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from workers.methods import (
    MethodContext,
    MethodOutcome,
    TextCalibration,
    register_method,
)
from workers.methods.head_mask import cached_head_importance


class PruneHeadsConfig(TextCalibration):
    """What a unit of removal is, how counts spread over layers, and calibration text."""

    groups: Literal["query_heads", "kv_groups"] = "query_heads"
    layout: Literal["uniform", "per_layer"] = "uniform"

    def family_problem(self, family: Any, model_config: Any = None) -> str | None:
        if self.groups != "query_heads" or not model_config:
            return None
        text = model_config.get("text_config") or model_config
        heads = text.get("num_attention_heads")
        kv_heads = text.get("num_key_value_heads") or heads
        if isinstance(heads, int) and heads == kv_heads:
            return (f"groups query_heads removes query heads within KV groups, but this model "
                    f"has one query head per KV head ({heads} of each); use groups: kv_groups")
        return None


def removal_count(rate: float, total: int, limit: int, what: str) -> int:
    """Units to remove at ``rate`` of ``total``: ``⌊rate · total + ½⌋``, at least one when
    ``rate > 0``, zero at rate 0; ``ValueError`` when more than ``limit`` (what may go
    without emptying a layer or group; ``what`` names it in the message)."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1); got {rate}")
    if rate == 0:
        return 0
    count = max(1, math.floor(rate * total + 0.5 + 1e-9))
    if count > limit:
        largest = (limit + 0.5) / total
        raise ValueError(f"rate {rate} would remove {count} of {total} {what}, but at most "
                         f"{limit} can go (never all of a layer's); use a rate below "
                         f"{largest:.4f}")
    return count


def removal_units(groups: str, layout: str, layers: int, heads: int, kv_heads: int,
                  rate: float) -> int:
    """How many units go at ``rate`` (module docstring): query heads per group
    (query_heads, uniform), query-head slices in all (query_heads, per_layer), KV groups
    per layer (kv_groups, uniform) or in all (kv_groups, per_layer)."""
    per_group = heads // kv_heads
    if groups == "query_heads":
        if per_group == 1:
            raise ValueError(f"groups: query_heads removes query heads within KV groups, but "
                             f"each of the {kv_heads} KV groups has a single query head "
                             f"(multi-head attention); use groups: kv_groups")
        if layout == "uniform":
            return removal_count(rate, per_group, per_group - 1,
                                 "query heads of each KV group")
        return removal_count(rate, layers * per_group, layers * (per_group - 1),
                             f"query-head slices (one head of each of the {kv_heads} groups "
                             f"of a layer)")
    if layout == "uniform":
        return removal_count(rate, kv_heads, kv_heads - 1, "KV groups of each layer")
    return removal_count(rate, layers * kv_heads, layers * (kv_heads - 1), "KV groups")


def query_heads_to_remove(importance: Any, kv_heads: int, rate: float,
                          layout: str) -> list[list[int]]:
    """Per layer, the query heads removed in ``query_heads`` mode (see module docstring):
    the same number from every KV group of a layer, each group's least important."""
    layers, heads = importance.shape
    per_group = heads // kv_heads
    count = removal_units("query_heads", layout, layers, heads, kv_heads, rate)
    # ranked[l][g]: group g's query heads in layer l, least important first (ties by index).
    ranked = [[sorted(range(g * per_group, (g + 1) * per_group),
                      key=lambda h, l_=l_: (float(importance[l_, h]), h))
               for g in range(kv_heads)] for l_ in range(layers)]
    if layout == "uniform":
        removed_per_layer = [count] * layers
    else:
        costs = sorted((sum(float(importance[l_, group[j]]) for group in ranked[l_]), l_, j)
                       for l_ in range(layers) for j in range(per_group - 1))
        removed_per_layer = [0] * layers
        for _, l_, _ in costs[:count]:
            removed_per_layer[l_] += 1
    return [sorted(h for group in ranked[l_] for h in group[:removed_per_layer[l_]])
            for l_ in range(layers)]


def kv_groups_to_remove(importance: Any, kv_heads: int, rate: float,
                        layout: str) -> list[list[int]]:
    """Per layer, the KV groups removed in ``kv_groups`` mode (see module docstring);
    a group's importance is the sum of its query heads'."""
    layers, heads = importance.shape
    count = removal_units("kv_groups", layout, layers, heads, kv_heads, rate)
    group_importance = importance.reshape(layers, kv_heads, heads // kv_heads).sum(dim=-1)
    order = sorted((float(group_importance[l_, g]), l_, g)
                   for l_ in range(layers) for g in range(kv_heads))
    if layout == "uniform":
        return [sorted([g for _, layer, g in order if layer == l_][:count])
                for l_ in range(layers)]
    removed: list[list[int]] = [[] for _ in range(layers)]
    taken = 0
    for _, l_, g in order:
        if taken == count:
            break
        if len(removed[l_]) < kv_heads - 1:  # never a layer's last group
            removed[l_].append(g)
            taken += 1
    return [sorted(groups) for groups in removed]


def head_rows(heads: list[int], head_dim: int) -> Any:
    """Index tensor of the rows (of q/k/v_proj) or columns (of o_proj) of ``heads``."""
    import torch

    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                        dtype=torch.long)


def prune_layer_heads(family: Any, layer: Any, kept_heads: list[int], heads_per_group: int,
                      head_dim: int) -> None:
    """Keep only ``kept_heads`` (query-head indices, ascending) in one decoder layer, and
    the KV heads they read; every kept group must keep the same number of query heads."""
    from workers.models.structure import set_attention_heads, slice_linear

    kept_groups = sorted({h // heads_per_group for h in kept_heads})
    per_group = {g: sum(1 for h in kept_heads if h // heads_per_group == g) for g in kept_groups}
    if len(set(per_group.values())) != 1:
        raise ValueError(f"kept query heads {kept_heads} are uneven over KV groups {per_group}")
    projections = family.attention_projections(layer)
    query_rows = head_rows(kept_heads, head_dim)
    kv_rows = head_rows(kept_groups, head_dim)
    slice_linear(projections["q"], rows=query_rows)
    slice_linear(projections["k"], rows=kv_rows)
    slice_linear(projections["v"], rows=kv_rows)
    slice_linear(projections["o"], columns=query_rows)
    set_attention_heads(family.attention(layer), len(kept_heads), len(kept_groups))


def _check_uniform_heads(model: Any, family: Any, heads: int, kv_heads: int) -> None:
    from workers.models.structure import measure_structure

    structure = measure_structure(model, family)
    if set(structure["attention_heads"]) != {heads} or set(structure["kv_heads"]) != {kv_heads}:
        raise ValueError(f"prune_heads needs the same heads in every layer as the config says "
                         f"({heads} query, {kv_heads} KV); this model has "
                         f"{structure['attention_heads']} / {structure['kv_heads']} "
                         f"(already pruned per layer?)")


@register_method(
    "prune_heads", config=PruneHeadsConfig,
    description="Remove the least important attention heads (mean |output| on calibration "
                "text) from q/k/v/o: a smaller model; GQA-aware, uniform or per-layer counts.",
    rate_meaning="fraction of query heads removed (groups: query_heads) or of KV groups "
                 "removed (groups: kv_groups); rounded half up, at least one, never a whole "
                 "layer",
    requires=("attention_heads",),
)
def apply(model: Any, rate: float, config: PruneHeadsConfig,
          ctx: MethodContext) -> MethodOutcome:
    """Remove heads as the module docstring defines; ``info`` says what is left."""
    from workers.models.structure import adopt_sizes_in_config, has_structure, record_structure

    family = ctx.family
    heads, kv_heads = family.num_heads(model), family.num_kv_heads(model)  # Mamba: refused
    head_dim = family.head_dim(model)
    per_group = family.heads_per_kv_group(model)
    layers = list(family.decoder_layers(model))
    _check_uniform_heads(model, family, heads, kv_heads)
    rate = float(rate or 0.0)
    # Refuse a bad rate (or query_heads on multi-head attention) before calibrating.
    removal_units(config.groups, config.layout, len(layers), heads, kv_heads, rate)
    params_before = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {
        "groups": config.groups, "layout": config.layout,
        "heads_before": heads, "kv_heads_before": kv_heads, "head_dim": head_dim,
        "calibration": {"dataset": config.calibration_dataset, "split": config.calibration_split,
                        "samples": config.calibration_samples,
                        "length": config.calibration_length},
    }
    if rate == 0:  # the identity
        info.update(heads_kept_per_layer=[heads] * len(layers),
                    kv_heads_per_layer=[kv_heads] * len(layers), heads_removed=0,
                    removed_heads_per_layer={}, parameters_removed=0,
                    stock_reload=not has_structure(model.config))
        return MethodOutcome(model=model, info=info)

    importance = cached_head_importance(model, ctx, config)  # shared with head_mask
    if config.groups == "query_heads":
        removed = query_heads_to_remove(importance, kv_heads, rate, config.layout)
    else:
        removed_groups = kv_groups_to_remove(importance, kv_heads, rate, config.layout)
        removed = [[h for g in groups for h in range(g * per_group, (g + 1) * per_group)]
                   for groups in removed_groups]
    kept_per_layer = []
    for layer, gone in zip(layers, removed, strict=True):
        kept = sorted(set(range(heads)) - set(gone))
        prune_layer_heads(family, layer, kept, per_group, head_dim)
        kept_per_layer.append(kept)
    counts = [len(kept) for kept in kept_per_layer]
    kv_counts = [len({h // per_group for h in kept}) for kept in kept_per_layer]
    if len(set(counts)) == 1 and len(set(kv_counts)) == 1:
        adopt_sizes_in_config(model, family, {"num_attention_heads": counts[0],
                                              "num_key_value_heads": kv_counts[0],
                                              "head_dim": head_dim})
    recorded = record_structure(model, family)
    info.update(
        heads_kept_per_layer=counts, kv_heads_per_layer=kv_counts,
        heads_removed=sum(len(gone) for gone in removed),
        heads_total=heads * len(layers),
        removed_heads_per_layer={str(i): gone for i, gone in enumerate(removed) if gone},
        parameters_removed=params_before - sum(p.numel() for p in model.parameters()),
        stock_reload=not recorded,
    )
    return MethodOutcome(model=model, info=info)
