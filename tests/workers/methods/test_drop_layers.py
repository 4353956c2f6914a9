"""drop_layers: a real smaller model that reloads with stock transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.methods import MethodContext, get_method
from workers.methods.drop_layers import DropLayersConfig, layers_to_drop

PROBE = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


def test_layers_to_drop_counts():
    assert layers_to_drop(8, 0.25, "top") == [6, 7]
    assert layers_to_drop(8, 0.25, "bottom") == [0, 1]
    assert layers_to_drop(8, 0.01, "top") == [7]  # at least one
    with pytest.raises(ValueError, match="all 4 layers"):
        layers_to_drop(4, 0.95, "top")


@pytest.mark.parametrize("end", ["top", "bottom"])
def test_variant_is_the_kept_layers_and_reloads(random_llama, context, tmp_path, end):
    import copy

    base = copy.deepcopy(random_llama)
    config = DropLayersConfig.model_validate({"from": end})
    outcome = get_method("drop_layers").apply(random_llama, 0.5, config, context)
    variant = outcome.model
    assert variant.config.num_hidden_layers == 2
    assert len(variant.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in variant.model.layers] == [0, 1]
    kept = [2, 3] if end == "bottom" else [0, 1]
    assert outcome.info["dropped_layers"] == ([0, 1] if end == "bottom" else [2, 3])
    for new, old in enumerate(kept):
        assert torch.equal(variant.model.layers[new].mlp.up_proj.weight,
                           base.model.layers[old].mlp.up_proj.weight)
    assert sum(p.numel() for p in variant.parameters()) < sum(p.numel() for p in base.parameters())
    # Independent computation: run the base model's own kept layers by hand.
    with torch.no_grad():
        hidden = base.model.embed_tokens(PROBE)
        positions = torch.arange(PROBE.shape[1]).unsqueeze(0)
        rotary = base.model.rotary_emb(hidden, positions)
        for old in kept:
            hidden = base.model.layers[old](hidden, position_embeddings=rotary,
                                            attention_mask=None, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = base.lm_head(base.model.norm(hidden))
        got = variant(input_ids=PROBE).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    variant.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=PROBE).logits, got)


def test_generation_with_kv_cache_after_dropping(random_llama, context):
    config = DropLayersConfig.model_validate({"from": "bottom"})
    variant = get_method("drop_layers").apply(random_llama, 0.5, config, context).model
    with torch.no_grad():
        cached = variant.generate(PROBE, max_new_tokens=6, do_sample=False)
        # Recompute the continuation without a cache, one full forward per token.
        ids = PROBE
        for _ in range(6):
            nxt = variant(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        DropLayersConfig.model_validate({"form": "top"})


@pytest.mark.parametrize("model_type", ["mamba", "llava"])
def test_bottom_drop_evidence_names_the_family_s_layers(tmp_path, model_type):
    """Dropping from the bottom shifts layer indices: the renamed map must use the family's
    own layer prefix (backbone.layers, model.language_model.layers), or the evidence would
    count every shifted layer as changed."""
    import copy

    import tiny_models

    from workers.models import load_model
    from workers.trial import changed_fraction

    loaded = load_model(f"local:{tiny_models.BUILDERS[model_type](tmp_path / model_type)}")
    method = get_method("drop_layers")
    layers = loaded.family.decoder_layers(loaded.model)
    one_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in loaded.model.parameters())
    context = MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0,
                            device="cpu", calibration_documents=lambda *_: [])
    rate = 1 / len(layers)
    outcome = method.apply(copy.deepcopy(loaded.model), rate,
                           method.config.model_validate({"from": "bottom"}), context)
    assert outcome.renamed, "bottom removal must rename the shifted layers"
    assert changed_fraction(loaded.model, outcome.model, outcome.renamed) == pytest.approx(
        one_layer / total)
