"""Correlation scan order for Mamba: scan the tokens in a learned order inside chosen mixers.

The users' method (``../shared/SEEDS.md``, workflow 4), made explicit:

1. **Calibration.** The hidden states entering the mixer of layer ``source_layer``
   (default: the last) on the first ``length`` tokens (default 512) of the calibration
   text: X ∈ R^{T×d}, T = ``length``.
2. **Correlation.** C[s, t] = Pearson correlation of the token vectors X_s and X_t (each
   centred and scaled over its d features); distance D = 1 − C.
3. **Tour.** Nearest neighbour from token 0: repeatedly go to the unvisited token with
   the smallest distance to the current one (ties: the lowest position). The tour is the
   scan order π (a permutation of 0..T−1); its length Σ D[π_i, π_{i+1}] is recorded next
   to the length of the identity order 0, 1, …, T−1 (the users reported 411.9 → 165.9).
4. **Application, reversible.** Forward hooks on the chosen mixers (``layers``; default:
   the ``source_layer`` mixer) permute the mixer's input sequence into scan order and put
   its output back in position order; weights are untouched and removing the hooks
   (:func:`remove_scan_order`) gives back the base model exactly. A sequence of n ≠ T
   tokens uses the order of π restricted to positions < n, positions ≥ T stay at the end
   in their own order.

**Causality.** A selective scan is causal in its scan order, so after the permutation a
position's output depends on the tokens that come before it *in π*, which include later
positions. The variant therefore sees future tokens and a causal language-model
evaluation of it (perplexity, accuracy, generation) is invalid: the trial's causality
guard detects this on the probe batch and records the trial as ``invalid_evaluation``;
it never ranks, whatever perplexity it would have printed (the users' "−99.93 %" came
from exactly this leak). The method records ``causal: false`` in its info. There is no
causal-safe form of a token reordering (any order other than the identity lets some
position see a later token), so the method does not pretend to have one.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from workers.data import token_stream
from workers.methods import MethodConfig, MethodContext, MethodOutcome, register_method

_HOOKS_ATTRIBUTE = "_compress_sweep_scan_hooks"


class ScanOrderConfig(MethodConfig):
    """Which mixer's states define the order, where it is applied, and the calibration text."""

    source_layer: int = Field(default=-1, description="layer whose mixer input is correlated "
                              "(negative: from the end)")
    layers: list[int] | None = Field(default=None, description="layers whose mixers scan in "
                                     "the new order (default: the source layer)")
    length: int = Field(default=512, ge=2, le=8192, description="tokens correlated (T)")
    calibration_dataset: str = "builtin:pydoc"
    calibration_split: str | None = "train"


def correlation_distance(states: Any) -> Any:
    """D = 1 − Pearson correlation between the token vectors (rows) of ``states`` [T, d]."""

    x = states.double()
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - (x @ x.T)


def nearest_neighbour_tour(distance: Any) -> list[int]:
    """Greedy tour from position 0: always to the nearest unvisited position (lowest on ties)."""
    import torch

    n = distance.shape[0]
    visited = torch.zeros(n, dtype=torch.bool)
    order = [0]
    visited[0] = True
    for _ in range(n - 1):
        row = distance[order[-1]].clone()
        row[visited] = float("inf")
        nxt = int(torch.argmin(row))  # argmin returns the first minimum: the lowest position
        order.append(nxt)
        visited[nxt] = True
    return order


def tour_length(distance: Any, order: list[int]) -> float:
    return float(sum(distance[a, b] for a, b in zip(order[:-1], order[1:], strict=True)))


def order_for_length(order: list[int], n: int) -> list[int]:
    """The scan order of a sequence of ``n`` tokens (see module docstring, step 4)."""
    head = [p for p in order if p < n]
    return head + list(range(len(order), n))


def apply_scan_order(mixer: Any, order: list[int]) -> None:
    """Make ``mixer`` scan its input in ``order``; undone by :func:`remove_scan_order`."""
    import torch

    cache: dict[int, tuple[Any, Any]] = {}

    def permutation(n: int, device: Any) -> tuple[Any, Any]:
        if n not in cache:
            forward = torch.tensor(order_for_length(order, n), dtype=torch.long)
            cache[n] = (forward, torch.argsort(forward))
        forward, inverse = cache[n]
        return forward.to(device), inverse.to(device)

    def before(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        forward, _ = permutation(hidden.shape[1], hidden.device)
        hidden = hidden[:, forward]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs = dict(kwargs, attention_mask=mask[:, forward])
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    def after(_module: Any, _args: tuple, _kwargs: dict, output: Any) -> Any:
        _, inverse = permutation(output.shape[1], output.device)
        return output[:, inverse]

    remove_scan_order(mixer)
    handles = [mixer.register_forward_pre_hook(before, with_kwargs=True),
               mixer.register_forward_hook(after, with_kwargs=True)]
    setattr(mixer, _HOOKS_ATTRIBUTE, handles)


def remove_scan_order(mixer: Any) -> None:
    """Give ``mixer`` back its own (position) order."""
    for handle in getattr(mixer, _HOOKS_ATTRIBUTE, []):
        handle.remove()
    if hasattr(mixer, _HOOKS_ATTRIBUTE):
        delattr(mixer, _HOOKS_ATTRIBUTE)


def _mixer_input(model: Any, mixer: Any, ids: Any) -> Any:
    import torch

    captured: dict[str, Any] = {}

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = mixer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        handle.remove()
    return captured["x"][0]


@register_method(
    "mamba_scan_order", config=ScanOrderConfig,
    description="Scan tokens in a nearest-neighbour tour of their hidden-state correlation "
                "inside chosen Mamba mixers (reversible); sees future tokens, so causal "
                "language-model evaluations of it are marked invalid.",
    rate_meaning="no rate", requires=("state_space",), uses_rate=False,
)
def apply(model: Any, rate: float | None, config: ScanOrderConfig,
          ctx: MethodContext) -> MethodOutcome:
    """Compute the scan order on calibration text and hook it into the chosen mixers."""
    import torch

    family = ctx.family
    if family.has_attention:
        raise ValueError(f"mamba_scan_order reorders Mamba's selective scan; {family.name} "
                         "models have no state-space mixers")
    layers = list(family.decoder_layers(model))
    n_layers = len(layers)

    def index(i: int, what: str) -> int:
        if not -n_layers <= i < n_layers:
            raise ValueError(f"{what} {i} is outside the model's {n_layers} layers")
        return i % n_layers

    source = index(config.source_layer, "source_layer")
    targets = sorted({index(i, "layers entry") for i in (config.layers or [source])})
    documents = ctx.calibration_documents(config.calibration_dataset, config.calibration_split,
                                          ctx.seed)
    ids = token_stream(ctx.tokenizer, documents, max_tokens=config.length)[: config.length]
    if len(ids) < config.length:
        raise ValueError(f"calibration text {config.calibration_dataset} has only {len(ids)} "
                         f"tokens; need length={config.length}")

    def compute() -> tuple[list[int], float, float]:
        states = _mixer_input(model, family.mixer(layers[source]),
                              torch.tensor([ids], dtype=torch.long, device=ctx.device))
        distance = correlation_distance(states.cpu())
        order = nearest_neighbour_tour(distance)
        return order, tour_length(distance, list(range(len(order)))), tour_length(distance,
                                                                                 order)

    before_count = ctx.cache_hits
    order, identity_length, length = ctx.cached(
        ("mamba_scan_order", source, config.length, config.calibration_dataset,
         config.calibration_split, ctx.seed), compute)
    for layer in targets:
        apply_scan_order(family.mixer(layers[layer]), order)
    info = {"source_layer": source, "layers": targets, "length": config.length,
            "tour_length_identity": identity_length, "tour_length": length,
            "order_head": order[:16], "calibration_cached": ctx.cache_hits > before_count,
            "causal": False}
    return MethodOutcome(model=model, info=info)
