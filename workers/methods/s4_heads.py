"""S-4 instruction-guided head pruning: mask the heads whose instruction→context attention
is least salient, baked into the output projection.

**Saliency.** For each of the first ``n_calibration`` usable samples of the calibration
set (a dataset entry written like a spec's, read through ``ctx.calibration_dataset``),
one forward pass runs under eager attention, one sample at a time. A forward hook on
each decoder layer's attention module reduces the softmax weights ``A[h, q, k]`` of that
layer as soon as they are computed to the *attention mass* of each head::

    m[h] = mean over query positions q of  Σ over context positions c of  A[h, q, c]

- Vision-language models: the input is the sample's ``prompt()`` (context, then
  question) and its image through the model's processor
  (:func:`workers.evaluators._vision.image_inputs`); the context positions are the image
  positions (``family.image_token_mask``), the query positions every position after the
  last image position (the instruction and the chat template's closing tokens).
  Samples without an image are passed over (counted in ``samples_skipped``); the first
  ``n_calibration`` samples that have one are used.
- Text models: the input is ``[BOS] + encode(context + "\\n") + encode(question)`` (no
  BOS when the tokenizer has none); the context positions are those of
  ``encode(context + "\\n")``, the query positions those of ``encode(question)``. A
  sample without a context is refused (the calibration set must map ``fields.context``).

Over the ``N`` samples used, per layer ℓ and head h: ``mean = Σ m / N`` and the
*population* variance ``var = Σ (m − mean)² / N``; ``score = var + gamma · mean``. The
lowest scores are pruned. These statistics depend on the model, the calibration entry,
``n_calibration`` and the seed only, and are cached with ``ctx.cached`` under
``("s4_heads", calibration, n_calibration, seed)``: a sweep over several rates calibrates
once. The language model runs with eager attention during calibration only; its previous
attention implementation is restored afterwards, so the variant runs as the base did.

**Allocation** (``H`` heads per layer, ``L`` layers; ``round`` is Python's, half to even;
ties in score are broken by (layer, head) order):

- ``uniform``: the ``max(1, round(rate · H))`` lowest-score heads of every layer;
- ``adaptive``: the ``max(1, round(rate · L · H))`` lowest-score heads over all layers,
  walking the global ranking and passing over a head whose layer already has ``H − 1``
  pruned (so no layer loses every head); the selection at a lower rate is a prefix of
  the walk, hence a subset of the selection at a higher rate;
- ``early_skip``: layers ``0 … protected_layers − 1`` keep every head; the middle band
  ``protected_layers … late_start − 1`` prunes ``max(1, round(rate · H))`` per layer, the
  late band ``late_start … L − 1`` ``max(1, round(min(rate · late_factor, 1) · H))`` per
  layer (lowest scores within the layer). With rate 0.2, H = 32, L = 32 and the defaults
  (6, 22, 1.75): 6 × 16 + 11 × 10 = 206 heads.

A configuration that would prune every head of a layer, or whose layer indices are not
layers of the model, is refused with a ``ValueError``. Rate 0 returns the model unchanged.

**Masking.** A pruned head ``p``'s columns ``W_O[:, p·d:(p+1)·d]`` of ``o_proj`` are set to
zero (``d`` = head_dim): its contribution to the residual stream is removed in the
weights, so the variant survives save → reload; the parameter count is unchanged.

**Residual transfer** (``residual_transfer: true``, done before masking, on the base
weights). Write ``O_h = W_O[:, h·d:(h+1)·d]`` and, where each head has its own value head
(``heads_per_kv_group == 1``), ``V_h`` = the rows ``h·d … (h+1)·d − 1`` of ``v_proj``'s weight
with its bias as an extra column. For each pruned head ``p`` of a layer (ascending):

- the receiving head ``k`` is the kept head of the same layer whose ``O_k`` has the
  highest cosine similarity with ``O_p`` among the kept heads of ``p``'s KV group, or
  among all kept heads of the layer when none of the group is kept (ties: lowest index);
- ``β = max(0, cos(O_p, O_k))`` (cosine of the flattened blocks, in float64);
- ``ΔO = β · (O_p − O_k)``, scaled down to norm ``transfer_clip · ‖O_k‖`` when longer;
  ``O_k += ΔO``;
- only when value heads are not shared (``heads_per_kv_group == 1``):
  ``ΔV = β · (V_p − V_k)``, clipped the same way against ``‖V_k‖``; ``V_k += ΔV``. Under
  GQA the value head is shared by every query head of its group — ``p`` and a ``k`` of
  the same group read the same values, so there is nothing to transfer, and changing a
  shared value head would change the other heads of its group — so ``v_proj`` is left
  unchanged.

Every ``ΔO``/``ΔV`` is computed from the base weights; a kept head receiving from several
pruned heads gets the sum of their (individually clipped) deltas. ``β`` of every transfer
is recorded.

**Calibration scale** (``calibration_scale: true``, after masking and transfer): in each
layer with ``H_kept < H`` heads kept, the kept heads' ``o_proj`` columns are multiplied by
``H / H_kept``; the factor of every layer is recorded (1.0 where nothing was pruned).
For post-norm models (EXAONE 4, ``family.is_post_norm``) the attention output is
normalised before it reaches the residual stream, so this rescale is a no-op; it is
applied anyway and a warning is logged and recorded.
"""

from __future__ import annotations

import inspect
import logging
import statistics
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from workers.methods import MethodConfig, MethodContext, MethodOutcome, register_method

log = logging.getLogger(__name__)

QUESTION_KINDS = ("multiple_choice", "question")


class S4HeadsConfig(MethodConfig):
    """Calibration set, saliency weight, allocation across layers and the two variants."""

    calibration: dict[str, Any]
    """A dataset entry like a spec's (``name``, ``format``, ``fields``, ``split``,
    ``images``, …) of questions: with images for VLMs, with a context for text models."""
    n_calibration: int = Field(default=64, ge=1)
    gamma: float = Field(default=0.4, ge=0)
    allocation: Literal["uniform", "adaptive", "early_skip"] = "uniform"
    protected_layers: int = Field(default=6, ge=0)
    """early_skip: layers 0 … protected_layers − 1 are never pruned."""
    late_start: int = Field(default=22, ge=0)
    """early_skip: index of the first layer of the late band."""
    late_factor: float = Field(default=1.75, gt=0)
    """early_skip: the late band's rate is min(rate · late_factor, 1)."""
    calibration_scale: bool = False
    residual_transfer: bool = False
    transfer_clip: float = Field(default=1.0, gt=0)

    def dataset_entries(self) -> dict[str, dict[str, Any]]:
        return {"calibration": self.calibration}

    @field_validator("calibration")
    @classmethod
    def _calibration_entry(cls, entry: dict[str, Any]) -> dict[str, Any]:
        from workers.data import DatasetError, formats, resolve

        if not entry.get("name"):
            raise ValueError("calibration needs a name (a data file, builtin: or hub dataset)")
        try:
            request = resolve(entry)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        kind = formats()[request.format].kind
        if kind not in QUESTION_KINDS:
            raise ValueError(f"calibration format {request.format!r} gives {kind} samples; "
                             "s4_heads calibrates on questions (a multiple_choice or question "
                             "format)")
        return entry

    @model_validator(mode="after")
    def _bands(self) -> S4HeadsConfig:
        if self.late_start < self.protected_layers:
            raise ValueError(f"late_start ({self.late_start}) must not be below "
                             f"protected_layers ({self.protected_layers})")
        return self


# --------------------------------------------------------------------------- saliency


class _MassRecorder:
    """Forward hooks reducing each layer's attention weights to per-head attention mass."""

    def __init__(self, attention_modules: list[Any]) -> None:
        self.modules = attention_modules
        self.query: Any = None  # LongTensor of query positions
        self.context: Any = None  # LongTensor of context positions
        self.masses: list[list[Any]] = [[] for _ in attention_modules]
        self.handles: list[Any] = []

    def __enter__(self) -> _MassRecorder:
        for index, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("the attention module returned no weights; eager attention "
                                   "is required")
            rows = weights[0].index_select(1, self.query.to(weights.device))
            on_context = rows.index_select(2, self.context.to(weights.device))
            self.masses[index].append(on_context.double().sum(dim=-1).mean(dim=-1).cpu())
            return (output[0], None, *output[2:])  # the weights are not kept
        return hook

    def start(self, query: Any, context: Any) -> None:
        self.query, self.context = query, context
        self.masses = [[] for _ in self.modules]


def _text_input(tokenizer: Any, sample: Any, index: int) -> tuple[list[int], list[int], list[int]]:
    """(ids, context positions, query positions) of one text calibration sample."""
    if not sample.context:
        raise ValueError(f"calibration sample {index + 1} ({sample.id!r}) has no context: "
                         "s4_heads on a text model measures the attention of the question onto "
                         "the context, so the calibration set needs one per sample (map it "
                         "with fields.context)")
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    context_ids = tokenizer.encode(sample.context + "\n")
    question_ids = tokenizer.encode(sample.question or "")
    if not question_ids:
        raise ValueError(f"calibration sample {index + 1} ({sample.id!r}) has an empty question")
    start = len(prefix)
    context_positions = list(range(start, start + len(context_ids)))
    query_start = start + len(context_ids)
    query_positions = list(range(query_start, query_start + len(question_ids)))
    return prefix + context_ids + question_ids, context_positions, query_positions


def attention_statistics(model: Any, ctx: MethodContext, samples: Any,
                         n_calibration: int) -> dict[str, Any]:
    """Per-head attention mass on the calibration samples (see the module docstring).

    Returns ``{"masses": [N, L, H] float64, "mean": [L, H], "var": [L, H] (population),
    "used": N, "skipped": samples passed over for lack of an image (VLMs),
    "context": "image" | "text"}``.
    """
    import torch

    from workers.evaluators._vision import image_inputs

    family = ctx.family
    vision = family.is_vision_language
    if vision and ctx.processor is None:
        raise ValueError("s4_heads on a vision-language model needs the model's processor")
    layers = list(family.decoder_layers(model))
    language_model = family.language_model(model)
    previous = language_model.config._attn_implementation
    per_sample: list[Any] = []
    skipped = 0
    # Only the attention is wanted: no KV cache, and logits for one position instead of a
    # [sequence, vocabulary] matrix (an image prompt is hundreds of tokens long).
    extra: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    language_model.set_attn_implementation("eager")
    try:
        with _MassRecorder([family.attention(layer) for layer in layers]) as recorder, \
                torch.inference_mode():
            for index, sample in enumerate(samples):
                if len(per_sample) >= n_calibration:
                    break
                if vision:
                    if sample.image is None:
                        skipped += 1
                        continue
                    inputs = image_inputs(ctx.processor, sample.prompt(), sample.image,
                                          ctx.device)
                    image = family.image_token_mask(model, inputs["input_ids"])[0].cpu()
                    positions = torch.nonzero(image).flatten()
                    if positions.numel() == 0:
                        raise ValueError("the processor put no image tokens in the prompt")
                    context = positions
                    query = torch.arange(int(positions[-1]) + 1, image.shape[0])
                    if query.numel() == 0:
                        raise ValueError(f"calibration sample {index + 1} ({sample.id!r}) has "
                                         "no tokens after its image")
                else:
                    ids, context_list, query_list = _text_input(ctx.tokenizer, sample, index)
                    inputs = {"input_ids": torch.tensor([ids], dtype=torch.long,
                                                        device=ctx.device)}
                    context = torch.tensor(context_list, dtype=torch.long)
                    query = torch.tensor(query_list, dtype=torch.long)
                recorder.start(query, context)
                model(**inputs, **extra)
                if any(len(m) != 1 for m in recorder.masses):
                    raise RuntimeError("expected one attention call per layer and sample, got "
                                       f"{[len(m) for m in recorder.masses]}")
                per_sample.append(torch.stack([m[0] for m in recorder.masses]))
    finally:
        language_model.set_attn_implementation(previous)
    if not per_sample:
        what = "has an image" if vision else "could be used"
        raise ValueError(f"no calibration sample {what} ({skipped} without an image)")
    masses = torch.stack(per_sample)  # [N, L, H]
    return {"masses": masses, "mean": masses.mean(dim=0),
            "var": masses.var(dim=0, unbiased=False), "used": len(per_sample),
            "skipped": skipped, "context": "image" if vision else "text"}


def saliency(statistics_: dict[str, Any], gamma: float) -> Any:
    """score [L, H] = var + gamma · mean (float64)."""
    return statistics_["var"] + gamma * statistics_["mean"]


# --------------------------------------------------------------------------- allocation


def layer_quotas(num_layers: int, num_heads: int, rate: float, allocation: str,
                 protected_layers: int = 6, late_start: int = 22,
                 late_factor: float = 1.75) -> list[int] | None:
    """Heads to prune in each layer for ``uniform`` and ``early_skip`` (None for
    ``adaptive``, whose counts follow the scores); ValueError for a configuration that
    would prune a whole layer or names layers the model does not have."""
    def per_layer(fraction: float) -> int:
        return max(1, round(fraction * num_heads)) if fraction > 0 else 0

    if allocation == "adaptive":
        total = max(1, round(rate * num_layers * num_heads)) if rate > 0 else 0
        if total > num_layers * (num_heads - 1):
            raise ValueError(f"rate {rate} would prune {total} of {num_layers * num_heads} "
                             f"heads: more than all but one head of each of the {num_layers} "
                             "layers")
        return None
    if allocation == "uniform":
        quotas = [per_layer(rate)] * num_layers
    elif allocation == "early_skip":
        if protected_layers > num_layers or late_start >= num_layers:
            raise ValueError(f"early_skip: protected_layers={protected_layers} and "
                             f"late_start={late_start} must be layers of the model, which has "
                             f"{num_layers} (layers 0 … {num_layers - 1}): late_start < "
                             f"{num_layers}")
        if late_start < protected_layers:
            raise ValueError(f"early_skip: late_start ({late_start}) is below protected_layers "
                             f"({protected_layers})")
        late_rate = min(rate * late_factor, 1.0)
        quotas = [0 if i < protected_layers else per_layer(rate) if i < late_start
                  else per_layer(late_rate) for i in range(num_layers)]
    else:
        raise ValueError(f"unknown allocation {allocation!r}")
    for layer, count in enumerate(quotas):
        if count >= num_heads:
            raise ValueError(f"{allocation} at rate {rate} would prune all {num_heads} heads of "
                             f"layer {layer} ({count} requested); lower the rate"
                             + (" or late_factor" if allocation == "early_skip" else ""))
    return quotas


def select_heads(scores: Any, rate: float, allocation: str, protected_layers: int = 6,
                 late_start: int = 22, late_factor: float = 1.75) -> list[list[int]]:
    """The heads to prune in each layer (ascending), from scores [L, H] (lowest pruned)."""
    num_layers, num_heads = (int(n) for n in scores.shape)
    quotas = layer_quotas(num_layers, num_heads, rate, allocation, protected_layers,
                          late_start, late_factor)
    order = sorted((float(scores[layer, head]), layer, head) for layer in range(num_layers)
                   for head in range(num_heads))
    chosen: list[list[int]] = [[] for _ in range(num_layers)]
    if quotas is None:
        total = max(1, round(rate * num_layers * num_heads)) if rate > 0 else 0
        taken = 0
        for _, layer, head in order:
            if taken == total:
                break
            if len(chosen[layer]) < num_heads - 1:
                chosen[layer].append(head)
                taken += 1
    else:
        for _, layer, head in order:
            if len(chosen[layer]) < quotas[layer]:
                chosen[layer].append(head)
    return [sorted(heads) for heads in chosen]


# --------------------------------------------------------------------------- weights


def _clipped(delta: Any, reference_norm: float, clip: float) -> tuple[Any, bool]:
    norm = float(delta.norm())
    limit = clip * reference_norm
    if norm > limit:
        return delta * (limit / norm), True
    return delta, False


def residual_transfer(o_weight: Any, v_weight: Any, v_bias: Any, pruned: list[int],
                      head_dim: int, heads_per_kv_group: int, clip: float) -> list[dict[str, Any]]:
    """Apply the residual transfer of one layer in place (see the module docstring).

    ``o_weight`` [hidden, H·d] and ``v_weight`` [KV·d, hidden] (``v_bias`` [KV·d] or None)
    are the layer's ``o_proj``/``v_proj`` parameters; ``pruned`` its pruned heads. Returns
    one record per pruned head: ``pruned``, ``kept``, ``beta``, ``o_clipped`` and
    ``v_clipped`` (None when value heads are shared and ``v_proj`` is left as it is).
    """
    import torch

    num_heads = o_weight.shape[1] // head_dim
    kept = [h for h in range(num_heads) if h not in set(pruned)]
    if not pruned or not kept:
        return []
    o_base = o_weight.detach().to(torch.float64).clone()
    per_head_values = heads_per_kv_group == 1
    v_base = None
    if per_head_values:
        v_base = v_weight.detach().to(torch.float64).clone()
        if v_bias is not None:
            v_base = torch.cat([v_base, v_bias.detach().to(torch.float64).unsqueeze(1)], dim=1)

    def o_block(h: int) -> Any:
        return o_base[:, h * head_dim:(h + 1) * head_dim]

    o_delta = torch.zeros_like(o_base)
    v_delta = torch.zeros_like(v_base) if v_base is not None else None
    records = []
    for p in sorted(pruned):
        group = p // heads_per_kv_group
        candidates = [k for k in kept if k // heads_per_kv_group == group] or kept
        cosines = [float(torch.nn.functional.cosine_similarity(
            o_block(p).flatten(), o_block(k).flatten(), dim=0)) for k in candidates]
        best = max(range(len(candidates)), key=lambda i: (cosines[i], -candidates[i]))
        k, beta = candidates[best], max(0.0, cosines[best])
        delta, o_clipped = _clipped(beta * (o_block(p) - o_block(k)), float(o_block(k).norm()),
                                    clip)
        o_delta[:, k * head_dim:(k + 1) * head_dim] += delta
        v_clipped: bool | None = None
        if v_base is not None and v_delta is not None:
            rows_p = v_base[p * head_dim:(p + 1) * head_dim]
            rows_k = v_base[k * head_dim:(k + 1) * head_dim]
            delta_v, v_clipped = _clipped(beta * (rows_p - rows_k), float(rows_k.norm()), clip)
            v_delta[k * head_dim:(k + 1) * head_dim] += delta_v
        records.append({"pruned": p, "kept": k, "beta": beta, "o_clipped": o_clipped,
                        "v_clipped": v_clipped})
    with torch.no_grad():
        o_weight.copy_((o_base + o_delta).to(o_weight.dtype))
        if v_base is not None and v_delta is not None:
            updated = v_base + v_delta
            if v_bias is not None:
                v_bias.copy_(updated[:, -1].to(v_bias.dtype))
                updated = updated[:, :-1]
            v_weight.copy_(updated.to(v_weight.dtype))
    return records


# --------------------------------------------------------------------------- the method


def _unchanged_info(config: S4HeadsConfig, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {"rate": 0.0, "allocation": config.allocation, "heads_pruned": 0,
            "heads_total": num_layers * num_heads,
            "pruned_heads_per_layer": [[] for _ in range(num_layers)],
            "note": "rate 0: nothing was pruned, the model is unchanged", "warnings": []}


@register_method(
    "s4_heads", config=S4HeadsConfig,
    description="S-4 instruction-guided head pruning: mask the heads whose attention from the "
                "instruction onto the context (image tokens for VLMs) has the lowest "
                "variance + gamma·mean over calibration samples, zeroing their o_proj columns.",
    rate_meaning="fraction of attention heads pruned (masked): per layer for uniform, over all "
                 "layers for adaptive, the middle band's rate for early_skip",
    requires=("attention_heads",),
)
def apply(model: Any, rate: float, config: S4HeadsConfig, ctx: MethodContext) -> MethodOutcome:
    """Prune (mask) the least salient heads; see the module docstring for every definition."""
    import torch

    family = ctx.family
    num_heads = family.num_heads(model)  # the family's own refusal for models without heads
    head_dim = family.head_dim(model)
    layers = list(family.decoder_layers(model))
    num_layers = len(layers)
    if rate is None or not 0 <= float(rate) < 1:
        raise ValueError(f"s4_heads needs a rate in [0, 1), not {rate!r}")
    rate = float(rate)
    # Refuse an impossible allocation before spending time on calibration.
    layer_quotas(num_layers, num_heads, rate, config.allocation, config.protected_layers,
                 config.late_start, config.late_factor)
    if rate == 0:
        return MethodOutcome(model=model, info=_unchanged_info(config, num_layers, num_heads))
    if ctx.calibration_dataset is None:
        raise ValueError("s4_heads needs calibration data (the method context has no "
                         "calibration_dataset)")

    def compute() -> dict[str, Any]:
        data = ctx.calibration_dataset(config.calibration)
        return attention_statistics(model, ctx, data.samples, config.n_calibration)

    hits_before = ctx.cache_hits
    stats = ctx.cached(("s4_heads", config.calibration, config.n_calibration, ctx.seed), compute)
    from_cache = ctx.cache_hits > hits_before
    scores = saliency(stats, config.gamma)
    if tuple(scores.shape) != (num_layers, num_heads):
        raise ValueError(f"cached calibration statistics have shape {tuple(scores.shape)}, the "
                         f"model has {num_layers} layers × {num_heads} heads")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("calibration gave non-finite saliency scores")
    chosen = select_heads(scores, rate, config.allocation, config.protected_layers,
                          config.late_start, config.late_factor)

    warnings: list[str] = []
    transfers: list[dict[str, Any]] = []
    scale_factors: list[float] | None = None
    with torch.no_grad():
        if config.residual_transfer:
            group = family.heads_per_kv_group(model)
            for index, (layer, pruned) in enumerate(zip(layers, chosen, strict=True)):
                projections = family.attention_projections(layer)
                records = residual_transfer(
                    projections["o"].weight, projections["v"].weight, projections["v"].bias,
                    pruned, head_dim, group, config.transfer_clip)
                transfers.extend({"layer": index, **r} for r in records)
        for layer, pruned in zip(layers, chosen, strict=True):
            weight = family.attention_output_projection(layer).weight
            for head in pruned:
                weight[:, head * head_dim:(head + 1) * head_dim] = 0
        if config.calibration_scale:
            scale_factors = []
            for layer, pruned in zip(layers, chosen, strict=True):
                kept = [h for h in range(num_heads) if h not in set(pruned)]
                factor = num_heads / len(kept)
                scale_factors.append(factor)
                if factor != 1.0:
                    weight = family.attention_output_projection(layer).weight
                    for head in kept:
                        weight[:, head * head_dim:(head + 1) * head_dim] *= factor
            if family.is_post_norm:
                message = (f"calibration_scale is a no-op for {family.name}: it is post-norm, "
                           "each attention output is normalised before the residual add, "
                           "which undoes a uniform rescale")
                log.warning(message)
                warnings.append(message)

    flat = sorted(float(v) for v in scores.flatten())
    pruned_total = sum(len(heads) for heads in chosen)
    info: dict[str, Any] = {
        "rate": rate,
        "allocation": config.allocation,
        "heads_pruned": pruned_total,
        "heads_total": num_layers * num_heads,
        "pruned_heads_per_layer": chosen,
        "pruned_count_per_layer": [len(heads) for heads in chosen],
        "gamma": config.gamma,
        "saliency": {"min": flat[0], "median": statistics.median(flat), "max": flat[-1]},
        "calibration": {"dataset": config.calibration.get("name"),
                        "format": config.calibration.get("format"),
                        "context": stats["context"],
                        "n_calibration": config.n_calibration,
                        "samples_used": stats["used"], "samples_skipped": stats["skipped"],
                        "from_cache": from_cache},
        "calibration_scale": config.calibration_scale,
        "scale_factors": scale_factors,
        "residual_transfer": config.residual_transfer,
        "transfers": transfers,
        "transfer_betas": [t["beta"] for t in transfers],
        "warnings": warnings,
    }
    if config.allocation == "early_skip":
        info["bands"] = {"protected_layers": config.protected_layers,
                         "late_start": config.late_start, "late_factor": config.late_factor,
                         "late_rate": min(rate * config.late_factor, 1.0)}
    return MethodOutcome(model=model, info=info)
