"""generation: batched greedy answers equal a one-at-a-time greedy loop, and the scores
(exact, normalised, VQA accuracy) equal independent computations."""

from __future__ import annotations

import pytest
import torch

from workers.data import Dataset, Sample
from workers.evaluators import evaluators
from workers.evaluators.generation import (
    cut_at_stop,
    evaluate,
    generate_text,
    normalize,
    vqa_accuracy,
    vqa_normalize,
)

OPTIONS = {"template": "{prompt}", "max_new_tokens": 6, "max_prompt_tokens": 512, "stop": []}
PROMPTS = ["The capital of France is", "Q: 2+2?\nA:", "x", "A much longer prompt than the rest, "
           "so that the batch needs left padding for the shorter ones"]


def greedy_one_by_one(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """Plain greedy decoding of one prompt: full forward pass per step, no cache, no pad."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_id:
                break
            out.append(token)
    return out


def test_registered_for_open_questions():
    info = evaluators()["generation"]
    assert info.kinds == ("question",)
    assert info.metrics["exact_match"] == info.metrics["vqa_acc"] == "higher"


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batched_left_padded_generation_equals_one_at_a_time(random_llama, byte_tokenizer,
                                                             batch_size):
    expected = [byte_tokenizer.decode(greedy_one_by_one(random_llama, byte_tokenizer, p, 6))
                .strip() for p in PROMPTS]
    got = generate_text(random_llama, byte_tokenizer, PROMPTS, OPTIONS, batch_size, "cpu")
    assert got == expected


def test_scores_count_matches_against_the_references(random_llama, byte_tokenizer):
    answers = generate_text(random_llama, byte_tokenizer, PROMPTS, OPTIONS, 2, "cpu")
    samples = [
        Sample(id="0", question=PROMPTS[0], answers=(answers[0],)),  # exact
        Sample(id="1", question=PROMPTS[1], answers=("nope", answers[1])),  # exact, second
        Sample(id="2", question=PROMPTS[2], answers=("certainly not this",)),  # no match
        Sample(id="3", question=PROMPTS[3], answers=("certainly not this either",)),
    ]
    data = Dataset("q", "question", "question", tuple(samples))
    settings = {"batch_size": 3, "generation": OPTIONS}
    result = evaluate(random_llama, byte_tokenizer, data, settings)
    assert result["exact_match"] == 0.5 and result["gen_samples"] == 4
    assert result["normalized_match"] >= 0.5
    assert "vqa_acc" not in result  # fewer than 3 references per question


def test_stop_strings_and_normalisation():
    assert cut_at_stop(" Paris\nQ: next", ["\n"]) == "Paris"
    assert cut_at_stop("a. b", [".", " "]) == "a"
    assert cut_at_stop(" yes ", []) == "yes"
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize("an apple, a pear") == "apple pear"


def _vqa_reference(prediction: str, humans: list[str]) -> float:
    """min(#matching humans among the other nine / 3, 1), averaged over the ten."""
    total = 0.0
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1:]
        total += min(1.0, sum(h == prediction for h in others) / 3)
    return total / len(humans)


@pytest.mark.parametrize("k", range(11))
def test_vqa_accuracy_by_number_of_matching_humans(k):
    humans = ["2"] * k + ["3"] * (10 - k)
    expected = (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10
    assert vqa_accuracy("2", humans) == pytest.approx(expected)
    assert vqa_accuracy("2", humans) == pytest.approx(_vqa_reference("2", humans))
    # Number words, articles, case and punctuation are processed as the official script does.
    assert vqa_accuracy("Two!", humans) == pytest.approx(expected)


def test_vqa_normalisation_follows_the_official_rules():
    assert vqa_normalize("The dog") == "dog"
    assert vqa_normalize("one") == "1"
    assert vqa_normalize("yes.") == "yes"
    assert vqa_normalize("3.5") == "3.5"  # a decimal point stays
    assert vqa_normalize("red,white") == "red white"  # no space around: a space
    assert vqa_normalize("red, white") == "red white"
    assert vqa_normalize("1,000") == "1000"  # a comma inside a number goes


def test_vqa_metric_on_a_dataset_with_ten_answers(random_llama, byte_tokenizer):
    answers = generate_text(random_llama, byte_tokenizer, PROMPTS[:2], OPTIONS, 2, "cpu")
    samples = (Sample(id="0", question=PROMPTS[0], answers=tuple([answers[0]] * 2 + ["x"] * 8)),
               Sample(id="1", question=PROMPTS[1], answers=tuple(["zzz"] * 10)))
    data = Dataset("v", "question", "vqav2", samples)
    result = evaluate(random_llama, byte_tokenizer, data, {"batch_size": 2, "generation": OPTIONS})
    first = _vqa_reference(vqa_normalize(answers[0]), [vqa_normalize(answers[0])] * 2
                           + ["x"] * 8)
    assert result["vqa_acc"] == pytest.approx((first + 0.0) / 2)


def test_refuses_what_it_cannot_score(random_llama, byte_tokenizer):
    with pytest.raises(ValueError, match="open-question datasets"):
        evaluate(random_llama, byte_tokenizer, Dataset.of_texts(["t"]), {"batch_size": 1})
    with_image = Dataset("v", "question", "vqav2", (
        Sample(id="0", question="What?", answers=("a",), image="x.png"),))
    with pytest.raises(ValueError, match="vision-language model"):
        evaluate(random_llama, byte_tokenizer, with_image, {"batch_size": 1})
    with pytest.raises(ValueError, match="unknown placeholder"):
        evaluate(random_llama, byte_tokenizer, Dataset("q", "question", "question", (
            Sample(id="0", question="Q", answers=("a",)),)),
            {"batch_size": 1, "generation": {"template": "{nope}"}})
