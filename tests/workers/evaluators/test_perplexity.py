"""Perplexity: checked against an independent token-by-token computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from workers.data import Dataset, token_stream
from workers.evaluators import evaluators
from workers.evaluators.perplexity import evaluate, windows

DOCS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen jugs.",
        "Sphinx of black quartz, judge my vow!"]


@given(n=st.integers(2, 400), max_length=st.integers(2, 64), data=st.data())
def test_every_token_after_the_first_is_scored_exactly_once(n, max_length, data):
    stride = data.draw(st.integers(1, max_length - 1))
    scored = []
    for begin, end, first in windows(n, max_length, stride):
        assert 0 <= begin < first < end <= n
        assert end - begin <= max_length
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def independent_perplexity(model, ids, max_length, stride):
    """One forward pass per scored token, with exactly the context its window gives it."""
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), max_length, stride):
        for t in range(first, end):
            context = torch.tensor([ids[begin:t]])
            with torch.no_grad():
                logits = model(input_ids=context).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[ids[t]])
            count += 1
    return math.exp(-total / count), count


@pytest.mark.parametrize("max_length,stride,batch_size", [(16, 8, 3), (16, 15, 1), (40, 7, 4)])
def test_matches_independent_computation(random_llama, byte_tokenizer, max_length, stride,
                                         batch_size):
    settings = {"max_length": max_length, "stride": stride, "batch_size": batch_size}
    result = evaluate(random_llama, byte_tokenizer, Dataset.of_texts(DOCS), settings)
    ids = token_stream(byte_tokenizer, DOCS)
    expected, count = independent_perplexity(random_llama, ids, max_length, stride)
    assert result["eval_tokens"] == count == len(ids) - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_one_window_equals_transformers_loss(random_llama, byte_tokenizer):
    ids = token_stream(byte_tokenizer, DOCS)
    tensor = torch.tensor([ids])
    with torch.no_grad():
        loss = float(random_llama(input_ids=tensor, labels=tensor).loss)
    result = evaluate(random_llama, byte_tokenizer, Dataset.of_texts(DOCS),
                      {"max_length": len(ids) + 1, "stride": 1, "batch_size": 1})
    assert result["nll_per_token"] == pytest.approx(loss, rel=1e-5)


def test_stride_must_leave_context():
    with pytest.raises(ValueError, match="stride"):
        windows(100, 16, 16)


def test_registered_with_directions():
    info = evaluators()["perplexity"]
    assert info.metrics["perplexity"] == "lower"


def test_refuses_empty_text(random_llama, byte_tokenizer):
    class Silent(type(byte_tokenizer)):
        bos_id = None

    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        evaluate(random_llama, Silent(), Dataset.of_texts([""]), {"max_length": 8, "batch_size": 1})


def test_real_model_perplexity_matches_numpy_reference(shared_data, llama2c_reference):
    """aidreams260K on WikiText-2: our sliding-window perplexity equals one computed with the
    independent NumPy llama2.c implementation, for the base model and with its top layer
    dropped (the layer-dropped model scores better on this out-of-domain text)."""
    import numpy as np

    from workers.data import load_documents
    from workers.methods import MethodContext, get_method
    from workers.models import load_model

    reference = llama2c_reference
    weights = reference.load_model(str(shared_data / "aidreams260K" / "aidreams260K.bin"))

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    docs = load_documents(str(shared_data / "wikitext2" / "test.txt"), None, 6)
    ids = token_stream(loaded.tokenizer, docs)[:300]
    max_length, stride = 96, 40

    def reference_ppl(layers: int) -> float:
        params = dict(weights, nl=layers)
        total, count = 0.0, 0
        for begin, end, first in windows(len(ids), max_length, stride):
            logits = reference.forward_seq(params, ids[begin:end])
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            for t in range(first, end):
                total += logp[t - begin - 1, ids[t]]
                count += 1
        return math.exp(-total / count)

    settings = {"max_length": max_length, "stride": stride, "batch_size": 4}

    class Fixed:  # the same token stream, whatever the documents
        bos_id = None

        def encode(self, text):
            return ids if text == "all" else []

    ours = evaluate(loaded.model, Fixed(), Dataset.of_texts(["all"]), settings)["perplexity"]
    assert ours == pytest.approx(reference_ppl(4), rel=1e-4)
    method = get_method("drop_layers")
    context = MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0,
                            device="cpu", calibration_documents=lambda *_: [])
    dropped = method.apply(loaded.model, 0.25, method.config(), context).model
    dropped_ppl = evaluate(dropped, Fixed(), Dataset.of_texts(["all"]), settings)["perplexity"]
    assert dropped_ppl == pytest.approx(reference_ppl(3), rel=1e-4)
