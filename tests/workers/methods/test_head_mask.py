"""head_mask: importance checked against attention computed by hand; masks baked in o_proj."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from workers.methods import get_method
from workers.methods.head_mask import HeadMaskConfig, head_importance, select_heads
from workers.models import family_for

PROBE = torch.tensor([[256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116]])


def test_importance_equals_attention_computed_by_hand(random_llama):
    model = random_llama
    model.config._attn_implementation = "eager"
    family = family_for(model)
    batch = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    importance = head_importance(model, family, [batch])
    heads, head_dim = 8, 8
    with torch.no_grad():
        out = model(input_ids=batch, output_attentions=True, output_hidden_states=True)
        for layer_index, layer in enumerate(model.model.layers):
            hidden = layer.input_layernorm(out.hidden_states[layer_index])
            values = layer.self_attn.v_proj(hidden).view(2, 10, 2, head_dim)
            values = values.repeat_interleave(heads // 2, dim=2)  # GQA: 4 query heads per KV
            weights = out.attentions[layer_index]  # [batch, heads, query, key]
            per_head = torch.einsum("bhqk,bkhd->bqhd", weights, values)
            expected = per_head.abs().mean(dim=-1).reshape(-1, heads).mean(dim=0)
            torch.testing.assert_close(importance[layer_index].float(), expected,
                                       rtol=1e-4, atol=1e-6)


def test_select_heads_scopes():
    importance = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 5.0, 6.0, 7.0]])
    assert select_heads(importance, 0.25, "global") == [(0, 1), (1, 0)]
    assert select_heads(importance, 0.25, "layer") == [(0, 1), (1, 0)]
    assert select_heads(importance, 0.5, "layer") == [(0, 1), (0, 2), (1, 0), (1, 1)]
    assert select_heads(importance, 0.5, "global") == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_masked_heads_have_zero_columns_and_survive_reload(random_llama, context, tmp_path):
    base = copy.deepcopy(random_llama)
    config = HeadMaskConfig(scope="layer", calibration_samples=2, calibration_length=32)
    outcome = get_method("head_mask").apply(random_llama, 0.25, config, context)
    variant = outcome.model
    masked = outcome.info["masked_heads_per_layer"]
    assert outcome.info["heads_masked"] == 8 and all(len(v) == 2 for v in masked.values())
    for layer_index, layer in enumerate(variant.model.layers):
        weight = layer.self_attn.o_proj.weight
        for head in range(8):
            block = weight[:, head * 8:(head + 1) * 8]
            original = base.model.layers[layer_index].self_attn.o_proj.weight[:, head * 8:
                                                                              (head + 1) * 8]
            if head in masked[str(layer_index)]:
                assert torch.count_nonzero(block) == 0
            else:
                assert torch.equal(block, original)
    assert sum(p.numel() for p in variant.parameters()) == sum(p.numel()
                                                               for p in base.parameters())
    with torch.no_grad():
        got = variant(input_ids=PROBE).logits
        assert not torch.equal(got, base(input_ids=PROBE).logits)
    variant.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=PROBE).logits, got)


def test_zeroing_o_proj_columns_equals_removing_the_head_output(random_llama, context):
    """Numerical property: the masked model equals one whose head outputs are zeroed at run time."""
    base = copy.deepcopy(random_llama)
    config = HeadMaskConfig(scope="global", calibration_samples=2, calibration_length=32)
    outcome = get_method("head_mask").apply(random_llama, 0.3, config, context)
    masked = {int(k): v for k, v in outcome.info["masked_heads_per_layer"].items()}

    def zero_heads(layer_index):
        def hook(_module, args):
            x = args[0].clone().view(*args[0].shape[:-1], 8, 8)
            x[..., masked.get(layer_index, []), :] = 0
            return (x.view(*args[0].shape),)
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(zero_heads(i))
               for i, layer in enumerate(base.model.layers)]
    with torch.no_grad():
        expected = base(input_ids=PROBE).logits
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(outcome.model(input_ids=PROBE).logits, expected,
                                   rtol=1e-5, atol=1e-5)


def test_a_sweep_over_rates_calibrates_once_and_prune_heads_shares_it(random_llama, context,
                                                                      monkeypatch):
    import workers.methods.head_mask as head_mask

    calls = []
    real = head_mask.head_importance

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(head_mask, "head_importance", counted)
    method = get_method("head_mask")
    outcomes = [method.apply(copy.deepcopy(random_llama), rate,
                             method.config.model_validate({"scope": "global"}), context)
                for rate in (0.25, 0.5, 0.75)]
    assert len(calls) == 1 and context.cache_hits == 2
    masked = [o.info["heads_masked"] for o in outcomes]
    assert masked == sorted(masked) and masked[0] < masked[-1]
    # prune_heads ranks heads by the same importance of the same base: no new calibration.
    prune = get_method("prune_heads")
    prune.apply(copy.deepcopy(random_llama), 0.25,
                prune.config.model_validate({"groups": "query_heads", "layout": "uniform"}),
                context)
    assert len(calls) == 1 and context.cache_hits == 3
    # Another calibration set is another computation.
    method.apply(copy.deepcopy(random_llama), 0.25,
                 method.config.model_validate({"calibration_samples": 2}), context)
    assert len(calls) == 2
