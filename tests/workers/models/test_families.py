"""Family adapters on real (tiny, random) checkpoints of every family.

Each adapter accessor is checked against the model's behaviour, not just its attribute
names: the embedding feeds layer 0, ``final_norm`` + ``lm_head`` produce the logits,
perturbing one KV head changes exactly its query heads' attention, the norm of a
post-norm family sees the raw attention output, and removing layers or masking heads
gives a model that runs, saves and reloads identically.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import (
    ALL_MODEL_TYPES,
    ATTENTION_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    VISION_LANGUAGE_MODEL_TYPES,
)
from transformers import AutoConfig

from workers.evaluators.perplexity import sum_log_likelihood
from workers.methods import MethodContext, get_method
from workers.methods.drop_layers import DropLayersConfig
from workers.methods.head_mask import HeadMaskConfig
from workers.models import model_families

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
CALIBRATION = ["Calibration text about attention heads and layers. " * 6,
               "A second calibration document, with different words in it. " * 6]

EXPECTED_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen3": "qwen",
                   "exaone4": "exaone4", "mamba": "mamba", "llava": "llava",
                   "qwen2_5_vl": "qwen2_5_vl"}


def probe_ids(loaded, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([[loaded.tokenizer.bos_id, *loaded.tokenizer.encode(text)]])


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def store_input(store: dict, key: str):
    """A forward pre-hook (with kwargs) keeping the module's first input in ``store``."""
    def hook(_module, args, kwargs) -> None:
        store.setdefault(key, args[0] if args else kwargs["hidden_states"])
    return hook


def store_output(store: dict, key: str):
    """A forward hook keeping the module's output in ``store``."""
    def hook(_module, _args, output) -> None:
        store.setdefault(key, output)
    return hook


def context_for(loaded) -> MethodContext:
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
                         calibration_documents=lambda name, split, seed: CALIBRATION)


def test_every_family_is_registered_once_per_model_type():
    families = model_families()
    assert set(families) == {"llama", "qwen", "exaone4", "mamba", "llava", "qwen2_5_vl"}
    model_types = [t for family in families.values() for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    assert {"qwen2", "qwen3", "exaone4", "mamba", "llava", "qwen2_5_vl"} <= set(model_types)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_loading_picks_the_family_and_the_auto_class(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    family = loaded.family
    assert family.name == EXPECTED_FAMILY[model_type]
    assert loaded.model.config.model_type == model_type
    assert not loaded.model.training
    vision = model_type in VISION_LANGUAGE_MODEL_TYPES
    assert family.is_vision_language is vision
    assert (loaded.processor is not None) is vision
    assert loaded.info["auto_class"] == ("AutoModelForImageTextToText" if vision
                                         else "AutoModelForCausalLM")
    assert family.has_attention is (model_type != "mamba")
    assert family.is_post_norm is (model_type == "exaone4")
    # The tokenizer adapter round-trips text (byte-level tokenizer, no merges).
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(TEXT)) == TEXT
    if vision:
        assert loaded.tokenizer.vocab_size == len(loaded.processor.tokenizer)
    else:
        with pytest.raises(ValueError, match="not vision-language"):
            family.vision_tower(loaded.model)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_layers_embeddings_final_norm_and_lm_head_are_the_ones_that_run(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    config = family.text_config(model)
    layers = family.decoder_layers(model)
    assert family.num_layers(model) == len(layers) == config.num_hidden_layers
    assert layers is family.language_model(model).layers
    prefix = family.decoder_layers_prefix(model)
    names = dict(model.named_parameters())
    for name, parameter in layers[1].named_parameters():
        assert names[f"{prefix}.1.{name}"] is parameter
    if family.is_vision_language:
        assert family.language_model(model).config is config
        assert family.language_model(model) is not model.model  # the text decoder only

    ids = probe_ids(loaded)
    seen = {}
    handles = [
        layers[0].register_forward_pre_hook(store_input(seen, "layer0_in"), with_kwargs=True),
        family.final_norm(model).register_forward_hook(store_output(seen, "final_norm_out")),
    ]
    try:
        logits = logits_of(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen["layer0_in"], family.embeddings(model)(ids))
        torch.testing.assert_close(family.lm_head(model)(seen["final_norm_out"]), logits)
    assert family.embeddings(model).num_embeddings == config.vocab_size


@pytest.mark.parametrize("model_type", ATTENTION_MODEL_TYPES)
def test_head_counts_and_projection_shapes_match_the_config(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    config = family.text_config(model)
    heads, kv_heads, head_dim = (family.num_heads(model), family.num_kv_heads(model),
                                 family.head_dim(model))
    assert heads == config.num_attention_heads
    assert kv_heads == config.num_key_value_heads < heads  # every tiny model uses GQA
    assert family.heads_per_kv_group(model) == heads // kv_heads
    for layer in family.decoder_layers(model):
        projections = family.attention_projections(layer)
        assert family.attention_output_projection(layer) is projections["o"]
        assert projections["o"] is family.attention(layer).o_proj
        assert projections["o"].in_features == heads * head_dim
        assert projections["q"].out_features == heads * head_dim
        assert projections["k"].out_features == projections["v"].out_features == (
            kv_heads * head_dim)
        mlp = family.mlp_projections(layer)
        assert set(mlp) == {"gate", "up", "down"}
        assert mlp["down"] is family.mlp(layer).down_proj
        assert mlp["gate"].out_features == mlp["up"].out_features == (
            mlp["down"].in_features) == config.intermediate_size
    # Qwen2 puts biases on q/k/v; Qwen3 sets head_dim apart from hidden/heads.
    first = family.attention_projections(family.decoder_layers(model)[0])
    assert (first["q"].bias is not None) is (model_type in ("qwen2", "qwen2_5_vl"))
    if model_type == "qwen3":
        assert head_dim == config.head_dim != config.hidden_size // heads


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_norms_are_every_norm_of_the_layer(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    family = loaded.family
    layer = family.decoder_layers(loaded.model)[0]
    norms = family.norms(layer)
    # Found independently: every module of the layer whose class is a norm.
    found = {name for name, module in layer.named_modules()
             if "Norm" in type(module).__name__}
    assert set(norms) == found
    modules = dict(layer.named_modules())
    assert all(modules[name] is module for name, module in norms.items())
    assert ("self_attn.q_norm" in norms) is (model_type in ("qwen3", "exaone4"))


@pytest.mark.parametrize("model_type", ATTENTION_MODEL_TYPES)
def test_post_norm_means_a_norm_sees_the_raw_attention_output(tiny_loaded, model_type):
    """is_post_norm ⇔ one of the layer's norms takes o_proj's output as it is."""
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    layer = family.decoder_layers(model)[0]
    captured: dict[str, torch.Tensor] = {}
    handles = [family.attention_output_projection(layer).register_forward_hook(
        store_output(captured, "o_proj"))]
    for name, norm in family.norms(layer).items():
        handles.append(norm.register_forward_pre_hook(store_input(captured, name),
                                                      with_kwargs=True))
    try:
        logits_of(model, probe_ids(loaded))
    finally:
        for handle in handles:
            handle.remove()
    normalises_attention_output = any(
        value.shape == captured["o_proj"].shape and torch.equal(value, captured["o_proj"])
        for name, value in captured.items() if name != "o_proj")
    assert normalises_attention_output is family.is_post_norm


@pytest.mark.parametrize("model_type", ATTENTION_MODEL_TYPES)
def test_kv_group_is_the_key_head_a_query_head_reads(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type, attn_implementation="eager")
    model, family = loaded.model, loaded.family
    heads, head_dim = family.num_heads(model), family.head_dim(model)
    groups = [family.kv_group(model, head) for head in range(heads)]
    assert groups == [head // family.heads_per_kv_group(model) for head in range(heads)]
    with pytest.raises(ValueError):
        family.kv_group(model, heads)
    ids = probe_ids(loaded)

    def attentions():
        with torch.no_grad():
            return model(input_ids=ids, output_attentions=True).attentions[0][0]

    before = attentions()
    key = family.attention_projections(family.decoder_layers(model)[0])["k"]
    with torch.no_grad():
        key.weight[1 * head_dim:2 * head_dim] *= 3.0  # KV head 1's keys only
    after = attentions()
    changed = [head for head in range(heads) if not torch.allclose(before[head], after[head])]
    assert changed == [head for head in range(heads) if groups[head] == 1]


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_dropping_layers_keeps_a_working_model_that_reloads(tiny_loaded, model_type, tmp_path):
    from workers.models import load_model

    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    before = list(family.decoder_layers(model))
    types_before = list(getattr(family.text_config(model), "layer_types", None) or [])
    config = DropLayersConfig.model_validate({"from": "bottom"})
    outcome = get_method("drop_layers").apply(model, 0.25, config, context_for(loaded))
    assert outcome.info["dropped_layers"] == [0]
    variant = outcome.model
    layers = family.decoder_layers(variant)
    assert list(layers) == before[1:]
    text_config = family.text_config(variant)
    assert text_config.num_hidden_layers == len(layers) == len(before) - 1
    if types_before:
        # The kept layers' types by index (EXAONE: sliding/global alternate), not a prefix.
        assert list(text_config.layer_types) == types_before[1:]
    assert {m.layer_idx for i, layer in enumerate(layers) for m in layer.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and m.layer_idx != i} == set()
    ids = probe_ids(loaded)
    logits = logits_of(variant, ids)
    assert torch.isfinite(logits).all()

    variant.save_pretrained(tmp_path)
    (loaded.processor or loaded.tokenizer).save_pretrained(tmp_path)
    reloaded = load_model(f"local:{tmp_path}")
    assert family.num_layers(reloaded.model) == len(layers)
    assert torch.equal(logits_of(reloaded.model, ids), logits)
    # The stock config reader agrees (no adapter involved).
    stock = AutoConfig.from_pretrained(tmp_path)
    stock = getattr(stock, "text_config", stock)
    assert stock.num_hidden_layers == len(layers)


def test_exaone_layer_types_follow_the_kept_layers_not_a_prefix(tiny_loaded, tmp_path):
    """Keeping layers 1 and 2 must keep [global, sliding]; a prefix would say
    [sliding, global] and rebuild each layer as the other kind on reload."""
    from workers.models import load_model

    loaded = tiny_loaded("exaone4")
    model, family = loaded.model, loaded.family
    layers = list(family.decoder_layers(model))
    kinds = [layer.self_attn.is_sliding for layer in layers]
    kept = family.set_decoder_layers(model, [layers[1], layers[2]])
    assert kept == [1, 2]
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(f"local:{tmp_path}").model
    assert [layer.self_attn.is_sliding for layer in reloaded.model.layers] == kinds[1:3]
    ids = probe_ids(loaded)  # longer than the sliding window (4 tokens)
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))


def test_set_decoder_layers_finds_copied_layers_by_layer_idx_or_takes_kept(tiny_loaded):
    loaded = tiny_loaded("exaone4")
    model, family = loaded.model, loaded.family
    copies = [copy.deepcopy(layer) for layer in family.decoder_layers(model)]
    assert family.set_decoder_layers(model, [copies[3], copies[1]]) == [3, 1]
    assert model.config.layer_types == ["full_attention", "full_attention"]
    assert torch.isfinite(logits_of(model, probe_ids(loaded))).all()

    loaded = tiny_loaded("exaone4")
    model = loaded.model
    layers = list(family.decoder_layers(model))
    assert family.set_decoder_layers(model, [layers[0], layers[3]], kept=[0, 3]) == [0, 3]
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="distinct"):
        family.set_decoder_layers(model, list(family.decoder_layers(model)), kept=[0, 0])
    with pytest.raises(ValueError, match="every decoder layer"):
        family.set_decoder_layers(model, [], kept=[])


@pytest.mark.parametrize("model_type", TEXT_MODEL_TYPES)
def test_generation_with_cache_after_dropping_equals_recomputing(tiny_loaded, model_type):
    """Renumbered layer_idx: the KV (or SSM state) cache of each kept layer is its own."""
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    layers = list(family.decoder_layers(model))
    family.set_decoder_layers(model, layers[1:])
    ids = probe_ids(loaded, "Once upon a time")
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False, pad_token_id=loaded.tokenizer.eos_id)
        recomputed = ids
        for _ in range(5):
            nxt = model(input_ids=recomputed, use_cache=False).logits[:, -1].argmax(
                -1, keepdim=True)
            recomputed = torch.cat([recomputed, nxt], dim=1)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("model_type", ATTENTION_MODEL_TYPES)
def test_head_mask_changes_logits_and_zeroes_the_masked_heads(tiny_loaded, model_type,
                                                              tmp_path):
    from workers.models import load_model

    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    base = copy.deepcopy(model)
    config = HeadMaskConfig(scope="layer", calibration_samples=2, calibration_length=32)
    outcome = get_method("head_mask").apply(model, 0.25, config, context_for(loaded))
    variant = outcome.model
    head_dim = family.head_dim(variant)
    masked = outcome.info["masked_heads_per_layer"]
    assert set(masked) == {str(i) for i in range(family.num_layers(variant))}
    for index, layer in enumerate(family.decoder_layers(variant)):
        weight = family.attention_output_projection(layer).weight
        for head in masked[str(index)]:
            assert torch.count_nonzero(weight[:, head * head_dim:(head + 1) * head_dim]) == 0
    ids = probe_ids(loaded)
    logits = logits_of(variant, ids)
    assert not torch.allclose(logits, logits_of(base, ids))
    if family.is_vision_language:  # only the language model was touched
        for (name, after), before in zip(family.vision_tower(variant).named_parameters(),
                                         family.vision_tower(base).parameters(), strict=True):
            assert torch.equal(after, before), name
    variant.save_pretrained(tmp_path)
    (loaded.processor or loaded.tokenizer).save_pretrained(tmp_path)
    assert torch.equal(logits_of(load_model(f"local:{tmp_path}").model, ids), logits)


def test_mamba_refuses_attention_methods_with_a_clear_message(tiny_loaded):
    loaded = tiny_loaded("mamba")
    model, family = loaded.model, loaded.family
    message = "mamba models have no attention heads; use a method that"
    config = HeadMaskConfig(calibration_samples=2, calibration_length=16)
    with pytest.raises(ValueError, match=message):
        get_method("head_mask").apply(model, 0.25, config, context_for(loaded))
    layer = family.decoder_layers(model)[0]
    for call in (lambda: family.num_heads(model), lambda: family.num_kv_heads(model),
                 lambda: family.head_dim(model), lambda: family.kv_group(model, 0),
                 lambda: family.attention(layer), lambda: family.attention_projections(layer),
                 lambda: family.attention_output_projection(layer)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="no MLP"):
        family.mlp(layer)
    assert family.mixer(layer) is layer.mixer
    assert family.mixer(layer).out_proj.out_features == model.config.hidden_size


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_perplexity_scores_every_token_through_the_language_model(tiny_loaded, model_type):
    loaded = tiny_loaded(model_type)
    model, family = loaded.model, loaded.family
    ids = probe_ids(loaded)[0].tolist()
    # One window: the evaluator's sum equals log-probabilities computed from the
    # adapter's language model and LM head directly.
    total, count = sum_log_likelihood(model, ids, max_length=128, stride=64, batch_size=2,
                                      device="cpu")
    with torch.no_grad():
        hidden = family.language_model(model)(input_ids=torch.tensor([ids])).last_hidden_state
        logprobs = torch.log_softmax(family.lm_head(model)(hidden).float(), dim=-1)[0]
    expected = sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
    assert count == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # Sliding windows, batched and padded: still every token once, a finite perplexity.
    total, count = sum_log_likelihood(model, ids, max_length=24, stride=10, batch_size=3,
                                      device="cpu")
    assert count == len(ids) - 1
    assert math.isfinite(total) and total < 0
