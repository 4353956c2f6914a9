"""Token-level perplexity with a sliding window.

Definition. The documents are tokenized one by one, each preceded by BOS (when the
tokenizer has one), and concatenated into one stream ``x_0 … x_{N-1}``. Windows of
``max_length`` tokens start every ``stride`` tokens (default ``max_length // 2``).
Every token ``x_t`` with ``t ≥ 1`` is scored exactly once, in the first window that
contains it at a position > 0 of that window's "new" part, with the context that
window gives it (at least ``max_length − stride`` previous tokens, except near the
start). perplexity = exp(−(1/(N−1)) Σ_t log p(x_t | window context)). This is the
strided evaluation of the transformers perplexity guide, except that no token is
skipped: ``stride`` must be below ``max_length``, because a window's first token has
no context inside that window (disjoint chunks would silently drop one token per
chunk).

Only logits at positions < t are used to score x_t, from a causal forward pass of the
window; the model never receives a label, so nothing future can leak through a loss
argument.
"""

from __future__ import annotations

import math
from typing import Any

from workers.data import Dataset, token_stream
from workers.evaluators import register_evaluator


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window: tokens first_scored..end-1 are scored."""
    out = []
    prev_end = 0
    begin = 0
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length), got {stride} with max_length "
                         f"{max_length}")
    while prev_end < n_tokens:
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
        begin += stride
    return out


def sum_log_likelihood(model: Any, ids: list[int], max_length: int, stride: int,
                       batch_size: int, device: str) -> tuple[float, int]:
    """(Σ log p, number of scored tokens) of the stream under the sliding-window definition."""
    import torch

    plan = windows(len(ids), max_length, stride)
    stream = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(plan), batch_size):
            group = plan[start:start + batch_size]
            length = max(end - begin for begin, end, _ in group)
            batch = torch.zeros(len(group), length, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.long)
            for row, (begin, end, _) in enumerate(group):
                batch[row, : end - begin] = stream[begin:end]
                mask[row, : end - begin] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, (begin, end, first) in enumerate(group):
                # logits at window position p predict the token at position p + 1.
                targets = stream[first:end].to(device)
                positions = torch.arange(first - begin - 1, end - begin - 1, device=device)
                picked = logprobs[row, positions, targets]
                total += float(picked.double().sum())
                count += int(targets.numel())
    return total, count


@register_evaluator(
    "perplexity",
    metrics={"perplexity": "lower", "nll_per_token": "lower", "eval_tokens": None},
    description="Token-level perplexity, sliding window (max_length, stride) over BOS-separated "
                "documents.",
    batch_setting=("batch_size",),
    kinds=("text",),
    settings=("max_length", "stride", "batch_size"),
)
def evaluate(model: Any, tokenizer: Any, data: Dataset, settings: dict[str, Any],
             device: str = "cpu", processor: Any = None) -> dict[str, float]:
    """Perplexity of ``model`` on the documents of ``data`` (definition: module docstring)."""
    max_length = int(settings["max_length"])
    stride = int(settings.get("stride") or max(1, max_length // 2))
    ids = token_stream(tokenizer, data.documents())
    if len(ids) < 2:
        raise ValueError("the dataset has fewer than 2 tokens; nothing to score")
    total, count = sum_log_likelihood(model, ids, max_length, stride,
                                      int(settings["batch_size"]), device)
    nll = -total / count
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "eval_tokens": float(count)}
