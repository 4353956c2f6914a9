"""modality_dominance: MDI/AEI by hand on constructed attention, and on tiny LLaVA and
Qwen2.5-VL equal to a straightforward computation from the full attention matrices that
transformers returns with output_attentions (what the streaming hooks avoid holding)."""

from __future__ import annotations

import math

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)
import torch

from workers.data import Dataset, Sample
from workers.evaluators import evaluators
from workers.evaluators._vision import image_inputs
from workers.evaluators.modality_dominance import (
    BANDS,
    band_of_layers,
    evaluate,
    indices,
    text_share,
)


def test_registered_for_question_kinds_with_explicit_metrics():
    info = evaluators()["modality_dominance"]
    assert set(info.kinds) == {"multiple_choice", "question"}
    for kind in ("mdi", "aei"):
        for band in BANDS:
            assert info.metrics[f"{kind}_{band}"] is None
            assert info.metrics[f"{kind}_{band}_pooled"] is None


def test_band_split_thirds_and_parameter():
    assert band_of_layers(32, [1 / 3, 2 / 3]).count("early") == 11
    assert band_of_layers(32, [1 / 3, 2 / 3]).count("middle") == 10
    assert band_of_layers(32, [1 / 3, 2 / 3]).count("late") == 11
    assert band_of_layers(3, [1 / 3, 2 / 3]) == ["early", "middle", "late"]
    assert band_of_layers(10, [0.2, 0.5]) == ["early"] * 2 + ["middle"] * 3 + ["late"] * 5
    with pytest.raises(ValueError, match="three non-empty bands"):
        band_of_layers(2, [1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="increasing"):
        band_of_layers(12, [0.6, 0.3])


def test_indices_by_hand():
    # 4 text tokens, 12 image tokens; 80 % of the attention on text.
    mdi, aei = indices(0.8, 4, 12)
    assert mdi == pytest.approx((0.8 / 4) / (0.2 / 12))  # 12.0
    assert aei == pytest.approx(0.8 / (4 / 16))  # 3.2
    # Attention spread evenly over tokens: both are 1.
    assert indices(0.25, 4, 12) == pytest.approx((1.0, 1.0))
    assert indices(1.0, 4, 12)[0] == math.inf


def test_text_share_averages_heads_and_renormalises_over_inputs():
    image = torch.tensor([False, True, True, False])  # 4 input tokens, 2 of them image
    weights = torch.tensor([
        # head 0: inputs 0.1 0.2 0.3 0.2, then 0.2 on a generated token
        [0.1, 0.2, 0.3, 0.2, 0.2],
        # head 1: all on the first (text) token
        [1.0, 0.0, 0.0, 0.0, 0.0],
    ])
    # Heads averaged: inputs [0.55, 0.1, 0.15, 0.1] (sum 0.9); text = 0.65 / 0.9.
    assert text_share(weights, image) == pytest.approx(0.65 / 0.9)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from workers.models import load_model

    root = tmp_path_factory.mktemp("vlm")
    image = root / "image.png"
    tiny_models.probe_image(seed=3).save(image)

    def load(model_type: str):
        loaded = load_model(f"local:{tiny_models.BUILDERS[model_type](root / model_type)}")
        # Sharper attention than a random init gives, so the indices move away from 1.
        with torch.no_grad():
            for layer in loaded.family.decoder_layers(loaded.model):
                projections = loaded.family.attention_projections(layer)
                projections["q"].weight.mul_(30.0)
                projections["k"].weight.mul_(30.0)
        return loaded

    return load, str(image)


def straightforward(loaded, data: Dataset, new_tokens: int, cuts: list[float]) -> dict:
    """The definition computed the obvious way: eager attention, output_attentions=True,
    every step's full attention tensors kept, then reduced with plain loops."""
    model, family = loaded.model, loaded.family
    language_model = family.language_model(model)
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    bands = band_of_layers(family.num_layers(model), cuts)
    rows = []
    try:
        for sample in data.samples:
            inputs = image_inputs(loaded.processor, sample.prompt(), sample.image, "cpu")
            image = family.image_token_mask(model, inputs["input_ids"])[0]
            n_in = image.numel()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=new_tokens + 1, do_sample=False,
                                     min_new_tokens=new_tokens + 1, output_attentions=True,
                                     return_dict_in_generate=True)
            steps = out.attentions[1:]  # step 0 is the prompt; then one per fed-back token
            assert len(steps) == new_tokens
            per_layer = []
            for layer in range(len(bands)):
                shares = []
                for step in steps:
                    row = step[layer][0, :, -1, :n_in].double()  # [heads, inputs]
                    mean = row.mean(dim=0)
                    shares.append(float(mean[~image].sum() / mean.sum()))
                per_layer.append(sum(shares) / len(shares))
            band_share = {b: sum(s for s, lb in zip(per_layer, bands, strict=True) if lb == b)
                          / bands.count(b) for b in BANDS}
            rows.append((band_share, int((~image).sum()), int(image.sum())))
    finally:
        language_model.set_attn_implementation(previous)
    result = {}
    n = len(rows)
    t_mean = sum(t for _, t, _ in rows) / n
    o_mean = sum(o for _, _, o in rows) / n
    for band in BANDS:
        result[f"mdi_{band}"] = sum((s[band] / t) / ((1 - s[band]) / o) for s, t, o in rows) / n
        result[f"aei_{band}"] = sum(s[band] / (t / (t + o)) for s, t, o in rows) / n
        a = sum(s[band] for s, _, _ in rows) / n
        result[f"mdi_{band}_pooled"] = (a / t_mean) / ((1 - a) / o_mean)
        result[f"aei_{band}_pooled"] = a / (t_mean / (t_mean + o_mean))
    return result


@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_streaming_hooks_equal_the_full_attention_computation(tiny_vlm, model_type):
    load, image = tiny_vlm
    loaded = load(model_type)
    questions = ["What is shown?", "Which colour dominates the picture here?", "Count it."]
    data = Dataset("mmmu", "multiple_choice", "mmmu_pro", tuple(
        Sample(id=str(i), question=q, choices=("a", "b"), answer=0, image=image)
        for i, q in enumerate(questions)))
    settings = {"modality_dominance": {"new_tokens": 3, "bands": [1 / 3, 2 / 3],
                                       "template": "{prompt}"}}
    before = loaded.family.language_model(loaded.model).config._attn_implementation
    ours = evaluate(loaded.model, loaded.tokenizer, data, settings, processor=loaded.processor)
    assert loaded.family.language_model(loaded.model).config._attn_implementation == before
    assert ours["md_samples"] == 3 and ours["md_generated_tokens"] == 9
    expected = straightforward(loaded, data, 3, [1 / 3, 2 / 3])
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name
    # The sharpened model does not attend evenly: the indices are informative here.
    assert any(abs(ours[f"mdi_{band}"] - 1) > 0.05 for band in BANDS)
    # Mean of ratios and ratio of means differ: both are reported.
    assert any(ours[f"mdi_{b}"] != pytest.approx(ours[f"mdi_{b}_pooled"]) for b in BANDS)


def test_refuses_text_models_and_questions_without_images(tiny_vlm, random_llama,
                                                          byte_tokenizer):
    load, image = tiny_vlm
    data = Dataset("q", "question", "question", (Sample(id="0", question="Q?", answers=("a",),
                                                        image=image),))
    with pytest.raises(ValueError, match="vision-language model"):
        evaluate(random_llama, byte_tokenizer, data, {})
    loaded = load("llava")
    no_image = Dataset("q", "question", "question", (Sample(id="0", question="Q?",
                                                            answers=("a",)),))
    with pytest.raises(ValueError, match="1 of 1 samples of q have none"):
        evaluate(loaded.model, loaded.tokenizer, no_image, {}, processor=loaded.processor)
