"""mamba_scan_order: the tour, the reversible reordering, and the causality guard that marks
its language-model evaluation invalid."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)
import torch

from workers import trial
from workers.methods import MethodContext, get_method
from workers.methods.mamba_scan_order import (
    ScanOrderConfig,
    apply_scan_order,
    correlation_distance,
    nearest_neighbour_tour,
    order_for_length,
    remove_scan_order,
    tour_length,
)


def test_correlation_distance_equals_numpy():
    states = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    expected = 1 - np.corrcoef(states.numpy())
    assert np.allclose(correlation_distance(states).numpy(), expected, atol=1e-9)


def test_nearest_neighbour_tour_by_hand():
    # Points on a line at 0, 10, 1, 11, 2: the greedy tour from 0 goes 0→2→4 (x = 0, 1, 2),
    # then the nearest of the rest (x = 10) and finally x = 11.
    x = torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0])
    distance = (x[:, None] - x[None, :]).abs()
    order = nearest_neighbour_tour(distance)
    assert order == [0, 2, 4, 1, 3]
    assert tour_length(distance, order) == pytest.approx(1 + 1 + 8 + 1)
    assert tour_length(distance, [0, 1, 2, 3, 4]) == pytest.approx(10 + 9 + 10 + 9)


def test_order_for_shorter_and_longer_sequences():
    order = [0, 3, 1, 2]
    assert order_for_length(order, 4) == [0, 3, 1, 2]
    assert order_for_length(order, 3) == [0, 1, 2]  # positions < 3, in tour order
    assert order_for_length(order, 6) == [0, 3, 1, 2, 4, 5]


def test_hooks_reorder_and_restore_a_position_wise_module():
    """On a module that acts on each position alone, permute → module → unpermute changes
    nothing; on a sequence mixer it does. Removing the hooks restores the module."""
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 5, 4)
    before = linear(x)
    apply_scan_order(linear, [4, 0, 3, 1, 2])
    assert torch.allclose(linear(x), before)

    class Cumulative(torch.nn.Module):  # a causal scan: position t sums positions ≤ t
        def forward(self, hidden_states):
            return hidden_states.cumsum(dim=1)

    scan = Cumulative()
    plain = scan(x)
    apply_scan_order(scan, [4, 0, 3, 1, 2])
    reordered = scan(x)
    # Position 0 comes second in the scan: it now also sums position 4 (a later token).
    assert torch.allclose(reordered[:, 0], x[:, 4] + x[:, 0])
    remove_scan_order(scan)
    assert torch.equal(scan(x), plain)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    from workers.models import load_model

    return load_model(f"local:{tiny_models.BUILDERS['mamba'](tmp_path_factory.mktemp('m') / 'm')}")


def context_for(loaded) -> MethodContext:
    docs = ["state space models scan tokens in order " * 8, "a second calibration line " * 8]
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0,
                         device="cpu", calibration_documents=lambda *_: docs)


def test_variant_differs_leaks_future_tokens_and_is_reversible(mamba):
    method = get_method("mamba_scan_order")
    config = ScanOrderConfig(length=32)
    context = context_for(mamba)
    outcome = method.apply(copy.deepcopy(mamba.model), None, config, context)
    variant = outcome.model
    assert outcome.info["causal"] is False
    assert outcome.info["layers"] == [mamba.family.num_layers(mamba.model) - 1]
    assert outcome.info["tour_length"] <= outcome.info["tour_length_identity"] + 1e-9
    probe = torch.tensor([[1] + list(range(5, 40))])
    base_logits = trial.logits_of(mamba.model, probe)
    assert not torch.allclose(trial.logits_of(variant, probe), base_logits)
    # The guard the trial runs: tokens after t change the logits at positions ≤ t.
    assert trial.causality_violation(variant, probe) > 1e-3
    assert trial.causality_violation(mamba.model, probe) < 1e-5
    # Weights untouched; removing the hooks gives the base model back exactly.
    for (name, a), (_, b) in zip(mamba.model.named_parameters(), variant.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    for layer in mamba.family.decoder_layers(variant):
        remove_scan_order(mamba.family.mixer(layer))
    assert torch.equal(trial.logits_of(variant, probe), base_logits)
    # The calibration is computed once per base model and calibration text.
    again = method.apply(copy.deepcopy(mamba.model), None, config, context)
    assert again.info["calibration_cached"] and again.info["order_head"] == \
        outcome.info["order_head"]


def test_a_trial_of_it_is_invalid_not_a_perplexity(tmp_path):
    directory = tiny_models.BUILDERS["mamba"](tmp_path / "mamba")
    config = {"trial_key": "s" * 64, "sweep": "t", "model": {"id": f"local:{directory}"},
              "method": {"name": "mamba_scan_order", "params": {"length": 32}, "rate": None},
              "dataset": {"name": "builtin:pydoc", "split": "test", "limit": 20},
              "evaluation": {"metrics": ["perplexity"], "batch_size": 4, "max_length": 32,
                             "stride": 16, "probe_length": 24}, "seed": 0,
              "is_baseline": False}
    with pytest.raises(trial.InvalidEvaluationError, match="not causal"):
        trial.run_trial(config)


def test_refuses_attention_models_and_bad_layers(mamba, random_llama, byte_tokenizer):
    from workers.models import family_for

    method = get_method("mamba_scan_order")
    llama_context = MethodContext(tokenizer=byte_tokenizer, family=family_for(random_llama),
                                  seed=0, device="cpu", calibration_documents=lambda *_: [])
    with pytest.raises(ValueError, match="no state-space mixers"):
        method.apply(random_llama, None, ScanOrderConfig(), llama_context)
    with pytest.raises(ValueError, match="outside the model's"):
        method.apply(copy.deepcopy(mamba.model), None, ScanOrderConfig(layers=[99], length=8),
                     context_for(mamba))
    assert get_method("mamba_scan_order").requires == ("state_space",)
    assert get_method("mamba_scan_order").uses_rate is False
