"""Every evaluator that applies, on a tiny random model of every family.

Values of random models mean nothing; what is checked is that each evaluator runs on
each family, returns every metric it declares as a finite number, and that batching does
not change what it measures on that family (batch 1 vs a larger batch)."""

from __future__ import annotations

import math

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)

from workers.data import Dataset, Sample
from workers.evaluators import evaluators

SETTINGS = {
    "batch_size": 3, "max_length": 24, "stride": 12, "probe_length": 8,
    "speed": {"warmup": 1, "repeats": 2, "prompt_length": 8, "new_tokens": 2, "batch_size": 2,
              "prompts": 2},
    "multiple_choice": {"template": "{prompt}", "delimiter": " "},
    "generation": {"template": "{prompt}", "max_new_tokens": 3, "max_prompt_tokens": 64,
                   "stop": []},
    "modality_dominance": {"new_tokens": 2, "bands": [1 / 3, 2 / 3], "template": "{prompt}"},
}
TEXT = Dataset.of_texts(["The quick brown fox jumps over the lazy dog.",
                         "A second document, a little longer than the first one is.",
                         "Short third."])


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from workers.models import load_model

    root = tmp_path_factory.mktemp("every-family")
    image = root / "image.png"
    tiny_models.probe_image(seed=5).save(image)
    cache = {}

    def load(model_type: str):
        if model_type not in cache:
            cache[model_type] = load_model(
                f"local:{tiny_models.BUILDERS[model_type](root / model_type)}")
        return cache[model_type]

    return load, str(image)


def datasets_for(vision: bool, image: str) -> dict[str, Dataset]:
    img = image if vision else None
    return {
        "text": TEXT,
        "multiple_choice": Dataset("mc", "multiple_choice", "multiple_choice", tuple(
            Sample(id=str(i), question=q, choices=c, answer=0, image=img)
            for i, (q, c) in enumerate([("Sky colour?", ("blue", "a very long wrong answer")),
                                        ("Two plus two?", ("four", "five", "six"))]))),
        "question": Dataset("q", "question", "question", tuple(
            Sample(id=str(i), question=q, answers=("a", "b", "c"), image=img)
            for i, q in enumerate(["What is it?", "Where is the cat sitting now?"]))),
    }


CASES = [(model_type, name) for model_type in tiny_models.ALL_MODEL_TYPES
         for name in sorted(evaluators())
         if not (name == "modality_dominance"
                 and model_type not in tiny_models.VISION_LANGUAGE_MODEL_TYPES)]


@pytest.mark.parametrize("model_type,name", CASES)
def test_evaluator_runs_on_family(family_models, model_type, name):
    load, image = family_models
    loaded = load(model_type)
    info = evaluators()[name]
    vision = loaded.family.is_vision_language
    data_by_kind = datasets_for(vision, image)
    processor = loaded.processor if vision else None
    for kind in info.kinds:
        data = data_by_kind[kind]
        result = info.evaluate(loaded.model, loaded.tokenizer, data, SETTINGS, device="cpu",
                               processor=processor)
        assert set(result) <= set(info.metrics), set(result) - set(info.metrics)
        for metric, value in result.items():
            assert isinstance(value, float) and math.isfinite(value), (metric, value)
        if info.batch_setting == ("batch_size",) and name != "modality_dominance":
            single = info.evaluate(loaded.model, loaded.tokenizer, data,
                                   dict(SETTINGS, batch_size=1), device="cpu",
                                   processor=processor)
            for metric in ("perplexity", "acc", "acc_norm", "exact_match"):
                if metric in result:
                    assert single[metric] == pytest.approx(result[metric], rel=1e-4), metric
        if name == "generation" and processor is None:
            # Left padding must not change an answer (nor, for Mamba, its recurrent state).
            from workers.evaluators.generation import generate_text

            prompts = [s.question for s in data.samples] + ["x", "a longer prompt than most"]
            answers = [generate_text(loaded.model, loaded.tokenizer, [p], SETTINGS["generation"],
                                     1, "cpu")[0] for p in prompts]
            assert generate_text(loaded.model, loaded.tokenizer, prompts, SETTINGS["generation"],
                                 4, "cpu") == answers
