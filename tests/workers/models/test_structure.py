"""Per-layer structure records: written only when needed, survive save_pretrained, and
``load_model("local:…")`` rebuilds the exact model from them (strictly)."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
import transformers
from safetensors.torch import load_file, save_file

import workers.models.hf as hf
from workers.models import load_model
from workers.models.hf import auto_class_name
from workers.models.structure import (
    STRUCTURE_KEY,
    adopt_sizes_in_config,
    measure_structure,
    record_structure,
    restore_structure,
    set_attention_heads,
    set_mlp_width,
    slice_linear,
)

PROBE = torch.tensor([[1, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32, 111, 110, 46]])

# Per layer: (kept query heads, kept KV groups) or None (unchanged). The tiny models have
# 4 query heads in 2 KV groups: heads 0, 1 read KV head 0; heads 2, 3 read KV head 1.
HEAD_PLAN = [([0, 1], [0]), None, ([1, 3], [0, 1])]


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def rows(units: list[int], width: int) -> torch.Tensor:
    return torch.tensor([u * width + i for u in units for i in range(width)])


def shrink_by_hand(loaded) -> dict[str, list[int]]:
    """Give each layer its own head counts and MLP width (without the methods), and
    return the sizes that now hold."""
    family, model = loaded.family, loaded.model
    head_dim = family.head_dim(model)
    expected: dict[str, list[int]] = {"attention_heads": [], "kv_heads": [],
                                      "intermediate_size": []}
    for index, layer in enumerate(family.decoder_layers(model)):
        projections = family.attention_projections(layer)
        plan = HEAD_PLAN[index] if index < len(HEAD_PLAN) else None
        if plan is not None:
            heads, groups = plan
            slice_linear(projections["q"], rows=rows(heads, head_dim))
            slice_linear(projections["k"], rows=rows(groups, head_dim))
            slice_linear(projections["v"], rows=rows(groups, head_dim))
            slice_linear(projections["o"], columns=rows(heads, head_dim))
            set_attention_heads(family.attention(layer), len(heads), len(groups))
        mlp = family.mlp_projections(layer)
        keep = torch.arange(0, mlp["up"].out_features, index + 2)  # every (index + 2)-th
        slice_linear(mlp["gate"], rows=keep)
        slice_linear(mlp["up"], rows=keep)
        slice_linear(mlp["down"], columns=keep)
        set_mlp_width(family.mlp(layer), len(keep))
        expected["attention_heads"].append(len(plan[0]) if plan else 4)
        expected["kv_heads"].append(len(plan[1]) if plan else 2)
        expected["intermediate_size"].append(len(keep))
    return expected


def save_with_tokenizer(loaded, directory, **options):
    loaded.model.save_pretrained(directory, **options)
    loaded.tokenizer.save_pretrained(str(directory))
    if loaded.processor is not None:
        loaded.processor.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", tiny_models.ATTENTION_MODEL_TYPES)
def test_per_layer_model_reloads_exactly_through_load_model(model_type, tiny_loaded, tmp_path):
    loaded = tiny_loaded(model_type)
    stock_class = type(loaded.model)
    assert record_structure(loaded.model, loaded.family) is False  # stock shapes: no record
    expected = shrink_by_hand(loaded)
    assert measure_structure(loaded.model, loaded.family) == expected
    assert record_structure(loaded.model, loaded.family) is True
    got = logits(loaded.model)
    directory = save_with_tokenizer(loaded, tmp_path / "variant")
    saved = json.loads((directory / "config.json").read_text())
    assert saved[STRUCTURE_KEY] == expected

    reloaded = load_model(f"local:{directory}")
    assert type(reloaded.model) is stock_class  # not the loader's shaping subclass
    assert reloaded.model.config.to_dict()[STRUCTURE_KEY] == expected
    assert measure_structure(reloaded.model, reloaded.family) == expected
    state = loaded.model.state_dict()
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert torch.equal(logits(reloaded.model), got)
    assert (reloaded.processor is not None) == (model_type in
                                                tiny_models.VISION_LANGUAGE_MODEL_TYPES)
    # Stock from_pretrained refuses the shapes instead of loading something else.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        getattr(transformers, auto_class_name(loaded.model.config)).from_pretrained(directory)


def test_restore_structure_shapes_a_freshly_built_model():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2)
    record = {"attention_heads": [4, 1, 2], "kv_heads": [2, 1, 1],
              "intermediate_size": [64, 7, 1]}
    setattr(config, STRUCTURE_KEY, record)
    model = transformers.LlamaForCausalLM(config)
    from workers.models import family_for

    restore_structure(model, family_for(model))
    for layer, heads, kv_heads, width in zip(model.model.layers, *record.values(), strict=True):
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (heads * 8, 32)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (kv_heads * 8, 32)
        assert attention.o_proj.weight.shape == (32, heads * 8)
        assert attention.num_key_value_groups == heads // kv_heads
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (width, 32)
        assert layer.mlp.down_proj.weight.shape == (32, width)
        assert layer.mlp.intermediate_size == width
        assert (attention.q_proj.out_features, layer.mlp.down_proj.in_features) == (heads * 8,
                                                                                   width)
    assert measure_structure(model, family_for(model)) == record


def test_malformed_records_are_refused():
    from workers.models import family_for

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    family = family_for(model)
    bad = [{"attention_heads": [4], "kv_heads": [2, 2], "intermediate_size": [8, 8]},
           {"attention_heads": [4, 4], "kv_heads": [2, 2]},
           {"attention_heads": [4, 0], "kv_heads": [2, 2], "intermediate_size": [8, 8]}]
    for record in bad:
        setattr(model.config, STRUCTURE_KEY, record)
        with pytest.raises(ValueError, match=STRUCTURE_KEY):
            restore_structure(model, family)
    setattr(model.config, STRUCTURE_KEY, {"attention_heads": [3, 4], "kv_heads": [2, 2],
                                          "intermediate_size": [8, 8]})
    with pytest.raises(ValueError, match="cannot share"):
        restore_structure(model, family)


def test_stale_record_is_removed_and_undescribable_changes_refused(tiny_loaded):
    loaded = tiny_loaded("llama")
    setattr(loaded.model.config, STRUCTURE_KEY, {"attention_heads": [1] * 4})
    assert record_structure(loaded.model, loaded.family) is False
    assert not hasattr(loaded.model.config, STRUCTURE_KEY)
    # A norm narrower than the hidden size is nothing a per-layer record describes.
    norm = loaded.model.model.layers[1].post_attention_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach()[:16].clone())
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        record_structure(loaded.model, loaded.family)


def test_sharded_checkpoint_loads(tiny_loaded, tmp_path):
    loaded = tiny_loaded("qwen2")
    shrink_by_hand(loaded)
    record_structure(loaded.model, loaded.family)
    directory = save_with_tokenizer(loaded, tmp_path / "sharded", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(load_model(f"local:{directory}").model), logits(loaded.model))


def test_loading_is_strict(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    shrink_by_hand(loaded)
    record_structure(loaded.model, loaded.family)
    directory = save_with_tokenizer(loaded, tmp_path / "variant")
    weights = load_file(directory / "model.safetensors")
    # A missing tensor would otherwise be left uninitialised.
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_model(f"local:{directory}")
    # A record that disagrees with the weights' shapes.
    directory = save_with_tokenizer(loaded, tmp_path / "wrong-record")
    config = json.loads((directory / "config.json").read_text())
    config[STRUCTURE_KEY]["intermediate_size"][0] += 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_model(f"local:{directory}")


def test_dtype_and_attention_options_apply_to_structured_loads(tiny_loaded, tmp_path):
    loaded = tiny_loaded("exaone4")
    shrink_by_hand(loaded)
    record_structure(loaded.model, loaded.family)
    directory = save_with_tokenizer(loaded, tmp_path / "variant")
    reloaded = load_model(f"local:{directory}", dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in reloaded.model.parameters()} == {torch.bfloat16}
    assert reloaded.info["attn_implementation"] == "eager"
    torch.testing.assert_close(logits(reloaded.model).float(), logits(loaded.model),
                               rtol=0.1, atol=0.1)


def test_plain_checkpoints_do_not_take_the_structured_path(tiny_checkpoint, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint without a record went through the structured loader")

    monkeypatch.setattr(hf, "load_structured_model", refuse)
    loaded = load_model(f"local:{tiny_checkpoint('qwen3')}")
    assert not hasattr(loaded.model.config, STRUCTURE_KEY)


def test_head_counts_stay_out_of_a_config_that_cannot_hold_them(tiny_loaded):
    """Qwen2.5-VL's attention takes head_dim = hidden_size / heads whatever the config
    says: fewer heads cannot be written into its config (the record is used instead)."""
    loaded = tiny_loaded("qwen2_5_vl")
    family, model = loaded.family, loaded.model
    text = family.text_config(model)
    for layer in family.decoder_layers(model):
        projections = family.attention_projections(layer)
        slice_linear(projections["q"], rows=rows([0, 2], 16))
        slice_linear(projections["o"], columns=rows([0, 2], 16))
        set_attention_heads(family.attention(layer), 2, 2)
    assert adopt_sizes_in_config(model, family, {"num_attention_heads": 2,
                                                 "num_key_value_heads": 2, "head_dim": 16}) \
        is False
    assert text.num_attention_heads == 4 and "head_dim" not in text.__dict__  # reverted
    assert record_structure(model, family) is True
    # The same on Qwen2 (head_dim from the config) is adopted: stock reload, no record.
    qwen2 = tiny_loaded("qwen2")
    for layer in qwen2.family.decoder_layers(qwen2.model):
        projections = qwen2.family.attention_projections(layer)
        slice_linear(projections["q"], rows=rows([0, 2], 8))
        slice_linear(projections["o"], columns=rows([0, 2], 8))
        set_attention_heads(qwen2.family.attention(layer), 2, 2)
    assert adopt_sizes_in_config(qwen2.model, qwen2.family,
                                 {"num_attention_heads": 2, "num_key_value_heads": 2,
                                  "head_dim": 8}) is True
    assert qwen2.model.config.num_attention_heads == 2
    assert record_structure(qwen2.model, qwen2.family) is False


def test_packed_weights_are_not_sliced():
    linear = torch.nn.Linear(8, 4)
    linear.weight = torch.nn.Parameter(torch.zeros(16, 1))  # like a 4-bit packed layer
    with pytest.raises(ValueError, match="prune before quantizing"):
        slice_linear(linear, rows=torch.tensor([0, 1]))
