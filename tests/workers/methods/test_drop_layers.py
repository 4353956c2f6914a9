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


# ---------------------------------------------------------------- from: block_influence

BI_TEXT = ["The river ran past the mill, and the miller counted sacks of grain by the door. " * 4,
           "Numbers, letters and 42 other symbols: a mixed calibration text for every model. " * 4]
BI_PARAMS = {"from": "block_influence", "calibration_samples": 4, "calibration_length": 24}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Directory of a tiny checkpoint of a model type, built once per module."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny-drop")
    built = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return get


def bi_context(loaded, documents=BI_TEXT):
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
                         calibration_documents=lambda *_: documents)


def reference_block_influence(model, family, batches):
    """BI from ``output_hidden_states=True``, without hooks.

    transformers' hidden_states are not simply "the input of each layer, then the output
    of the last": the last entry is taken after the final norm, and Mamba's list starts
    after the first block (no embeddings entry). Both are asserted here, then the final
    norm is replaced by an identity so that the last entry is the last layer's output.
    """
    import copy

    layers = len(family.decoder_layers(model))
    is_mamba = not family.has_attention
    plain = copy.deepcopy(model)
    language_model = family.language_model(plain)
    norm_name = next(name for name, child in language_model.named_children()
                     if child is family.final_norm(plain))
    setattr(language_model, norm_name, torch.nn.Identity())
    sums, count = torch.zeros(layers, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            normed = model(input_ids=batch, output_hidden_states=True).hidden_states
            states = plain(input_ids=batch, output_hidden_states=True).hidden_states
            embeddings = family.embeddings(model)(batch)
            assert len(normed) == layers + 1
            torch.testing.assert_close(normed[-1], family.final_norm(model)(states[-1]))
            if is_mamba:
                assert not torch.equal(normed[0], embeddings)  # after block 0 already
                states = [embeddings, *states[:layers]]
            else:
                assert torch.equal(normed[0], embeddings)
            for i in range(layers):
                cos = torch.nn.functional.cosine_similarity(
                    states[i].double(), states[i + 1].double(), dim=-1)
                sums[i] += cos.sum()
            count += batch.numel()
    return (1 - sums / count).tolist()


def test_block_influence_config_and_its_dump():
    top = DropLayersConfig.model_validate({"from": "top"})
    # Unchanged dump for top/bottom: existing drop_layers trial keys stay the same.
    assert top.model_dump(mode="json", by_alias=True) == {"from": "top"}
    with pytest.raises(ValueError, match="calibration_samples: calibration settings are used "
                                         "only with from: block_influence, not from: bottom"):
        DropLayersConfig.model_validate({"from": "bottom", "calibration_samples": 4})
    influence = DropLayersConfig.model_validate(BI_PARAMS)
    dumped = influence.model_dump(mode="json", by_alias=True)
    assert dumped == {**BI_PARAMS, "calibration_dataset": "builtin:pydoc",
                      "calibration_split": "train"}
    assert DropLayersConfig.model_validate(dumped) == influence


def test_lowest_influence_layers():
    from workers.methods.drop_layers import lowest_influence_layers

    assert lowest_influence_layers([0.3, 0.1, 0.2, 0.4], 0.5) == [1, 2]
    assert lowest_influence_layers([0.2, 0.1, 0.1, 0.4], 0.25) == [1]  # tie: lower index
    assert lowest_influence_layers([0.2, 0.1, 0.1, 0.4], 0.01) == [1]  # at least one
    with pytest.raises(ValueError, match="all 4 layers"):
        lowest_influence_layers([0.1] * 4, 0.95)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "exaone4", "mamba", "llava",
                                        "qwen2_5_vl"])
def test_block_influence_equals_hidden_state_computation(checkpoint, model_type):
    from workers.methods.drop_layers import block_influence
    from workers.methods.head_mask import HeadMaskConfig, calibration_batches
    from workers.models import load_model

    loaded = load_model(f"local:{checkpoint(model_type)}")
    batches = calibration_batches(bi_context(loaded), HeadMaskConfig(
        calibration_samples=4, calibration_length=24))
    assert sum(b.shape[0] for b in batches) == 4
    got = block_influence(loaded.model, loaded.family, batches)
    expected = reference_block_influence(loaded.model, loaded.family, batches)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(0 < value < 2 for value in got)

    outcome = get_method("drop_layers").apply(
        loaded.model, 0.25, DropLayersConfig.model_validate(BI_PARAMS), bi_context(loaded))
    lowest = min(range(len(got)), key=lambda i: got[i])
    assert outcome.info["dropped_layers"] == [lowest]
    assert outcome.info["block_influence"] == pytest.approx(got)
    assert len(loaded.family.decoder_layers(outcome.model)) == len(got) - 1


def test_block_influence_removes_the_lowest_layers_and_reloads(checkpoint, tmp_path):
    import copy

    from workers.models import load_model

    loaded = load_model(f"local:{checkpoint('llama')}")
    with torch.no_grad():  # layer 2 now passes its input through unchanged: BI = 0
        loaded.model.model.layers[2].self_attn.o_proj.weight.zero_()
        loaded.model.model.layers[2].mlp.down_proj.weight.zero_()
    base = copy.deepcopy(loaded.model)
    context = bi_context(loaded)
    config = DropLayersConfig.model_validate(BI_PARAMS)
    outcome = get_method("drop_layers").apply(copy.deepcopy(base), 0.5, config, context)
    influence = outcome.info["block_influence"]
    assert influence[2] == pytest.approx(0, abs=1e-12)
    second = min((i for i in range(4) if i != 2), key=lambda i: influence[i])
    assert outcome.info["dropped_layers"] == sorted([2, second])
    assert outcome.info["calibration"] == {"dataset": "builtin:pydoc", "split": "train",
                                           "samples": 4, "length": 24}
    kept = [i for i in range(4) if i not in outcome.info["dropped_layers"]]
    variant = outcome.model
    for new, old in enumerate(kept):
        assert torch.equal(variant.model.layers[new].mlp.up_proj.weight,
                           base.model.layers[old].mlp.up_proj.weight)
    with torch.no_grad():
        got = variant(input_ids=PROBE).logits
    variant.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=PROBE).logits, got)
    # A sweep's other rates reuse the influence measured once.
    again = get_method("drop_layers").apply(copy.deepcopy(base), 0.25, config, context)
    assert context.cache_hits == 1 and again.info["dropped_layers"] == [2]


def test_block_influence_on_the_real_model(shared_data, tmp_path):
    from workers.methods.drop_layers import block_influence
    from workers.methods.head_mask import HeadMaskConfig, calibration_batches
    from workers.models import load_model

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:20000]
    documents = text.split("\n\n")
    params = {"from": "block_influence", "calibration_samples": 8, "calibration_length": 64}
    context = bi_context(loaded, documents)
    batches = calibration_batches(context, HeadMaskConfig(calibration_samples=8,
                                                          calibration_length=64))
    expected = reference_block_influence(loaded.model, loaded.family, batches)
    assert block_influence(loaded.model, loaded.family, batches) == pytest.approx(
        expected, rel=1e-9, abs=1e-12)
    outcome = get_method("drop_layers").apply(
        loaded.model, 0.25, DropLayersConfig.model_validate(params), context)
    assert outcome.info["dropped_layers"] == [min(range(4), key=lambda i: expected[i])]
    ids = torch.tensor([batches[0][0].tolist()])
    with torch.no_grad():
        got = outcome.model(input_ids=ids).logits
    outcome.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, got)
