"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Definition. For each sample the *context* is the spec's ``multiple_choice.template``
filled with the sample (``{question}``, ``{context}``, ``{prompt}`` = context and
question on separate lines; default ``{prompt}``) and each *continuation* is
``delimiter`` (default one space) + the choice's text. A choice's log-likelihood is
Σ log p(token | everything before it) over the continuation's tokens, where the tokens
come from encoding context + continuation as one string and taking those after the
context's own encoding (so a token that spans the boundary is not split), with the
context's trailing whitespace moved to the continuation, and BOS first when the
tokenizer has one (lm-evaluation-harness's ``_encode_pair``). Contexts longer than the
model's window lose tokens from the left; how many samples were cut is reported
(``mc_truncated``).

- ``acc``: share of samples whose highest-log-likelihood choice is the answer.
- ``acc_norm``: the same with each log-likelihood divided by the length of the choice's
  text in characters (lm-evaluation-harness's ``acc_norm``).

Ties go to the first choice (``argmax``), as in lm-evaluation-harness. Every request
(sample × choice) is one row of a batch; only positions before a token score it, so
nothing later in the row can leak into a score.

Vision-language models (a processor is given): every question goes through the model's
processor and chat template (one user turn with the image, when the question has one,
and the text), the continuation's tokens are appended after the generation prompt, and
one forward pass per choice scores them; these contexts are not truncated. A text-only
model refuses image questions.
"""

from __future__ import annotations

from typing import Any

from workers.data import Dataset, Sample
from workers.evaluators import register_evaluator
from workers.evaluators._questions import check_questions, fill_template

DEFAULT_TEMPLATE = "{prompt}"
DEFAULT_DELIMITER = " "


def context_text(sample: Sample, template: str) -> str:
    """The sample's context string under ``template``."""
    return fill_template(sample, template, "multiple_choice.template")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids), split where lm-evaluation-harness splits."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + context_ids, whole[len(context_ids):]


def window_of(model: Any, settings: dict[str, Any]) -> int:
    """Longest input the model takes: ``multiple_choice.max_length`` or its position limit."""
    configured = (settings.get("multiple_choice") or {}).get("max_length")
    if configured:
        return int(configured)
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else 2048


def log_likelihoods(model: Any, requests: list[tuple[list[int], list[int]]], window: int,
                    batch_size: int, device: str) -> tuple[list[float], list[bool]]:
    """(Σ log p(continuation | context) per request, whether its context was cut)."""
    import torch

    rows: list[tuple[list[int], int]] = []  # (input ids, number of continuation tokens)
    cut: list[bool] = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a choice encodes to no tokens; its likelihood is undefined")
        if len(continuation) >= window:
            raise ValueError(f"a choice of {len(continuation)} tokens does not fit the "
                             f"model's window of {window}")
        full = context + continuation
        cut.append(len(full) - 1 > window)
        # The last token is only predicted, never fed; keep the newest window tokens.
        rows.append((full[:-1][-window:], len(continuation)))
    targets = [(context + continuation)[-len(continuation):] for context, continuation in requests]
    # Longest first, so padding inside a batch stays small (results are put back in order).
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = [0.0] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            length = max(len(rows[i][0]) for i in group)
            batch = torch.zeros(len(group), length, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.long)
            for r, i in enumerate(group):
                ids = rows[i][0]
                batch[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, :len(ids)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(group):
                ids, n = rows[i]
                # The input's last n positions predict the n continuation tokens.
                positions = torch.arange(len(ids) - n, len(ids), device=logprobs.device)
                wanted = torch.tensor(targets[i], dtype=torch.long, device=logprobs.device)
                scores[i] = float(logprobs[r, positions, wanted].double().sum())
    return scores, cut


def argmax(values: list[float]) -> int:
    """Index of the largest value; the first on ties."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


@register_evaluator(
    "multiple_choice",
    metrics={"acc": "higher", "acc_norm": "higher", "mc_samples": None, "mc_truncated": None},
    description="Multiple choice by log-likelihood of each choice given the question; acc and "
                "length-normalised acc_norm as lm-evaluation-harness defines them.",
    batch_setting=("batch_size",),
    kinds=("multiple_choice",),
    settings=("multiple_choice", "batch_size"),
    images="optional",
)
def evaluate(model: Any, tokenizer: Any, data: Dataset, settings: dict[str, Any],
             device: str = "cpu", processor: Any = None) -> dict[str, float]:
    """acc / acc_norm of ``model`` on the multiple-choice ``data`` (see module docstring)."""
    check_questions(data, "multiple_choice", "multiple_choice", "multiple-choice", processor)
    options = settings.get("multiple_choice") or {}
    template = options.get("template") or DEFAULT_TEMPLATE
    delimiter = options.get("delimiter", DEFAULT_DELIMITER)
    if processor is not None:
        # A vision-language model: every question through its processor and chat template,
        # with its image when it has one, so all questions are asked the same way.
        scores, cut = [], []
        for sample in data.samples:
            for choice in sample.choices or ():
                scores.append(image_log_likelihood(model, tokenizer, processor, sample,
                                                   context_text(sample, template),
                                                   delimiter + choice, device))
                cut.append(False)
    else:
        requests: list[tuple[list[int], list[int]]] = []
        for sample in data.samples:
            context = context_text(sample, template)
            for choice in sample.choices or ():
                requests.append(encode_pair(tokenizer, context, delimiter + choice))
        scores, cut = log_likelihoods(model, requests, window_of(model, settings),
                                      int(settings["batch_size"]), device)
    correct = correct_norm = truncated = 0
    at = 0
    for sample in data.samples:
        choices = sample.choices or ()
        lls = scores[at:at + len(choices)]
        truncated += any(cut[at:at + len(choices)])
        at += len(choices)
        correct += argmax(lls) == sample.answer
        normed = [ll / max(len(choice), 1) for ll, choice in zip(lls, choices, strict=True)]
        correct_norm += argmax(normed) == sample.answer
    n = len(data.samples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "mc_samples": float(n),
            "mc_truncated": float(truncated)}


# Processor outputs laid out per token, extended over the continuation: (key, fill value).
_PER_TOKEN_INPUTS = (("attention_mask", 1), ("mm_token_type_ids", 0), ("token_type_ids", 0))


def image_log_likelihood(model: Any, tokenizer: Any, processor: Any, sample: Sample,
                         context: str, continuation: str, device: str) -> float:
    """Σ log p(continuation | image, context) for a vision-language model.

    The context becomes the processor's prompt (chat template, image placeholder expanded
    into the image's tokens); the continuation's tokens are those that follow the prompt
    string's own encoding in the encoding of prompt + continuation, as for text.
    """
    import torch

    from workers.evaluators._vision import image_inputs, prompt_with_image, text_inputs

    prompt = (prompt_with_image(processor, context) if sample.image is not None
              else prompt_with_image(processor, context, image=False))
    whole = tokenizer.encode(prompt + continuation)
    own = tokenizer.encode(prompt)
    tail = whole[len(own):]
    if not tail:
        raise ValueError("a choice encodes to no tokens; its likelihood is undefined")
    inputs = (image_inputs(processor, context, sample.image, device) if sample.image is not None
              else text_inputs(processor, context, device))
    n_prompt = int(inputs["input_ids"].shape[1])
    extra = torch.tensor([tail], dtype=inputs["input_ids"].dtype, device=device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    for key, fill in _PER_TOKEN_INPUTS:
        if key in inputs and getattr(inputs[key], "shape", None) is not None \
                and inputs[key].shape[-1] == n_prompt:
            inputs[key] = torch.cat([inputs[key], torch.full_like(extra, fill)], dim=1)
    with torch.inference_mode():
        logits = model(**inputs).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    positions = torch.arange(n_prompt - 1, n_prompt - 1 + len(tail), device=logprobs.device)
    wanted = torch.tensor(tail, dtype=torch.long, device=logprobs.device)
    return float(logprobs[positions, wanted].double().sum())
