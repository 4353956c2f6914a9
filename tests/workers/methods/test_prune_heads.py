"""prune_heads: structural head removal equals zeroing those heads' o_proj columns, stays
valid GQA, shrinks the model by exactly the removed rows/columns, and reloads."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
import transformers

from workers.methods import family_lacks, get_method
from workers.methods.prune_heads import (
    PruneHeadsConfig,
    apply,
    kv_groups_to_remove,
    query_heads_to_remove,
    removal_count,
)
from workers.models import family_for, load_model
from workers.models.hf import auto_class_name
from workers.models.structure import STRUCTURE_KEY

PROBE = torch.tensor([[1, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32, 111, 110, 46]])


def config_for(groups: str, layout: str) -> PruneHeadsConfig:
    return PruneHeadsConfig(groups=groups, layout=layout, calibration_samples=2,
                            calibration_length=16)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids).logits


def zeroed_heads(base, family, removed: dict[str, list[int]], head_dim: int):
    """A copy of the unpruned model with the removed heads' o_proj columns zeroed."""
    masked = copy.deepcopy(base)
    layers = family.decoder_layers(masked)
    with torch.no_grad():
        for layer, heads in removed.items():
            weight = family.attention_output_projection(layers[int(layer)]).weight
            for head in heads:
                weight[:, head * head_dim:(head + 1) * head_dim] = 0
    return masked


def save_with_tokenizer(loaded, model, directory):
    model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(str(directory))
    if loaded.processor is not None:
        loaded.processor.save_pretrained(directory)
    return directory


def expected_parameters_removed(family, base, removed: dict[str, list[int]],
                                per_group: int, head_dim: int, kv_removed: list[int]) -> int:
    """Rows of q (and bias) and columns of o per query head; rows of k, v per KV head."""
    total = 0
    for index, layer in enumerate(family.decoder_layers(base)):
        projections = family.attention_projections(layer)
        q, k, o = projections["q"], projections["k"], projections["o"]
        per_query = head_dim * (q.in_features + (q.bias is not None) + o.out_features)
        per_kv = 2 * head_dim * (k.in_features + (k.bias is not None))
        total += len(removed.get(str(index), [])) * per_query + kv_removed[index] * per_kv
    return total


# --------------------------------------------------------------------------- counting


def test_removal_count_rounds_half_up_at_least_one_never_all():
    assert removal_count(0.0, 8, 7, "heads") == 0
    assert removal_count(0.25, 8, 7, "heads") == 2
    assert removal_count(0.3125, 8, 7, "heads") == 3  # 2.5 → 3 (half up, not to even)
    assert removal_count(0.125, 4, 3, "heads") == 1  # 0.5 → 1
    assert removal_count(0.01, 8, 7, "heads") == 1  # at least one
    with pytest.raises(ValueError, match="below 0.9375"):
        removal_count(0.95, 8, 7, "heads")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            removal_count(bad, 8, 7, "heads")


def test_query_head_selection_takes_the_same_count_from_every_group():
    # 2 layers, 8 heads, 2 KV groups of 4 (heads 0-3 read KV 0, 4-7 read KV 1).
    importance = torch.tensor([[5.0, 1.0, 7.0, 2.0, 3.0, 8.0, 0.5, 6.0],
                               [9.0, 9.5, 8.0, 7.5, 9.0, 8.5, 9.9, 7.0]])
    # uniform 25 %: one per group in each layer, its least important.
    assert query_heads_to_remove(importance, 2, 0.25, "uniform") == [[1, 6], [3, 7]]
    assert query_heads_to_remove(importance, 2, 0.5, "uniform") == [[1, 3, 4, 6], [2, 3, 5, 7]]
    # per_layer 25 % = 4 heads = 2 slices; slice costs: layer 0: 1.0+0.5, 2.0+3.0, 5+6;
    # layer 1: 7.5+7.0, 8.0+8.5, 9+9. The two cheapest are both in layer 0.
    assert query_heads_to_remove(importance, 2, 0.25, "per_layer") == [[1, 3, 4, 6], []]
    # 50 % = 4 slices: layer 0 may lose only 3 of its 4 heads per group (never a group's last).
    removed = query_heads_to_remove(importance, 2, 0.5, "per_layer")
    assert removed == [[0, 1, 3, 4, 6, 7], [3, 7]]


def test_kv_group_selection_sums_query_heads_and_never_empties_a_layer():
    importance = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.1, 0.1],  # groups: 2, 1, 0.2
                               [3.0, 3.0, 3.5, 3.5, 4.0, 4.0]])  # groups: 6, 7, 8
    assert kv_groups_to_remove(importance, 3, 0.34, "uniform") == [[2], [0]]
    # 3 of 6: all three of layer 0 are the cheapest, but its last group stays.
    assert kv_groups_to_remove(importance, 3, 0.5, "per_layer") == [[1, 2], [0]]
    assert kv_groups_to_remove(importance, 3, 0.66, "per_layer") == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match="at most 4"):
        kv_groups_to_remove(importance, 3, 0.75, "per_layer")


# --------------------------------------------------------------------------- every family


RATES = {("query_heads", "uniform"): 0.5, ("kv_groups", "uniform"): 0.5,
         ("query_heads", "per_layer"): 0.25, ("kv_groups", "per_layer"): 0.25}


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
@pytest.mark.parametrize("groups", ["query_heads", "kv_groups"])
@pytest.mark.parametrize("model_type", tiny_models.ATTENTION_MODEL_TYPES)
def test_structural_removal_on_every_family(model_type, groups, layout, tiny_model_dir,
                                            calibration_context, tmp_path):
    loaded = load_model(f"local:{tiny_model_dir(model_type)}")
    family, base = loaded.family, loaded.model
    heads, kv_heads = family.num_heads(base), family.num_kv_heads(base)
    head_dim, per_group = family.head_dim(base), heads // kv_heads
    params_before = sum(p.numel() for p in base.parameters())
    outcome = apply(copy.deepcopy(base), RATES[groups, layout], config_for(groups, layout),
                    calibration_context(loaded))
    variant, info = outcome.model, outcome.info
    removed = info["removed_heads_per_layer"]

    # The documented numerical property.
    expected = logits(zeroed_heads(base, family, removed, head_dim))
    got = logits(variant)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(base), atol=1e-4)

    # Shapes, GQA and the info agree with each other.
    kept, kv_kept = info["heads_kept_per_layer"], info["kv_heads_per_layer"]
    for index, layer in enumerate(family.decoder_layers(variant)):
        projections = family.attention_projections(layer)
        attention = family.attention(layer)
        assert projections["q"].weight.shape[0] == kept[index] * head_dim
        assert projections["o"].weight.shape[1] == kept[index] * head_dim
        assert projections["k"].weight.shape[0] == projections["v"].weight.shape[0] \
            == kv_kept[index] * head_dim
        assert kept[index] % kv_kept[index] == 0
        assert attention.num_key_value_groups == kept[index] // kv_kept[index]
        gone = removed.get(str(index), [])
        assert kept[index] == heads - len(gone) >= 1
        per_group_removed = [sum(1 for h in gone if h // per_group == g) for g in range(kv_heads)]
        if groups == "query_heads":
            assert kv_kept[index] == kv_heads  # every KV group stays …
            assert len(set(per_group_removed)) == 1  # … and loses the same number
        else:
            assert set(per_group_removed) <= {0, per_group}  # whole groups only
            assert kv_kept[index] == kv_heads - per_group_removed.count(per_group) >= 1
    kv_removed = [kv_heads - k for k in kv_kept]
    assert info["parameters_removed"] == expected_parameters_removed(
        family, base, removed, per_group, head_dim, kv_removed) > 0
    assert sum(p.numel() for p in variant.parameters()) == params_before \
        - info["parameters_removed"]
    assert info["heads_removed"] == sum(len(v) for v in removed.values())
    # Rounded to whole units of kv_heads query heads (or of per_group for kv_groups).
    unit = kv_heads if groups == "query_heads" else per_group
    target = RATES[groups, layout] * heads * family.num_layers(base)
    assert info["heads_removed"] % unit == 0
    assert abs(info["heads_removed"] - target) <= unit / 2

    # Layout: uniform keeps the same counts everywhere; per_layer here does not.
    if layout == "uniform":
        assert len(set(kept)) == 1 and len(set(kv_kept)) == 1
    else:
        assert len(set(kept)) > 1

    # Reload. Stock from_pretrained whenever the config can say it (not Qwen2.5-VL, whose
    # attention derives head_dim from hidden_size / heads; not per-layer counts).
    stock = layout == "uniform" and model_type != "qwen2_5_vl"
    assert info["stock_reload"] is stock
    assert (STRUCTURE_KEY in variant.config.to_dict()) is not stock
    directory = save_with_tokenizer(loaded, variant, tmp_path / "variant")
    auto_class = getattr(transformers, auto_class_name(variant.config))
    if stock:
        text = family.text_config(variant)
        assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == \
            (kept[0], kv_kept[0], head_dim)
        reloaded = auto_class.from_pretrained(directory).eval()
    else:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            auto_class.from_pretrained(directory)
        reloaded = load_model(f"local:{directory}").model
    assert torch.equal(logits(reloaded), got)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel()
                                                                for p in variant.parameters())


def test_rate_zero_is_the_identity(tiny_model_dir, calibration_context):
    loaded = load_model(f"local:{tiny_model_dir('qwen2')}")
    base = copy.deepcopy(loaded.model)
    outcome = apply(loaded.model, 0.0, config_for("query_heads", "per_layer"),
                    calibration_context(loaded))
    assert outcome.info["heads_removed"] == 0 and outcome.info["parameters_removed"] == 0
    assert not hasattr(outcome.model.config, STRUCTURE_KEY)
    for (name, before), (_, after) in zip(base.named_parameters(),
                                          outcome.model.named_parameters(), strict=True):
        assert torch.equal(before, after), name
    assert torch.equal(logits(outcome.model), logits(base))


def test_never_all_heads_of_a_layer(random_llama, context):
    # random_llama: 4 layers, 8 query heads in 2 KV groups of 4.
    with pytest.raises(ValueError, match="query heads of each KV group"):
        apply(copy.deepcopy(random_llama), 0.9, config_for("query_heads", "uniform"), context)
    with pytest.raises(ValueError, match="KV groups of each layer"):
        apply(copy.deepcopy(random_llama), 0.75, config_for("kv_groups", "uniform"), context)
    with pytest.raises(ValueError, match="at most 4"):
        apply(copy.deepcopy(random_llama), 0.6, config_for("kv_groups", "per_layer"), context)
    # The most per_layer allows: every layer down to one KV group (4 query heads).
    outcome = apply(copy.deepcopy(random_llama), 0.5, config_for("kv_groups", "per_layer"),
                    context)
    assert outcome.info["kv_heads_per_layer"] == [1, 1, 1, 1]
    outcome = apply(copy.deepcopy(random_llama), 0.75, config_for("query_heads", "per_layer"),
                    context)
    assert outcome.info["heads_kept_per_layer"] == [2, 2, 2, 2]  # one per group left


def test_per_layer_counts_generate_with_kv_cache_and_agree_across_attention_kernels(
        random_llama, context):
    family = family_for(random_llama)
    outcome = apply(copy.deepcopy(random_llama), 0.5, config_for("query_heads", "per_layer"),
                    context)
    variant = outcome.model
    assert len(set(outcome.info["heads_kept_per_layer"])) > 1
    # Uneven GQA ratios per layer: sdpa (repeat_kv / enable_gqa) and eager agree.
    eager = copy.deepcopy(variant)
    eager.set_attn_implementation("eager")
    torch.testing.assert_close(logits(eager), logits(variant), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cached = variant.generate(PROBE, max_new_tokens=6, do_sample=False)
        ids = PROBE
        for _ in range(6):
            nxt = variant(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)
    # Calibration ran once: a second rate on the same base reuses the importance.
    apply(copy.deepcopy(random_llama), 0.25, config_for("query_heads", "uniform"), context)
    assert context.cache_hits == 1
    assert family.num_heads(random_llama) == 8  # the base was not touched


def test_already_per_layer_model_is_refused(random_llama, context):
    variant = apply(copy.deepcopy(random_llama), 0.5, config_for("query_heads", "per_layer"),
                    context).model
    with pytest.raises(ValueError, match="already pruned per layer"):
        apply(variant, 0.25, config_for("query_heads", "uniform"), context)


def test_mamba_is_refused_with_the_family_error(tiny_model_dir, calibration_context):
    loaded = load_model(f"local:{tiny_model_dir('mamba')}")
    method = get_method("prune_heads")
    assert method.requires == ("attention_heads",)
    assert family_lacks(loaded.family, method.requires) == "attention heads"
    with pytest.raises(ValueError, match="mamba models have no attention heads"):
        apply(loaded.model, 0.25, config_for("kv_groups", "uniform"),
              calibration_context(loaded))


def test_config_rejects_unknown_keys_and_values():
    with pytest.raises(ValueError):
        PruneHeadsConfig.model_validate({"group": "kv_groups"})
    with pytest.raises(ValueError):
        PruneHeadsConfig.model_validate({"layout": "adaptive"})


# --------------------------------------------------------------------------- real model


def test_real_llama2c_model(shared_data, calibration_context, tmp_path):
    """aidreams260K: multi-head attention (4 heads, 4 KV heads), head_dim 16."""
    loaded = load_model("llama2c:" + str(shared_data / "aidreams260K"))
    family, base = loaded.family, loaded.model
    context = calibration_context(loaded)
    with pytest.raises(ValueError, match="use groups: kv_groups"):
        apply(copy.deepcopy(base), 0.25, config_for("query_heads", "uniform"), context)
    ids = torch.tensor([loaded.tokenizer.encode("Once upon a time the robot dreamed")])

    # 2 of 4 heads per layer: the config says so and stock transformers reloads it.
    uniform = apply(copy.deepcopy(base), 0.5, config_for("kv_groups", "uniform"), context)
    assert uniform.info["heads_kept_per_layer"] == [2, 2, 2, 2]
    assert uniform.info["stock_reload"] is True
    got = logits(uniform.model, ids)
    torch.testing.assert_close(
        got, logits(zeroed_heads(base, family, uniform.info["removed_heads_per_layer"], 16), ids),
        rtol=1e-5, atol=1e-5)
    # Per layer and head: 16·64 (q) + 16·64 (k) + 16·64 (v) + 64·16 (o), no biases.
    assert uniform.info["parameters_removed"] == 4 * 2 * 4 * 16 * 64
    uniform.model.save_pretrained(tmp_path / "uniform")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    assert stock.config.num_attention_heads == 2 and stock.config.head_dim == 16
    assert torch.equal(logits(stock, ids), got)

    # 3 of 4: transformers' LlamaConfig refuses 3 heads with hidden size 64 (even with an
    # explicit head_dim), so the counts are recorded and the project's loader reloads it.
    three = apply(copy.deepcopy(base), 0.25, config_for("kv_groups", "uniform"), context)
    assert three.info["heads_kept_per_layer"] == [3, 3, 3, 3]
    assert three.info["stock_reload"] is False
    assert three.model.config.num_attention_heads == 4
    assert three.info["parameters_removed"] == 4 * 4 * 16 * 64
    got = logits(three.model, ids)
    three.model.save_pretrained(tmp_path / "three")
    # llama2.c has no transformers tokenizer; any will do for load_model (logits only).
    tiny_models.byte_tokenizer().save_pretrained(tmp_path / "three")
    assert torch.equal(logits(load_model(f"local:{tmp_path / 'three'}").model, ids), got)

    per_layer = apply(copy.deepcopy(base), 0.25, config_for("kv_groups", "per_layer"), context)
    assert context.cache_hits == 2
    kept = per_layer.info["heads_kept_per_layer"]
    assert sum(kept) == 12 and min(kept) >= 1
    got = logits(per_layer.model, ids)
    torch.testing.assert_close(
        got, logits(zeroed_heads(base, family, per_layer.info["removed_heads_per_layer"], 16),
                    ids), rtol=1e-5, atol=1e-5)
    per_layer.model.save_pretrained(tmp_path / "per_layer")
    tiny_models.byte_tokenizer().save_pretrained(tmp_path / "per_layer")
    reloaded = load_model(f"local:{tmp_path / 'per_layer'}").model
    assert torch.equal(logits(reloaded, ids), got)


def test_run_trial_records_a_smaller_causal_model(tiny_model_dir, trial_config):
    from workers import trial

    params = {"groups": "kv_groups", "layout": "per_layer", "calibration_samples": 2,
              "calibration_length": 16}
    result = trial.run_trial(trial_config(tiny_model_dir("qwen2"), "prune_heads", params, 0.25))
    evidence = result["evidence"]
    info = evidence["details"]["method"]
    assert result["status"] == "done" and info["stock_reload"] is False
    assert evidence["params_after"] == evidence["params_before"] - info["parameters_removed"]
    assert evidence["max_abs_dlogits"] > 0 and evidence["changed_fraction"] > 0
    assert evidence["details"]["causality_max_abs_dlogits"] < 1e-4
    assert result["metrics"]["perplexity"]["value"] > 1
