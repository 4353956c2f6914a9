"""LLaVA and Qwen2.5-VL on tiny checkpoints: processor, image positions, image forward.

Real PIL images go through the checkpoint's own processor; the image-token mask is
checked against the positions where the model itself replaced text embeddings by
image features.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import (
    LLAVA_IMAGE_SIZE,
    LLAVA_PATCH_SIZE,
    QWEN_VL_MERGE_SIZE,
    VISION_LANGUAGE_MODEL_TYPES,
    probe_image,
)


def image_prompt(loaded, question: str = "What is in the picture?") -> str:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]
    return loaded.processor.apply_chat_template(messages, add_generation_prompt=True)


def image_inputs(loaded, image=None) -> dict:
    image = probe_image() if image is None else image
    return dict(loaded.processor(images=image, text=image_prompt(loaded), return_tensors="pt"))


def expected_image_tokens(model_type: str, inputs: dict) -> int:
    """Image features per image, from the vision geometry (not from the mask)."""
    if model_type == "llava":
        return (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2  # CLS dropped by "default"
    grid = inputs["image_grid_thw"][0]
    return int(grid.prod()) // QWEN_VL_MERGE_SIZE ** 2


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_MODEL_TYPES)
def test_loaded_with_processor_and_its_tokenizer(tiny_loaded, tiny_checkpoint, model_type):
    loaded = tiny_loaded(model_type)
    processor = loaded.processor
    assert type(processor).__name__ == {"llava": "LlavaProcessor",
                                        "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    assert loaded.tokenizer.encode("a b") == processor.tokenizer.encode(
        "a b", add_special_tokens=False)
    family = loaded.family
    assert family.image_token_id(loaded.model) == processor.image_token_id
    saved = json.loads((tiny_checkpoint(model_type) / "processor_config.json").read_text())
    assert saved["processor_class"] == type(processor).__name__  # a standard checkpoint


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_MODEL_TYPES)
def test_image_token_mask_marks_exactly_the_positions_the_model_fills(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    inputs = image_inputs(loaded)
    ids = inputs["input_ids"]
    mask = family.image_token_mask(model, ids)
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    count = expected_image_tokens(model_type, inputs)
    assert int(mask.sum()) == count
    positions = mask[0].nonzero().flatten().tolist()
    assert positions == list(range(positions[0], positions[0] + count))  # one block
    if model_type == "qwen2_5_vl":
        tokenizer = loaded.processor.tokenizer
        assert int(ids[0, positions[0] - 1]) == tokenizer.convert_tokens_to_ids(
            "<|vision_start|>")
        assert int(ids[0, positions[-1] + 1]) == tokenizer.convert_tokens_to_ids(
            "<|vision_end|>")
        assert torch.equal(inputs["mm_token_type_ids"][0].bool(), mask[0])

    # The language model's input embeddings: image features exactly where the mask is.
    seen = {}

    def keep_embeds(_module, _args, kwargs) -> None:
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = family.language_model(model).register_forward_pre_hook(keep_embeds,
                                                                    with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        text_embeds = family.embeddings(model)(ids)
    same = (seen["embeds"] == text_embeds).all(dim=-1)
    assert torch.equal(~same, mask)


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_MODEL_TYPES)
def test_forward_with_an_image_runs_on_cpu_and_uses_the_image(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    calls = []
    handle = family.vision_tower(model).register_forward_hook(
        lambda *_: calls.append("vision"))
    try:
        inputs = image_inputs(loaded)
        with torch.no_grad():
            logits = model(**inputs).logits
            other = model(**image_inputs(loaded, probe_image(seed=1))).logits
            text_only = model(input_ids=torch.tensor([[loaded.tokenizer.bos_id,
                                                       *loaded.tokenizer.encode("hi")]])).logits
    finally:
        handle.remove()
    assert calls == ["vision", "vision"]  # not run for the text-only input
    assert logits.shape == (*inputs["input_ids"].shape, family.text_config(model).vocab_size)
    assert torch.isfinite(logits).all() and torch.isfinite(text_only).all()
    assert not torch.allclose(logits, other)  # a different image, different logits
    projector = family.multimodal_projector(model)
    out_features = [m.out_features for m in projector.modules()
                    if isinstance(m, torch.nn.Linear)][-1]
    assert out_features == family.text_config(model).hidden_size


@pytest.mark.parametrize("model_type", VISION_LANGUAGE_MODEL_TYPES)
def test_image_forward_after_dropping_language_layers(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    vision_layers = sum(1 for _ in family.vision_tower(model).modules())
    family.set_decoder_layers(model, list(family.decoder_layers(model))[:-1])
    assert sum(1 for _ in family.vision_tower(model).modules()) == vision_layers
    with torch.no_grad():
        logits = model(**image_inputs(loaded)).logits
    assert torch.isfinite(logits).all()
    assert model.config.text_config.num_hidden_layers == family.num_layers(model) == 2


def test_text_models_have_no_image_tokens(tiny_loaded):
    loaded = tiny_loaded("qwen3")
    with pytest.raises(ValueError, match="not vision-language"):
        loaded.family.image_token_mask(loaded.model, torch.tensor([[1, 2]]))
