"""Modality dominance (LangOverrule, arXiv 2508.10552): MDI and AEI per layer band.

Definition. For each image question the model generates ``new_tokens`` tokens greedily
(``modality_dominance.new_tokens``, default 8) from the question (filled into
``modality_dominance.template``, default ``{prompt}``) and its image, through its own
processor. The *queries* are the generated tokens: each one, fed back to the model,
attends over the input tokens. For every decoder layer ℓ and generated token g, the
attention row of g (softmax weights, eager attention) is averaged over heads and
restricted to the input positions (attention to earlier generated tokens is left out,
and the rest renormalised to sum to 1), then split into

    A_T = attention on text input tokens (everything that is not an image token; the
          chat template's tokens and BOS included),   A_O = 1 − A_T  (image tokens),

with |T| and |O| the numbers of text and image input tokens. A layer's A_T is the mean
over the generated tokens; a band's A_T is the mean over its layers. Bands: the
decoder layers split at the fractions ``modality_dominance.bands`` of the depth (default
[1/3, 2/3]: layer i is early when i < round(L/3), middle when i < round(2L/3), else
late). Per band::

    MDI   = (A_T / |T|) / (A_O / |O|)
    AEI_T = (A_T / (A_T + A_O)) / (|T| / (|T| + |O|)) = A_T / (|T| / (|T| + |O|))

Aggregation over samples, both reported because they differ (the paper and a
reproduction disagreed partly for this reason):

- ``mdi_<band>``, ``aei_<band>``: mean over samples of the per-sample values;
- ``mdi_<band>_pooled``, ``aei_<band>_pooled``: the ratios of the sample means, i.e.
  MDI with mean A_T, A_O, |T|, |O| over samples.

Memory stays bounded per sample: a hook on each layer's attention module reduces the
attention weights of the newest query to two numbers as soon as the layer computes
them; no attention matrix outlives its layer, and samples are processed one at a time.
The language model runs with eager attention during this evaluation only (fused
kernels do not produce attention weights); its previous implementation is restored.
"""

from __future__ import annotations

import math
from typing import Any

from workers.data import Dataset
from workers.evaluators import register_evaluator
from workers.evaluators._questions import fill_template
from workers.evaluators._vision import image_inputs

BANDS = ("early", "middle", "late")
DEFAULTS = {"new_tokens": 8, "bands": [1 / 3, 2 / 3], "template": "{prompt}"}


def band_of_layers(num_layers: int, cuts: list[float]) -> list[str]:
    """The band of each layer for cut fractions ``cuts`` (two increasing values in (0, 1))."""
    if len(cuts) != 2 or not 0 < cuts[0] < cuts[1] < 1:
        raise ValueError(f"modality_dominance.bands must be two increasing fractions in (0, 1), "
                         f"not {cuts}")
    first, second = round(cuts[0] * num_layers), round(cuts[1] * num_layers)
    if not 0 < first < second < num_layers:
        raise ValueError(f"{num_layers} layers cannot be split into three non-empty bands at "
                         f"{cuts}")
    return ["early" if i < first else "middle" if i < second else "late"
            for i in range(num_layers)]


def text_share(weights: Any, image_mask: Any) -> float:
    """A_T of one attention row set: ``weights`` [heads, keys ≥ inputs] of one query,
    ``image_mask`` [inputs] bool. Heads averaged, keys cut to the inputs, renormalised."""
    row = weights.double().mean(dim=0)[: image_mask.shape[0]]
    total = float(row.sum())
    if total <= 0:
        raise ValueError("a query gives no attention to the input tokens")
    return float(row[~image_mask].sum()) / total


def indices(a_text: float, n_text: int, n_image: int) -> tuple[float, float]:
    """(MDI, AEI_T) from A_T and the token counts (A_O = 1 − A_T)."""
    a_image = 1.0 - a_text
    mdi = math.inf if a_image <= 0 else (a_text / n_text) / (a_image / n_image)
    aei = a_text / (n_text / (n_text + n_image))
    return mdi, aei


class _Recorder:
    """Forward hooks that turn each layer's newest attention row into its A_T."""

    def __init__(self, model: Any, family: Any) -> None:
        self.layers = list(family.decoder_layers(model))
        self.attention = [family.attention(layer) for layer in self.layers]
        self.image_mask: Any = None
        self.shares: list[list[float]] = [[] for _ in self.layers]
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for index, module in enumerate(self.attention):
            self.handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, index: int):
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("the attention module returned no weights; eager attention "
                                   "is required")
            if weights.shape[2] == 1 and self.image_mask is not None:  # a generated token
                self.shares[index].append(text_share(weights[0, :, -1, :], self.image_mask))
            return (output[0], None, *output[2:])  # the weights are not kept
        return hook

    def reset(self, image_mask: Any) -> None:
        self.image_mask = image_mask
        self.shares = [[] for _ in self.layers]


@register_evaluator(
    "modality_dominance",
    metrics={**{f"{kind}_{band}{suffix}": None for kind in ("mdi", "aei") for band in BANDS
                for suffix in ("", "_pooled")},
             "md_samples": None, "md_generated_tokens": None},
    description="LangOverrule MDI and AEI per layer band (early/middle/late) from the attention "
                "of generated tokens onto text vs image input tokens, heads averaged.",
    kinds=("multiple_choice", "question"),
    settings=("modality_dominance",),
    images="required",
)
def evaluate(model: Any, tokenizer: Any, data: Dataset, settings: dict[str, Any],
             device: str = "cpu", processor: Any = None) -> dict[str, float]:
    """MDI/AEI of ``model`` on the image questions of ``data`` (see module docstring)."""
    import torch

    from workers.models import family_for

    family = family_for(model)
    if not family.is_vision_language or processor is None:
        raise ValueError("modality_dominance needs a vision-language model and its processor")
    missing = sum(1 for s in data.samples if s.image is None)
    if missing:
        raise ValueError(f"modality_dominance needs an image per question; {missing} of "
                         f"{len(data.samples)} samples of {data.name} have none")
    options = dict(DEFAULTS, **(settings.get("modality_dominance") or {}))
    new_tokens = int(options["new_tokens"])
    bands = band_of_layers(family.num_layers(model), list(options["bands"]))
    language_model = family.language_model(model)
    previous = language_model.config._attn_implementation
    per_sample: list[tuple[dict[str, float], int, int]] = []  # (band A_T, |T|, |O|)
    generated = 0
    language_model.set_attn_implementation("eager")
    try:
        with _Recorder(model, family) as recorder, torch.inference_mode():
            for sample in data.samples:
                text = fill_template(sample, options["template"],
                                     "modality_dominance.template")
                inputs = image_inputs(processor, text, sample.image, device)
                mask = family.image_token_mask(model, inputs["input_ids"])[0].cpu()
                n_image, n_input = int(mask.sum()), int(mask.shape[0])
                if n_image == 0:
                    raise ValueError("the processor put no image tokens in the prompt")
                recorder.reset(mask)
                # One more token than measured: the last generated token is fed back too.
                out = model.generate(**inputs, max_new_tokens=new_tokens + 1, do_sample=False,
                                     num_beams=1, min_new_tokens=new_tokens + 1)
                steps = len(recorder.shares[0])
                if steps != new_tokens or out.shape[1] - n_input != new_tokens + 1:
                    raise RuntimeError(f"expected {new_tokens} generated-token queries, "
                                       f"recorded {steps}")
                generated += steps
                band_share: dict[str, list[float]] = {b: [] for b in BANDS}
                for layer, shares in enumerate(recorder.shares):
                    band_share[bands[layer]].append(sum(shares) / len(shares))
                per_sample.append(({b: sum(v) / len(v) for b, v in band_share.items()},
                                   n_input - n_image, n_image))
    finally:
        language_model.set_attn_implementation(previous)
    result: dict[str, float] = {"md_samples": float(len(per_sample)),
                                "md_generated_tokens": float(generated)}
    n = len(per_sample)
    mean_text = sum(t for _, t, _ in per_sample) / n
    mean_image = sum(o for _, _, o in per_sample) / n
    for band in BANDS:
        values = [indices(shares[band], t, o) for shares, t, o in per_sample]
        result[f"mdi_{band}"] = sum(m for m, _ in values) / n
        result[f"aei_{band}"] = sum(a for _, a in values) / n
        mean_a_text = sum(s[band] for s, _, _ in per_sample) / n
        result[f"mdi_{band}_pooled"] = (
            math.inf if mean_a_text >= 1 else
            (mean_a_text / mean_text) / ((1 - mean_a_text) / mean_image))
        result[f"aei_{band}_pooled"] = mean_a_text / (mean_text / (mean_text + mean_image))
    return result
