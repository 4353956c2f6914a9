"""multiple_choice: lm-evaluation-harness's acc / acc_norm, checked against independent
computations (a NumPy llama2.c forward pass on OpenBookQA, and a hand-computed bigram model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.data import Dataset, Sample, load_dataset
from workers.evaluators import evaluators
from workers.evaluators.multiple_choice import (
    argmax,
    encode_pair,
    evaluate,
    log_likelihoods,
)


def mc(samples: list[tuple[str, list[str], int]], name: str = "mc") -> Dataset:
    return Dataset(name=name, kind="multiple_choice", format="multiple_choice", samples=tuple(
        Sample(id=str(i), question=q, choices=tuple(c), answer=a)
        for i, (q, c, a) in enumerate(samples)))


def test_registered_for_multiple_choice_datasets_only():
    info = evaluators()["multiple_choice"]
    assert info.kinds == ("multiple_choice",)
    assert info.metrics["acc"] == info.metrics["acc_norm"] == "higher"
    assert info.batch_setting == ("batch_size",)


def test_real_model_on_openbookqa_matches_numpy_reference(shared_data, llama2c_reference):
    """aidreams260K on 40 OpenBookQA questions: every choice's log-likelihood, and acc and
    acc_norm, equal a per-question computation with the independent NumPy llama2.c forward
    pass and tokenizer (no batching, no padding, no transformers)."""
    reference = llama2c_reference
    folder = shared_data / "aidreams260K"
    weights = reference.load_model(str(folder / "aidreams260K.bin"))
    vocab, scores, _ = reference.load_tok(str(folder / "tok512.bin"), weights["vs"])

    from workers.models import load_model

    loaded = load_model(f"llama2c:{folder}")
    data = load_dataset({"name": str(shared_data / "openbookqa" / "openbookqa.jsonl"),
                         "format": "openbookqa", "limit": 40}, seed=3)
    assert len(data) == 40

    expected_lls: list[float] = []
    correct = correct_norm = 0
    for sample in data.samples:
        lls = []
        for choice in sample.choices:
            context_ids = reference.encode(vocab, scores, sample.question, bos=True)
            whole = reference.encode(vocab, scores, sample.question + " " + choice, bos=True)
            logits = reference.forward_seq(weights, whole[:-1]).astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            lls.append(sum(logp[t - 1, whole[t]] for t in range(len(context_ids), len(whole))))
        expected_lls.extend(lls)
        correct += int(np.argmax(lls)) == sample.answer
        normed = [ll / len(c) for ll, c in zip(lls, sample.choices, strict=True)]
        correct_norm += int(np.argmax(normed)) == sample.answer

    requests = [encode_pair(loaded.tokenizer, s.question, " " + c)
                for s in data.samples for c in s.choices]
    ours, cut = log_likelihoods(loaded.model, requests, 128, 16, "cpu")
    assert not any(cut)
    assert ours == pytest.approx(expected_lls, abs=2e-4)
    result = evaluate(loaded.model, loaded.tokenizer, data, {"batch_size": 16})
    assert result == {"acc": correct / 40, "acc_norm": correct_norm / 40, "mc_samples": 40.0,
                      "mc_truncated": 0.0}


class Bigram(torch.nn.Module):
    """A "language model" whose next-token log-probabilities depend on the previous token
    only, from a fixed table: likelihoods are then easy to compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # [vocab, vocab] logits
        self.config = type("Config", (), {"max_position_embeddings": 64})()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_acc_and_acc_norm_by_hand(byte_tokenizer):
    """Choice "ab" has the higher total log-likelihood, choice "abcd" the higher per
    character: acc picks the first, acc_norm the second."""
    table = torch.full((260, 260), -30.0)
    # After the space "x" is likelier than "a"; then a→b→c→d and x→y are near certain.
    table[ord(" "), ord("a")] = -1.0
    table[ord(" "), ord("x")] = 0.0
    table[ord("a"), ord("b")] = 5.0
    table[ord("b"), ord("c")] = 5.0
    table[ord("c"), ord("d")] = 5.0
    table[ord("x"), ord("y")] = 5.0
    model = Bigram(table)
    logp = torch.log_softmax(table, dim=-1).double()

    def ll(prev: str, text: str) -> float:
        chars = prev + text
        return float(sum(logp[ord(chars[i]), ord(chars[i + 1])] for i in range(len(text))))

    lls = {c: ll("?", " " + c) for c in ("abcd", "xy")}
    assert lls["xy"] > lls["abcd"]  # the premise: longer choice, lower total
    assert lls["abcd"] / 4 > lls["xy"] / 2  # but better per character
    data = mc([("?", ["abcd", "xy"], 0), ("?", ["abcd", "xy"], 1)])
    result = evaluate(model, byte_tokenizer, data, {"batch_size": 3})
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.5  # acc: xy; acc_norm: abcd
    only_norm = mc([("?", ["abcd", "xy"], 0)])
    assert evaluate(model, byte_tokenizer, only_norm, {"batch_size": 1})["acc"] == 0.0
    assert evaluate(model, byte_tokenizer, only_norm, {"batch_size": 1})["acc_norm"] == 1.0
    requests = [encode_pair(byte_tokenizer, "?", " " + c) for c in ("abcd", "xy")]
    assert log_likelihoods(model, requests, 64, 2, "cpu")[0] == pytest.approx(
        [lls["abcd"], lls["xy"]], abs=1e-9)


def test_batching_and_padding_change_nothing(random_llama, byte_tokenizer):
    data = mc([("The sky is", ["blue", "a very long green answer", "red"], 0),
               ("Two plus two is", ["four", "five"], 0),
               ("Water is", ["wet", "dry as a desert", "hot", "cold"], 0)])
    requests = [encode_pair(byte_tokenizer, s.question, " " + c)
                for s in data.samples for c in s.choices]
    one = log_likelihoods(random_llama, requests, 256, 1, "cpu")[0]
    for batch_size in (2, 5, 9):
        assert log_likelihoods(random_llama, requests, 256, batch_size, "cpu")[0] == \
            pytest.approx(one, abs=1e-4)
    # Each request alone, computed directly: one forward pass, no padding at all.
    for (context, continuation), value in zip(requests, one, strict=True):
        full = torch.tensor([context + continuation])
        with torch.inference_mode():
            logprobs = torch.log_softmax(random_llama(input_ids=full[:, :-1]).logits, -1)[0]
        direct = sum(float(logprobs[len(context) + k - 1, t])
                     for k, t in enumerate(continuation))
        assert value == pytest.approx(direct, abs=1e-4)


def test_encode_pair_moves_trailing_space_and_keeps_boundary_tokens(byte_tokenizer):
    context, continuation = encode_pair(byte_tokenizer, "Q: why? ", "because")
    assert context == [256] + list(b"Q: why?")
    assert continuation == list(b" because")

    class Merging:  # "ab" is one token when a and b meet
        bos_id = None

        def encode(self, text: str) -> list[int]:
            return [99 if text[i:i + 2] == "ab" else ord(text[i])
                    for i in range(len(text)) if not (i > 0 and text[i - 1:i + 1] == "ab")]

    context, continuation = encode_pair(Merging(), "xa", "b")
    # The whole string encodes as x, ab: the context's own encoding (x, a) is longer, so the
    # continuation is what follows its length in the whole encoding (lm-evaluation-harness).
    assert context == [ord("x"), ord("a")] and continuation == []


def test_long_contexts_lose_tokens_from_the_left(random_llama, byte_tokenizer):
    question = "word " * 40
    data = mc([(question.strip(), ["yes", "no"], 0), ("short", ["yes", "no"], 1)])
    result = evaluate(random_llama, byte_tokenizer, data,
                      {"batch_size": 4, "multiple_choice": {"max_length": 32}})
    assert result["mc_truncated"] == 1.0
    context, continuation = encode_pair(byte_tokenizer, question.strip(), " yes")
    cut = log_likelihoods(random_llama, [(context, continuation)], 32, 1, "cpu")[0][0]
    kept = (context + continuation)[:-1][-32:]
    with torch.inference_mode():
        logprobs = torch.log_softmax(random_llama(input_ids=torch.tensor([kept])).logits, -1)[0]
    direct = sum(float(logprobs[32 - len(continuation) + k, t])
                 for k, t in enumerate(continuation))
    assert cut == pytest.approx(direct, abs=1e-4)


def test_ties_go_to_the_first_choice():
    assert argmax([1.0, 3.0, 3.0]) == 1
    assert argmax([-math.inf, -1.0]) == 1


def test_template_and_context(random_llama, byte_tokenizer):
    sample = Sample(id="0", question="Which?", choices=("a", "b"), answer=0, context="Hint.")
    data = Dataset("d", "multiple_choice", "scienceqa", (sample,))
    settings = {"batch_size": 2, "multiple_choice": {"template": "Q: {question}\nA:"}}
    assert evaluate(random_llama, byte_tokenizer, data, settings)["mc_samples"] == 1.0
    with pytest.raises(ValueError, match="unknown placeholder"):
        evaluate(random_llama, byte_tokenizer, data,
                 {"batch_size": 2, "multiple_choice": {"template": "{nope}"}})


def test_refuses_what_it_cannot_score(random_llama, byte_tokenizer):
    with pytest.raises(ValueError, match="multiple-choice datasets"):
        evaluate(random_llama, byte_tokenizer, Dataset.of_texts(["text"]), {"batch_size": 1})
    with_image = Dataset("v", "multiple_choice", "scienceqa", (
        Sample(id="0", question="What?", choices=("a", "b"), answer=0, image="x.png"),))
    with pytest.raises(ValueError, match="vision-language model"):
        evaluate(random_llama, byte_tokenizer, with_image, {"batch_size": 1})
