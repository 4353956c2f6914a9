"""Reduce the hidden size (the residual-stream width) of a decoder, giving a real smaller model.

``rate`` is the fraction of hidden dimensions removed. The new hidden size is
``d' = multiple_of · floor((1 − rate) · d / multiple_of + 1/2)`` (the nearest multiple of
``multiple_of``), capped at ``d``; ``d' = 0`` is refused. Rate 0 returns the model
untouched. Every parameter that has the hidden dimension is reduced consistently —
the token embedding, every RMSNorm over the hidden size, the inputs of ``q/k/v_proj``,
``gate_proj``, ``up_proj`` and ``lm_head``, the outputs (and biases) of ``o_proj`` and
``down_proj`` — and ``config.hidden_size`` becomes ``d'`` (``head_dim`` is written into
the config when the config class does not store it, so the reloaded attention keeps its
width). The variant reloads with stock ``AutoModelForCausalLM.from_pretrained``.
``q_norm`` / ``k_norm`` (Qwen3, EXAONE 4) act on ``head_dim``, not on the hidden size,
and stay as they are.

Calibration statistics. On ``calibration_samples`` sequences of ``calibration_length``
tokens of the calibration text (as ``head_mask``), the *residual-stream sites* are
observed: for pre-norm families the input of every RMSNorm over the hidden size (per
layer ``input_layernorm`` = the hidden state entering the layer and
``post_attention_layernorm`` = the state after the attention residual add; then the
final norm's input = the output of the last layer); for the post-norm EXAONE 4, whose
projections read the raw residual stream, the inputs of ``q_proj`` (the state entering
the layer) and of ``gate_proj`` (the state after the attention residual add), then the
final norm's input. Each token's state ``x`` is normalised to unit length
(``x̂ = x / ‖x‖``: what a reader sees after its RMSNorm, up to the norm's weight), and

    C = Σ_sites mean_tokens x̂ x̂ᵀ        (d × d, accumulated in float64)

so each site counts equally and ``trace C`` = number of sites. ``variance_kept`` in
``info`` is the fraction of ``trace C`` in the kept subspace: the mean, over sites and
tokens, of the share of a token's squared norm that survives.

Bases (``basis``):

- ``pca`` (SliceGPT, Ashkboos et al. 2024, arXiv 2401.15024), pre-norm RMSNorm families
  only (llama/mistral, qwen2, qwen3). First each hidden RMSNorm's weight ``g`` is folded
  into the linear layers that read its output (``W ← W diag(g)`` for ``q/k/v_proj``
  after ``input_layernorm``, ``gate/up_proj`` after ``post_attention_layernorm``,
  ``lm_head`` after the final norm), leaving norms of weight 1. ``Q`` = the eigenvectors
  of ``C``, by decreasing eigenvalue (orthogonal, d × d). The residual stream is
  expressed in that basis, ``h → h Q``: embeddings ``E ← E Q``; every linear reading the
  stream ``W ← W Q`` (input side); every linear writing into it ``W ← Qᵀ W``,
  ``b ← Qᵀ b`` (output side). Because ``‖h Q‖ = ‖h‖``, an RMSNorm of weight 1 commutes
  with the rotation, so the rotated model computes exactly the same function (the
  *computational invariance* of SliceGPT). Then only the first ``d'`` columns of ``Q``
  are kept (``Q_k``: every ``Q`` above becomes ``Q_k``, d × d'). A single ``Q`` serves
  every layer: SliceGPT's per-layer bases need extra matrices in the skip connections,
  which stock transformers models cannot hold. Tied embeddings are untied (``lm_head``
  gets ``E diag(g_final) Q_k``, ``config.tie_word_embeddings = False``), as SliceGPT
  does: after folding, the head and the embedding differ by the final norm's weight.
- ``channels`` (activation statistics, no rotation), any family whose hidden norms are
  RMSNorms: llama/mistral, qwen2, qwen3 and the post-norm EXAONE 4, where a rotation is
  not invariant (the raw stream feeds ``q/k/v`` directly and each sub-block's output is
  normalised channel by channel). Statistic: ``s_c = C_cc = Σ_sites mean_tokens x̂_c²``
  (mean share of the normalised energy in channel ``c``, summed over sites); the ``d'``
  channels with the largest ``s_c`` (ties: lower index) are kept, in their original
  order, and that same subset is sliced out of the embedding, every hidden norm weight,
  and every projection. Norm weights are not folded, so tied embeddings stay tied.

Norm compensation. An RMSNorm divides by ``sqrt(mean of x²)`` over its width; sliced,
it averages over ``d'`` instead of ``d`` values, and over the kept part ``x_k`` of its
input only. The exact normalised value of the kept coordinates is
``g_k · x_k · sqrt(d) / ‖x‖``; the reduced model computes
``c · g_k · x_k · sqrt(d') / ‖x_k‖``. They are equal for

    c = sqrt(d / d') · ‖x_k‖ / ‖x‖

and ``‖x_k‖² / ‖x‖²`` is replaced by its calibration mean ``f``, the share of the
normalised energy the kept subspace holds at that norm's input, so every hidden norm's
weight is multiplied by

    c = sqrt(d · f / d')        (exactly 1 when d' = d)

- ``pca``: ``f`` = ``variance_kept``, the mean over all sites (in these pre-norm families
  every norm's input is one of the sites; a per-norm ``f`` would need a second
  calibration pass in the rotated basis, and on aidreams260K it changed the KL divergence
  to the base by < 1 %);
- ``channels``: ``f_n = Σ_{c kept} mean_tokens x̂_c²`` at norm ``n``'s own input (for
  EXAONE 4's post-norms, the output of ``o_proj`` / ``down_proj``).

``f`` = 1 gives SliceGPT's correction ``sqrt(d/d')`` (its RMSNorm averages over the
original ``d``); ``f = d'/d`` (energy spread evenly) gives 1. The correction is
approximate only through the sliced-away energy: the error is the per-token deviation of
``‖x_k‖² / ‖x‖²`` from its calibration mean ``f``, and it vanishes when nothing of
``x`` is sliced away. On aidreams260K (32 × 128 calibration tokens of WikiText-2 valid,
KL(base ‖ variant) per token on 1024 tokens of WikiText-2 test, rates 0.25 / 0.5) it gave
a lower divergence than ``sqrt(d/d')`` for ``pca`` (0.39 vs 0.42, 1.25 vs 1.56) and at
rate 0.5 for ``channels`` (2.8 vs 3.2; 1.52 vs 1.47 at 0.25). The norm's ``eps`` is in
effect scaled by ``d' / (d · f)``, which is negligible. With ``d' = d``, ``pca`` is an exact
rotation.

Vision-language models are refused: LLaVA's projector has its intermediate width set by
``text_config.hidden_size`` (``linear_1`` out, ``linear_2`` in, with a GELU between), so a
reloaded model would need that inner layer pruned too, which is not a rotation/slice of
the residual stream; Qwen2.5-VL's text attention derives ``head_dim`` from
``hidden_size // num_heads``, so changing the hidden size would change the heads. Mamba
is refused at validation (``requires=("mlp",)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from workers.methods import (
    MethodContext,
    MethodOutcome,
    TextCalibration,
    register_method,
    run_calibration,
)
from workers.methods.head_mask import calibration_batches

PCA_FAMILIES = ("llama", "qwen")
"""Families the ``pca`` basis supports: pre-norm, RMSNorm, Llama layout."""
CHANNEL_FAMILIES = ("llama", "qwen", "exaone4")
"""Families the ``channels`` basis supports: RMSNorm over the hidden size, pre- or post-norm."""
BASES = {"pca": PCA_FAMILIES, "channels": CHANNEL_FAMILIES}
FINAL_NORM = "final_norm"


class ReduceHiddenConfig(TextCalibration):
    """Basis, rounding of the new width, and calibration text (as ``head_mask``)."""

    basis: Literal["pca", "channels"] = "pca"
    multiple_of: int = Field(default=8, ge=1)

    def family_problem(self, family: Any, model_config: Any = None) -> str | None:
        try:
            check_supported(family, self.basis)
        except ValueError as exc:
            return str(exc)
        return None


def new_hidden_size(hidden: int, rate: float, multiple_of: int) -> int:
    """``d'``: ``(1 − rate) · hidden`` rounded to the nearest multiple of ``multiple_of``
    (halves up), at most ``hidden``; ValueError when it would be 0 or ``rate`` ∉ [0, 1)."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1) (the fraction of hidden dimensions removed), "
                         f"got {rate}")
    if rate == 0:
        return hidden
    reduced = multiple_of * math.floor((1 - rate) * hidden / multiple_of + 0.5)
    if reduced <= 0:
        raise ValueError(f"rate {rate} leaves no hidden dimension of {hidden} once rounded to a "
                         f"multiple of {multiple_of}; use a lower rate or a smaller multiple_of")
    return min(reduced, hidden)


def check_supported(family: Any, basis: str) -> None:
    """ValueError saying why ``family`` cannot have its hidden size reduced with ``basis``."""
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}; bases: {', '.join(BASES)}")
    if family.is_vision_language:
        raise ValueError(
            f"reduce_hidden does not support vision-language models ({family.name}): the "
            "vision projector's width is tied to the text hidden size (LLaVA) or the text "
            "attention derives head_dim from it (Qwen2.5-VL), so the reduced model would not "
            "reload as the same function")
    if not family.has_attention:
        raise ValueError(f"reduce_hidden needs attention and MLP projections; {family.name} "
                         "models have neither")
    supported = BASES[basis]
    if family.name not in supported:
        hint = (" (post-norm: a rotation of the residual stream is not invariant there; use "
                "basis: channels)" if family.is_post_norm and basis == "pca" else "")
        raise ValueError(f"reduce_hidden basis {basis!r} supports the families "
                         f"{', '.join(supported)}, not {family.name}{hint}")


# --------------------------------------------------------------------------- model parts


def hidden_norms(family: Any, layer: Any) -> dict[str, Any]:
    """The layer's norms over the hidden size: ``family.norms`` without those inside the
    attention module (``q_norm`` / ``k_norm`` act on ``head_dim``)."""
    inside = {id(m) for m in family.attention(layer).modules()}
    return {name: norm for name, norm in family.norms(layer).items() if id(norm) not in inside}


def _check_rms_norm(name: str, norm: Any, hidden: int) -> None:
    """ValueError unless ``norm`` is an RMSNorm with a weight of width ``hidden``: the
    rotation and the compensation assume ``x · w / rms(x)`` (no mean, no bias, no 1 + w)."""
    weight = getattr(norm, "weight", None)
    kind = type(norm).__name__
    if ("RMSNorm" not in kind or getattr(norm, "bias", None) is not None or weight is None
            or tuple(weight.shape) != (hidden,)):
        raise ValueError(f"{name} is a {kind}, not an RMSNorm over the hidden size {hidden}; "
                         "reduce_hidden cannot rescale it")


@dataclass(frozen=True)
class LayerParts:
    """What reads and writes the residual stream in one decoder layer."""

    readers: dict[str, Any]
    """Linear layers whose input is the (normalised) residual stream: q, k, v, gate, up."""
    writers: dict[str, Any]
    """Linear layers whose output is added to (or normalised into) the stream: o, down."""
    norms: dict[str, Any]
    """RMSNorms over the hidden size."""
    reads_after: dict[str, str]
    """Pre-norm only: reader role → the norm whose output it reads (for folding)."""


def layer_parts(family: Any, layer: Any) -> LayerParts:
    """The residual-stream readers, writers and hidden norms of one layer."""
    attention, mlp = family.attention_projections(layer), family.mlp_projections(layer)
    if set(mlp) != {"gate", "up", "down"}:
        raise ValueError(f"reduce_hidden expects a gated MLP (gate/up/down), got {sorted(mlp)}")
    readers = {"q": attention["q"], "k": attention["k"], "v": attention["v"],
               "gate": mlp["gate"], "up": mlp["up"]}
    writers = {"o": attention["o"], "down": mlp["down"]}
    norms = hidden_norms(family, layer)
    reads_after: dict[str, str] = {}
    if not family.is_post_norm:
        if set(norms) != {"input_layernorm", "post_attention_layernorm"}:
            raise ValueError(f"expected input_layernorm and post_attention_layernorm, got "
                             f"{sorted(norms)}")
        reads_after = {"q": "input_layernorm", "k": "input_layernorm", "v": "input_layernorm",
                       "gate": "post_attention_layernorm", "up": "post_attention_layernorm"}
    return LayerParts(readers, writers, norms, reads_after)


def _check_covered(model: Any, family: Any, touched: set[int]) -> None:
    """ValueError if a parameter of the language model or head was not reduced and is not
    one known to be independent of the hidden size (``q_norm``/``k_norm``, head biases)."""
    independent: set[int] = set()
    for layer in family.decoder_layers(model):
        projections = list(family.attention_projections(layer).values())
        for module in family.attention(layer).modules():
            if not any(module is p for p in projections):
                independent.update(id(p) for p in module.parameters(recurse=False))
        for reader in layer_parts(family, layer).readers.values():
            if reader.bias is not None:
                independent.add(id(reader.bias))  # on the output side (heads, MLP): unchanged
    modules = [family.language_model(model), family.lm_head(model)]
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) not in touched and id(param) not in independent:
                raise ValueError(f"reduce_hidden does not know how to reduce parameter {name} "
                                 f"{tuple(param.shape)} of this {family.name} model")


# --------------------------------------------------------------------------- statistics


@dataclass
class HiddenStatistics:
    """Calibration statistics of the hidden states (definitions: module docstring)."""

    second_moment: Any | None
    """C = Σ_sites mean_tokens x̂ x̂ᵀ over the residual-stream sites, float64 [d, d] on the
    CPU; None when only the diagonal was gathered (``channels``)."""
    stream_energy: Any
    """diag C: Σ_sites mean_tokens x̂_c², float64 [d]."""
    norm_energy: dict[str, Any]
    """Hidden norm → mean_tokens x̂_c² of that norm's input, float64 [d] (sums to 1)."""
    sites: list[str]
    tokens: int
    """Calibration tokens seen at each site."""


def stream_sites(model: Any, family: Any) -> dict[str, Any]:
    """Residual-stream site name → the module whose *input* is that state (module
    docstring): hidden norms (pre-norm) or ``q_proj``/``gate_proj`` (post-norm) per layer,
    then the final norm."""
    if not family.is_post_norm:
        return norm_sites(model, family)
    sites: dict[str, Any] = {}
    for index, layer in enumerate(family.decoder_layers(model)):
        sites[f"layers.{index}.attention_input"] = family.attention_projections(layer)["q"]
        sites[f"layers.{index}.mlp_input"] = family.mlp_projections(layer)["gate"]
    sites[FINAL_NORM] = family.final_norm(model)
    return sites


def norm_sites(model: Any, family: Any) -> dict[str, Any]:
    """Every RMSNorm over the hidden size, named ``layers.{i}.{name}`` and ``final_norm``."""
    sites = {f"layers.{index}.{name}": norm
             for index, layer in enumerate(family.decoder_layers(model))
             for name, norm in hidden_norms(family, layer).items()}
    sites[FINAL_NORM] = family.final_norm(model)
    return sites


def residual_statistics(model: Any, family: Any, batches: list[Any],
                        full: bool) -> HiddenStatistics:
    """Statistics of the unit-length hidden states at every stream and norm site over the
    calibration ``batches`` of token ids; ``full``: also the d × d second moment ``C``.

    Per batch, ``x̂ᵀ x̂`` is formed in float32 on the model's device (unit-length rows keep
    it well scaled) and accumulated in float64 on the CPU.
    """
    import torch

    hidden = int(family.text_config(model).hidden_size)
    streams, norms = stream_sites(model, family), norm_sites(model, family)
    moments = {name: torch.zeros(hidden, hidden, dtype=torch.float64) for name in streams} \
        if full else {}
    energies = {(role, name): torch.zeros(hidden, dtype=torch.float64)
                for role, sites in (("stream", streams), ("norm", norms)) for name in sites}
    counts = dict.fromkeys(energies, 0)

    def hook_for(role: str, name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, hidden).float()
            unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
            energies[role, name] += unit.square().sum(dim=0).double().cpu()
            counts[role, name] += x.shape[0]
            if role == "stream" and full:
                moments[name] += (unit.T @ unit).double().cpu()
        return hook

    run_calibration(model, batches, [(module, hook_for(role, name))
                                     for role, sites in (("stream", streams), ("norm", norms))
                                     for name, module in sites.items()])
    if min(counts.values()) == 0:
        raise ValueError("the calibration forward pass did not reach every hidden-state site")
    return HiddenStatistics(
        second_moment=sum(moments[n] / counts["stream", n] for n in streams) if full else None,
        stream_energy=sum(energies["stream", n] / counts["stream", n] for n in streams),
        norm_energy={n: energies["norm", n] / counts["norm", n] for n in norms},
        sites=list(streams), tokens=min(counts.values()))


def principal_basis(second_moment: Any) -> tuple[Any, Any]:
    """(eigenvalues descending, Q with the matching eigenvectors as columns), float64."""
    import torch

    values, vectors = torch.linalg.eigh(second_moment)
    order = torch.argsort(values, descending=True, stable=True)
    return values[order].clamp(min=0), vectors[:, order]


def top_channels(energy: Any, keep: int) -> Any:
    """Indices (ascending) of the ``keep`` channels of largest ``energy``; ties → lower index."""
    import torch

    order = torch.argsort(-energy, stable=True)
    return torch.sort(order[:keep]).values


# --------------------------------------------------------------------------- transform


def fold_norm_weights(model: Any, family: Any) -> None:
    """Pre-norm only: multiply each hidden norm's weight into the columns of the linear
    layers reading its output (``W ← W diag(g)``) and set the norm's weight to 1; the
    final norm's weight goes into ``lm_head`` (untied first if tied). The function is
    unchanged."""
    import torch

    with torch.no_grad():
        for layer in family.decoder_layers(model):
            parts = layer_parts(family, layer)
            for role, linear in parts.readers.items():
                gain = parts.norms[parts.reads_after[role]].weight
                linear.weight.copy_((linear.weight.double() * gain.double()).to(linear.weight))
            for norm in parts.norms.values():
                norm.weight.fill_(1.0)
        _untie_lm_head(model, family)
        head, final = family.lm_head(model), family.final_norm(model)
        head.weight.copy_((head.weight.double() * final.weight.double()).to(head.weight))
        final.weight.fill_(1.0)


def _tied(model: Any, family: Any) -> bool:
    return family.lm_head(model).weight is family.embeddings(model).weight


def _untie_lm_head(model: Any, family: Any) -> bool:
    """Give ``lm_head`` its own copy of a shared embedding weight and record it in the
    config; True if it was tied."""
    import torch

    if not _tied(model, family):
        return False
    head = family.lm_head(model)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(),
                                     requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, family.text_config(model))}.values():
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def reduce_hidden_dimension(model: Any, family: Any, read: Callable[[Any], Any],
                            write: Callable[[Any], Any], norm_weight: Callable[[str, Any], Any],
                            new_hidden: int) -> None:
    """Replace every hidden-size parameter: ``read`` maps a [*, d] weight whose columns
    read the stream to [*, d'] (embeddings, q/k/v/gate/up, lm_head), ``write`` a [d, *]
    weight or [d, 1] bias written into the stream to [d', *] (o/down), ``norm_weight`` a
    hidden norm's (site name, [d] weight) to its [d'] weight. A tied ``lm_head`` keeps
    sharing the new embedding weight. Updates the module widths and the config."""
    import torch

    touched: set[int] = set()
    head_dim = family.head_dim(model)
    tied = _tied(model, family)

    def replace(module: Any, name: str, value: Any) -> None:
        old = getattr(module, name)
        new = torch.nn.Parameter(value.to(old.dtype).contiguous(),
                                 requires_grad=old.requires_grad)
        setattr(module, name, new)
        touched.add(id(new))

    with torch.no_grad():
        embedding = family.embeddings(model)
        replace(embedding, "weight", read(embedding.weight))
        embedding.embedding_dim = new_hidden
        for layer in family.decoder_layers(model):
            parts = layer_parts(family, layer)
            for linear in parts.readers.values():
                replace(linear, "weight", read(linear.weight))
                linear.in_features = new_hidden
            for linear in parts.writers.values():
                replace(linear, "weight", write(linear.weight))
                if linear.bias is not None:
                    replace(linear, "bias", write(linear.bias.unsqueeze(1)).squeeze(1))
                linear.out_features = new_hidden
        for site, norm in norm_sites(model, family).items():
            replace(norm, "weight", norm_weight(site, norm.weight))
        head = family.lm_head(model)
        if tied:
            head.weight = embedding.weight
        else:
            replace(head, "weight", read(head.weight))
        head.in_features = new_hidden
    _check_covered(model, family, touched)
    configs = {id(c): c for c in (family.text_config(model),
                                  getattr(family.language_model(model), "config", None))
               if c is not None}
    for config in configs.values():
        if getattr(config, "head_dim", None) is None:
            # Qwen2 and EXAONE 4 configs need not store it; the reloaded attention would then
            # derive hidden_size // num_heads from the new hidden size.
            config.head_dim = head_dim
        config.hidden_size = new_hidden


# --------------------------------------------------------------------------- the method


def _parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _norm_scale(hidden: int, new_hidden: int, kept_fraction: float) -> float:
    """``sqrt(d · f / d')`` (module docstring); exactly 1 when nothing is sliced."""
    if new_hidden == hidden:
        return 1.0
    return math.sqrt(hidden * kept_fraction / new_hidden)


@register_method(
    "reduce_hidden", config=ReduceHiddenConfig,
    description="Reduce the hidden size (embeddings, norms, every projection): SliceGPT PCA "
                "rotation (pre-norm) or top-energy channels (any RMSNorm family).",
    rate_meaning="fraction of hidden dimensions removed (new size rounded to multiple_of)",
    requires=("mlp",),
)
def apply(model: Any, rate: float, config: ReduceHiddenConfig,
          ctx: MethodContext) -> MethodOutcome:
    """Reduce the hidden size to ``d'`` with ``config.basis`` (definitions: module docstring).

    ``info``: ``hidden_size_before/after``, ``parameters_before/after``, ``variance_kept``
    (fraction of ``trace C`` in the kept subspace), ``norm_scale`` (min and max of the
    compensation ``c`` over the hidden norms), ``untied_embeddings`` (pca on a tied model),
    ``identity`` (rate 0), the calibration settings and sites.
    """
    import torch

    family = ctx.family
    check_supported(family, config.basis)
    hidden = int(family.text_config(model).hidden_size)
    new_hidden = new_hidden_size(hidden, rate, config.multiple_of)
    before = _parameter_count(model)
    info: dict[str, Any] = {
        "basis": config.basis, "hidden_size_before": hidden, "hidden_size_after": new_hidden,
        "parameters_before": before,
        "calibration": {"dataset": config.calibration_dataset, "split": config.calibration_split,
                        "samples": config.calibration_samples,
                        "length": config.calibration_length},
    }
    if rate == 0:
        info.update(parameters_after=before, variance_kept=1.0,
                    norm_scale={"min": 1.0, "max": 1.0}, untied_embeddings=False, identity=True)
        return MethodOutcome(model=model, info=info)
    for name, norm in norm_sites(model, family).items():
        _check_rms_norm(name, norm, hidden)

    full = config.basis == "pca"
    key = ("reduce_hidden", full, config.calibration_dataset, config.calibration_split,
           config.calibration_samples, config.calibration_length)
    stats = ctx.cached(key, lambda: residual_statistics(
        model, family, calibration_batches(ctx, config), full=full))
    untied = False
    if config.basis == "pca":
        values, basis = principal_basis(stats.second_moment)
        kept = basis[:, :new_hidden]
        variance_kept = float(values[:new_hidden].sum() / values.sum())
        scales = dict.fromkeys(norm_sites(model, family),
                               _norm_scale(hidden, new_hidden, variance_kept))
        untied = _tied(model, family)
        fold_norm_weights(model, family)

        def read(weight: Any) -> Any:
            return weight.double() @ kept.to(weight.device)

        def write(weight: Any) -> Any:
            return kept.to(weight.device).T @ weight.double()

        def norm_weight(site: str, weight: Any) -> Any:
            return torch.full((new_hidden,), scales[site], dtype=torch.float64,
                              device=weight.device)
    else:
        channels = top_channels(stats.stream_energy, new_hidden)
        variance_kept = float(stats.stream_energy[channels].sum() / stats.stream_energy.sum())
        scales = {site: _norm_scale(hidden, new_hidden, float(energy[channels].sum()))
                  for site, energy in stats.norm_energy.items()}

        def read(weight: Any) -> Any:
            return weight[:, channels.to(weight.device)]

        def write(weight: Any) -> Any:
            return weight[channels.to(weight.device)]

        def norm_weight(site: str, weight: Any) -> Any:
            return weight.double()[channels.to(weight.device)] * scales[site]

    reduce_hidden_dimension(model, family, read, write, norm_weight, new_hidden)
    info.update(parameters_after=_parameter_count(model), variance_kept=variance_kept,
                norm_scale={"min": min(scales.values()), "max": max(scales.values())},
                untied_embeddings=untied, identity=False, calibration_sites=len(stats.sites),
                calibration_tokens_per_site=stats.tokens)
    return MethodOutcome(model=model, info=info)
