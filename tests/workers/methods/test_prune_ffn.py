"""prune_ffn: channel scores computed by hand; structural removal equals zeroing those
channels' down_proj columns; sizes, parameter counts and reloads are right."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
import transformers

from workers.methods import family_lacks, get_method
from workers.methods.head_mask import calibration_batches
from workers.methods.prune_ffn import PruneFFNConfig, apply, channel_scores, channels_to_remove
from workers.models import family_for, load_model
from workers.models.hf import auto_class_name
from workers.models.structure import STRUCTURE_KEY

PROBE = torch.tensor([[1, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32, 111, 110, 46]])


def config_for(layout: str) -> PruneFFNConfig:
    return PruneFFNConfig(layout=layout, calibration_samples=2, calibration_length=16)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids).logits


def removed_channels(family, base, variant) -> list[list[int]]:
    """Which channels each layer lost, found by matching the variant's down_proj columns
    to the base's (independently of what the method reports)."""
    removed = []
    for old, new in zip(family.decoder_layers(base), family.decoder_layers(variant),
                        strict=True):
        before = family.mlp_projections(old)["down"].weight
        after = family.mlp_projections(new)["down"].weight
        kept, start = [], 0
        for column in after.T:
            match = next(j for j in range(start, before.shape[1])
                         if torch.equal(before[:, j], column))
            kept.append(match)
            start = match + 1
        removed.append(sorted(set(range(before.shape[1])) - set(kept)))
    return removed


def zeroed_channels(base, family, removed: list[list[int]]):
    masked = copy.deepcopy(base)
    with torch.no_grad():
        for layer, channels in zip(family.decoder_layers(masked), removed, strict=True):
            family.mlp_projections(layer)["down"].weight[:, channels] = 0
    return masked


def save_with_tokenizer(loaded, model, directory):
    model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(str(directory))
    if loaded.processor is not None:
        loaded.processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- scores


def test_scores_are_mean_abs_gated_activation_times_down_column_norm(random_llama, context):
    model = random_llama
    family = family_for(model)
    batches = calibration_batches(context, config_for("uniform"))
    inputs: dict[int, list[torch.Tensor]] = {}

    def keep_input(index):
        def hook(_module, args):
            inputs.setdefault(index, []).append(args[0].detach())
        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep_input(i))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    scores = channel_scores(model, family, batches)
    for index, layer in enumerate(model.model.layers):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[index]]).double()
        gate = x @ layer.mlp.gate_proj.weight.double().T
        up = x @ layer.mlp.up_proj.weight.double().T
        activation = torch.nn.functional.silu(gate) * up  # Llama: hidden_act "silu"
        norms = layer.mlp.down_proj.weight.double().norm(dim=0)
        expected = activation.abs().mean(dim=0) * norms
        torch.testing.assert_close(scores[index], expected, rtol=1e-5, atol=1e-9)
        assert scores[index].shape == (128,)


def test_channel_selection_uniform_and_global():
    scores = [torch.tensor([0.5, 0.1, 0.9, 0.3]), torch.tensor([0.2, 0.15, 0.05, 0.25])]
    assert channels_to_remove(scores, 0.25, "uniform") == [[1], [2]]
    assert channels_to_remove(scores, 0.5, "uniform") == [[1, 3], [1, 2]]
    # Global: the 3 lowest of all 8 are 0.05 (l1), 0.1 (l0), 0.15 (l1).
    assert channels_to_remove(scores, 0.375, "per_layer") == [[1], [1, 2]]
    # 6 of 8: layer 1's four are among the five lowest, but its last one stays.
    assert channels_to_remove(scores, 0.75, "per_layer") == [[0, 1, 3], [0, 1, 2]]
    with pytest.raises(ValueError, match="at most 6"):
        channels_to_remove(scores, 0.85, "per_layer")
    with pytest.raises(ValueError, match="at most 3"):
        channels_to_remove(scores, 0.9, "uniform")
    with pytest.raises(ValueError, match="same intermediate size"):
        channels_to_remove([torch.ones(4), torch.ones(3)], 0.25, "uniform")


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
@pytest.mark.parametrize("model_type", tiny_models.ATTENTION_MODEL_TYPES)
def test_structural_removal_on_every_family(model_type, layout, tiny_model_dir,
                                            calibration_context, tmp_path):
    loaded = load_model(f"local:{tiny_model_dir(model_type)}")
    family, base = loaded.family, loaded.model
    width = family.text_config(base).intermediate_size
    num_layers = family.num_layers(base)
    params_before = sum(p.numel() for p in base.parameters())
    rate = 0.3
    outcome = apply(copy.deepcopy(base), rate, config_for(layout), calibration_context(loaded))
    variant, info = outcome.model, outcome.info

    removed = removed_channels(family, base, variant)
    got = logits(variant)
    torch.testing.assert_close(got, logits(zeroed_channels(base, family, removed)),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(base), atol=1e-4)

    sizes = info["intermediate_size_per_layer"]
    assert sizes == [width - len(r) for r in removed]
    assert info["channels_removed_per_layer"] == [len(r) for r in removed]
    for layer, size in zip(family.decoder_layers(variant), sizes, strict=True):
        projections = family.mlp_projections(layer)
        assert projections["gate"].weight.shape[0] == projections["up"].weight.shape[0] \
            == projections["down"].weight.shape[1] == size >= 1
        assert family.mlp(layer).intermediate_size == size
    if layout == "uniform":
        assert len(set(sizes)) == 1 and sizes[0] == width - round(rate * width)
    else:
        assert len(set(sizes)) > 1 and sum(width - s for s in sizes) == round(rate * width
                                                                               * num_layers)
    hidden = family.text_config(base).hidden_size
    assert info["parameters_removed"] == 3 * hidden * info["channels_removed"]  # no biases
    assert sum(p.numel() for p in variant.parameters()) == params_before \
        - info["parameters_removed"]

    assert info["stock_reload"] is (layout == "uniform")
    directory = save_with_tokenizer(loaded, variant, tmp_path / "variant")
    auto_class = getattr(transformers, auto_class_name(variant.config))
    if layout == "uniform":
        assert family.text_config(variant).intermediate_size == sizes[0]
        assert STRUCTURE_KEY not in variant.config.to_dict()
        reloaded = auto_class.from_pretrained(directory).eval()
    else:
        assert variant.config.to_dict()[STRUCTURE_KEY]["intermediate_size"] == sizes
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            auto_class.from_pretrained(directory)
        reloaded = load_model(f"local:{directory}").model
    assert torch.equal(logits(reloaded), got)


def test_rate_zero_is_the_identity(tiny_model_dir, calibration_context):
    loaded = load_model(f"local:{tiny_model_dir('exaone4')}")
    base = copy.deepcopy(loaded.model)
    outcome = apply(loaded.model, 0.0, config_for("per_layer"), calibration_context(loaded))
    assert outcome.info["channels_removed"] == 0 and outcome.info["parameters_removed"] == 0
    assert not hasattr(outcome.model.config, STRUCTURE_KEY)
    for (name, before), (_, after) in zip(base.named_parameters(),
                                          outcome.model.named_parameters(), strict=True):
        assert torch.equal(before, after), name


def test_never_all_channels_and_uniform_needs_equal_widths(random_llama, context):
    with pytest.raises(ValueError, match="channels of each layer"):
        apply(copy.deepcopy(random_llama), 0.999, config_for("uniform"), context)
    per_layer = apply(copy.deepcopy(random_llama), 0.5, config_for("per_layer"), context)
    assert len(set(per_layer.info["intermediate_size_per_layer"])) > 1
    with pytest.raises(ValueError, match="use layout: per_layer"):
        apply(per_layer.model, 0.1, config_for("uniform"), context)
    # per_layer works on already uneven widths (scores of *this* model, not the cached
    # ones of the base), and every layer keeps at least one channel.
    assert sum(per_layer.info["intermediate_size_per_layer"]) == 256
    again = apply(copy.deepcopy(per_layer.model), 0.98, config_for("per_layer"), context)
    assert min(again.info["intermediate_size_per_layer"]) >= 1
    assert sum(again.info["intermediate_size_per_layer"]) == 256 - 251  # ⌊0.98·256 + ½⌋
    with pytest.raises(ValueError, match="at most 252"):
        apply(per_layer.model, 0.99, config_for("per_layer"), context)


def test_composes_with_per_layer_head_pruning_and_reloads(tiny_model_dir, calibration_context,
                                                          tmp_path):
    """Both records in one config: heads pruned per layer, then FFN uniform on top."""
    from workers.methods import prune_heads

    loaded = load_model(f"local:{tiny_model_dir('llava')}")
    heads = prune_heads.apply(copy.deepcopy(loaded.model), 0.25,
                              prune_heads.PruneHeadsConfig(layout="per_layer",
                                                           calibration_samples=2,
                                                           calibration_length=16),
                              calibration_context(loaded))
    outcome = apply(heads.model, 0.25, config_for("uniform"), calibration_context(loaded))
    record = outcome.model.config.to_dict()[STRUCTURE_KEY]
    assert record["attention_heads"] == heads.info["heads_kept_per_layer"]
    assert record["intermediate_size"] == [48, 48, 48]
    assert outcome.model.config.text_config.intermediate_size == 48
    got = logits(outcome.model)
    directory = save_with_tokenizer(loaded, outcome.model, tmp_path / "both")
    reloaded = load_model(f"local:{directory}")
    assert reloaded.processor is not None
    assert torch.equal(logits(reloaded.model), got)


def test_mamba_is_refused_with_the_family_error(tiny_model_dir, calibration_context):
    loaded = load_model(f"local:{tiny_model_dir('mamba')}")
    method = get_method("prune_ffn")
    assert method.requires == ("mlp",)
    assert family_lacks(loaded.family, method.requires) == "MLP projections"
    with pytest.raises(ValueError, match="mamba blocks have no MLP"):
        apply(loaded.model, 0.25, config_for("uniform"), calibration_context(loaded))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        PruneFFNConfig.model_validate({"layout": "uniform", "scope": "global"})


# --------------------------------------------------------------------------- real model


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
def test_real_llama2c_model(shared_data, calibration_context, tmp_path, layout):
    """aidreams260K: 4 layers, hidden 64, intermediate 172."""
    loaded = load_model("llama2c:" + str(shared_data / "aidreams260K"))
    family, base = loaded.family, loaded.model
    ids = torch.tensor([loaded.tokenizer.encode("Once upon a time the robot dreamed")])
    outcome = apply(copy.deepcopy(base), 0.25, config_for(layout), calibration_context(loaded))
    removed = removed_channels(family, base, outcome.model)
    assert sum(map(len, removed)) == 172  # round(0.25 · 172 · 4) = 172 = round(43) · 4
    got = logits(outcome.model, ids)
    torch.testing.assert_close(got, logits(zeroed_channels(base, family, removed), ids),
                               rtol=1e-5, atol=1e-5)
    assert outcome.info["parameters_removed"] == 3 * 64 * 172
    outcome.model.save_pretrained(tmp_path / "variant")
    if layout == "uniform":
        assert outcome.info["intermediate_size_per_layer"] == [129] * 4
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "variant")
    else:
        # llama2.c has no transformers tokenizer; any will do for load_model (logits only).
        tiny_models.byte_tokenizer().save_pretrained(tmp_path / "variant")
        reloaded = load_model(f"local:{tmp_path / 'variant'}").model
    assert torch.equal(logits(reloaded.eval(), ids), got)


def test_run_trial_records_a_smaller_causal_model(tiny_model_dir, trial_config):
    from workers import trial

    params = {"layout": "uniform", "calibration_samples": 2, "calibration_length": 16}
    result = trial.run_trial(trial_config(tiny_model_dir("llava"), "prune_ffn", params, 0.5))
    evidence = result["evidence"]
    info = evidence["details"]["method"]
    assert result["status"] == "done" and info["stock_reload"] is True
    assert info["intermediate_size_per_layer"] == [32, 32, 32]
    assert evidence["params_after"] == evidence["params_before"] - 3 * 32 * 32 * 3
    assert evidence["max_abs_dlogits"] > 0
    assert evidence["details"]["causality_max_abs_dlogits"] < 1e-4
