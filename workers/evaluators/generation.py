"""Greedy generation, scored against reference answers: exact match, normalised match, VQA.

Protocol. Each sample's prompt is the spec's ``generation.template`` filled with the
sample (``{question}``, ``{context}``, ``{prompt}``; default ``{prompt}``), preceded by
BOS when the tokenizer has one and cut to its last ``generation.max_prompt_tokens``
tokens. Prompts are generated in batches of ``batch_size`` (left-padded, with an
attention mask, so every prompt ends where generation starts), greedily, for at most
``generation.max_new_tokens`` tokens; a sample's answer ends at EOS or at the first
``generation.stop`` string (default: a newline), whichever comes first, and is stripped.
With a vision-language model every question goes through its processor and chat
template (one user turn: the image, when the question has one, and the text), in
left-padded batches of ``batch_size`` (questions with and without an image apart); a
text-only model refuses image questions.

Metrics (over samples; a sample counts as matched when it matches any reference answer):

- ``exact_match``: the answer equals a reference exactly (after stripping whitespace).
- ``normalized_match``: equal after SQuAD-style normalisation (lower case, punctuation
  removed, the articles a/an/the removed, whitespace collapsed).
- ``vqa_acc`` (only when every sample has at least 3 reference answers, as VQAv2's ten):
  the VQA accuracy of the official evaluation, min(#matching references / 3, 1) averaged
  over the ten leave-one-out subsets of nine references, after the official answer
  processing (lower case; punctuation removed or replaced by a space as the official
  script does; number words to digits; articles dropped). The official script's table
  of contractions ("dont" → "don't") is not applied.
"""

from __future__ import annotations

import re
import string
from typing import Any

from workers.data import Dataset, Sample
from workers.evaluators import register_evaluator
from workers.evaluators._questions import check_questions, fill_template

DEFAULTS = {"template": "{prompt}", "max_new_tokens": 16, "max_prompt_tokens": 512,
            "stop": ["\n"]}


# --------------------------------------------------------------------------- scoring


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


_VQA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
              "<", "@", "`", ",", "?", "!"]
_VQA_DIGITS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def vqa_normalize(answer: str) -> str:
    """The official VQA answer processing (punctuation, digits, articles), without its
    contractions table."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _VQA_PUNCT:
        # A mark between words becomes nothing when spaced ("a , b"), else a space.
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_VQA_DIGITS.get(w, w) for w in out.split() if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """Official VQA accuracy of one answer against its (ten) human answers."""
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(r) for r in references]
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
    return sum(scores) / len(scores)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string; stripped."""
    end = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                end = min(end, at)
    return text[:end].strip()


def prompt_text(sample: Sample, template: str) -> str:
    return fill_template(sample, template, "generation.template")


# --------------------------------------------------------------------------- generation


def generate_text(model: Any, tokenizer: Any, prompts: list[str], options: dict[str, Any],
                  batch_size: int, device: str) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, cut at a stop string)."""
    import torch

    limit = int(options["max_prompt_tokens"])
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    encoded = [(bos + tokenizer.encode(p))[-limit:] for p in prompts]
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            length = max(len(encoded[i]) for i in group)
            ids = torch.full((len(group), length), pad, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, length - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, length - len(encoded[i]):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=int(options["max_new_tokens"]), do_sample=False,
                num_beams=1, pad_token_id=pad,
                eos_token_id=tokenizer.eos_id if tokenizer.eos_id is not None else None)
            for row, i in enumerate(group):
                new = out[row, length:].tolist()
                if tokenizer.eos_id is not None and tokenizer.eos_id in new:
                    new = new[:new.index(tokenizer.eos_id)]
                answers[i] = cut_at_stop(tokenizer.decode(new), list(options["stop"]))
    return answers


def generate_with_processor(model: Any, tokenizer: Any, processor: Any, prompts: list[str],
                            images: list[Any], options: dict[str, Any], batch_size: int,
                            device: str) -> list[str]:
    """Greedy answers of a vision-language model, in batches of questions through its
    processor (left-padded; questions with and without an image in separate batches)."""
    import torch

    from workers.evaluators._vision import open_image, prompt_with_image

    text_tokenizer = processor.tokenizer
    saved = (text_tokenizer.padding_side, text_tokenizer.pad_token)
    text_tokenizer.padding_side = "left"  # every prompt ends where generation starts
    if text_tokenizer.pad_token is None:
        text_tokenizer.pad_token = text_tokenizer.eos_token
    answers: list[str] = [""] * len(prompts)
    groups = [[i for i, image in enumerate(images) if image is not None],
              [i for i, image in enumerate(images) if image is None]]
    try:
        for group in groups:
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                with_image = images[chunk[0]] is not None
                kwargs = {"images": [open_image(images[i]) for i in chunk]} if with_image else {}
                inputs = processor(
                    text=[prompt_with_image(processor, prompts[i], image=with_image)
                          for i in chunk], padding=True, return_tensors="pt", **kwargs)
                inputs = {k: v.to(device) if hasattr(v, "to") else v
                          for k, v in dict(inputs).items()}
                with torch.inference_mode():
                    out = model.generate(**inputs,
                                         max_new_tokens=int(options["max_new_tokens"]),
                                         do_sample=False, num_beams=1,
                                         pad_token_id=text_tokenizer.pad_token_id)
                width = inputs["input_ids"].shape[1]
                for row, i in enumerate(chunk):
                    new = out[row, width:].tolist()
                    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
                        new = new[:new.index(tokenizer.eos_id)]
                    answers[i] = cut_at_stop(tokenizer.decode(new), list(options["stop"]))
    finally:
        text_tokenizer.padding_side, text_tokenizer.pad_token = saved
    return answers


@register_evaluator(
    "generation",
    metrics={"exact_match": "higher", "normalized_match": "higher", "vqa_acc": "higher",
             "gen_samples": None},
    description="Greedy generation scored against reference answers: exact match, "
                "normalised match, and VQAv2 accuracy (min(#matching humans / 3, 1)).",
    batch_setting=("batch_size",),
    kinds=("question",),
    settings=("generation", "batch_size"),
    images="optional",
)
def evaluate(model: Any, tokenizer: Any, data: Dataset, settings: dict[str, Any],
             device: str = "cpu", processor: Any = None) -> dict[str, float]:
    """Scores of ``model``'s greedy answers on the open questions of ``data``."""
    check_questions(data, "generation", "question", "open-question", processor)
    options = dict(DEFAULTS, **(settings.get("generation") or {}))
    prompts = [prompt_text(s, options["template"]) for s in data.samples]
    if processor is not None:
        answers = generate_with_processor(model, tokenizer, processor, prompts,
                                          [s.image for s in data.samples], options,
                                          int(settings["batch_size"]), device)
    else:
        answers = generate_text(model, tokenizer, prompts, options,
                                int(settings["batch_size"]), device)
    exact = normalized = 0
    for sample, answer in zip(data.samples, answers, strict=True):
        references = list(sample.answers or ())
        exact += any(answer == r.strip() for r in references)
        normalized += any(normalize(answer) == normalize(r) for r in references)
    n = len(data.samples)
    result = {"exact_match": exact / n, "normalized_match": normalized / n,
              "gen_samples": float(n)}
    if all(len(s.answers or ()) >= 3 for s in data.samples):
        result["vqa_acc"] = sum(vqa_accuracy(a, list(s.answers or ()))
                                for s, a in zip(data.samples, answers, strict=True)) / n
    return result
