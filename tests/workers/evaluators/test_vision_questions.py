"""Image questions on tiny LLaVA and Qwen2.5-VL: multiple choice and generation through
the model's processor, checked against straightforward computations."""

from __future__ import annotations

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)
import torch

from workers.data import Dataset, Sample
from workers.evaluators import generation, multiple_choice
from workers.evaluators._vision import open_image, prompt_with_image


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from workers.models import load_model

    root = tmp_path_factory.mktemp("vlm-questions")
    images = []
    for seed in range(2):
        path = root / f"image{seed}.png"
        tiny_models.probe_image(seed=seed).save(path)
        images.append(str(path))
    loaded = {t: load_model(f"local:{tiny_models.BUILDERS[t](root / t)}")
              for t in tiny_models.VISION_LANGUAGE_MODEL_TYPES}
    return loaded, images


def choice_ll_straightforward(loaded, sample: Sample, continuation: str) -> float:
    """Process prompt and prompt + continuation as whole strings, score the extra tokens."""
    processor, model = loaded.processor, loaded.model
    prompt = prompt_with_image(processor, sample.question, image=sample.image is not None)
    kwargs = {"images": [open_image(sample.image)]} if sample.image is not None else {}
    short = processor(text=[prompt], return_tensors="pt", **kwargs)
    full = processor(text=[prompt + continuation], return_tensors="pt", **kwargs)
    n_prompt, n_full = short["input_ids"].shape[1], full["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][0, :n_prompt], short["input_ids"][0])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**full).logits[0].double(), dim=-1)
    return sum(float(logprobs[p - 1, full["input_ids"][0, p]]) for p in range(n_prompt, n_full))


@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_image_multiple_choice_equals_whole_string_processing(vlm, model_type):
    models, images = vlm
    loaded = models[model_type]
    samples = (
        Sample(id="0", question="Which picture is it?", choices=("red", "blue square", "green"),
               answer=1, image=images[0]),
        Sample(id="1", question="Is it bright?", choices=("yes", "no"), answer=0,
               image=images[1]),
        Sample(id="2", question="Without a picture: two plus two?", choices=("four", "five"),
               answer=0),  # ScienceQA has questions without an image too
    )
    data = Dataset("sqa", "multiple_choice", "scienceqa", samples)
    lls = [[choice_ll_straightforward(loaded, s, " " + c) for c in s.choices] for s in samples]
    ours = [[multiple_choice.image_log_likelihood(
        loaded.model, loaded.tokenizer, loaded.processor, s, s.question, " " + c, "cpu")
        for c in s.choices] for s in samples]
    for mine, theirs in zip(ours, lls, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    result = multiple_choice.evaluate(loaded.model, loaded.tokenizer, data, {"batch_size": 4},
                                      processor=loaded.processor)
    expected = sum(multiple_choice.argmax(row) == s.answer for row, s in zip(
        lls, samples, strict=True)) / 3
    assert result["acc"] == pytest.approx(expected) and result["mc_samples"] == 3
    # The image matters: another picture gives other likelihoods.
    swapped = Sample(id="0", question=samples[0].question, choices=samples[0].choices,
                     answer=1, image=images[1])
    assert multiple_choice.image_log_likelihood(
        loaded.model, loaded.tokenizer, loaded.processor, swapped, swapped.question, " red",
        "cpu") != pytest.approx(ours[0][0], abs=1e-6)


@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_image_generation_equals_generate_on_the_processor_inputs(vlm, model_type):
    models, images = vlm
    loaded = models[model_type]
    options = dict(generation.DEFAULTS, max_new_tokens=4, stop=[])
    samples = (Sample(id="0", question="Describe it.", answers=("x",), image=images[0]),
               Sample(id="1", question="What now, with a longer question than the first?",
                      answers=("y",), image=images[1]))
    expected = []
    for sample in samples:
        prompt = prompt_with_image(loaded.processor, sample.question)
        inputs = loaded.processor(text=[prompt], images=[open_image(sample.image)],
                                  return_tensors="pt")
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if loaded.tokenizer.eos_id in new:
            new = new[:new.index(loaded.tokenizer.eos_id)]
        expected.append(loaded.tokenizer.decode(new).strip())
    for batch_size in (1, 2):
        got = generation.generate_with_processor(
            loaded.model, loaded.tokenizer, loaded.processor, [s.question for s in samples],
            [s.image for s in samples], options, batch_size, "cpu")
        assert got == expected, batch_size
    data = Dataset("vqa", "question", "vqav2", (
        Sample(id="0", question="Describe it.", answers=(expected[0],), image=images[0]),
        Sample(id="1", question="What now?", answers=("surely not",), image=images[1])))
    result = generation.evaluate(loaded.model, loaded.tokenizer, data,
                                 {"batch_size": 2, "generation": options},
                                 processor=loaded.processor)
    assert result["exact_match"] == 0.5
