"""run_trial: evidence, the no-effect guard and the causality guard, on the real built-in model."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from workers import trial
from workers.methods import MethodOutcome, NoParams, register_method

EVALUATION = {"metrics": ["perplexity"], "batch_size": 8, "max_length": 64, "stride": 32,
              "probe_length": 24,
              "speed": {"warmup": 1, "repeats": 2, "prompt_length": 16, "new_tokens": 4,
                        "batch_size": 1}}


def config(method: str, rate: float | None = None, params: dict | None = None,
           metrics: list[str] | None = None) -> dict:
    evaluation = dict(EVALUATION, metrics=metrics or ["perplexity"])
    return {"trial_key": "k" * 64, "sweep": "t", "model": {"id": "builtin:tiny-llama"},
            "method": {"name": method, "params": params or {}, "rate": rate},
            "dataset": {"name": "builtin:pydoc", "split": "test", "limit": 40},
            "evaluation": evaluation, "seed": 0, "is_baseline": method == "none"}


@register_method("test_noop", config=NoParams, description="changes nothing (test)",
                 rate_meaning="ignored")
def _noop(model, rate, params, ctx):
    return MethodOutcome(model=model, info={"claims": "compressed"})


class _Flipped(torch.nn.Module):
    """A variant that reads the sequence backwards: every position sees future tokens."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids.flip(1), **kwargs)
        out.logits = out.logits.flip(1)
        return out


@register_method("test_future_leak", config=NoParams, description="leaks future tokens (test)",
                 rate_meaning="ignored")
def _leak(model, rate, params, ctx):
    return MethodOutcome(model=_Flipped(model), info={})


@pytest.fixture(scope="module")
def baseline_result(tiny_llama_dir):
    return trial.run_trial(config("none", metrics=["perplexity", "speed"]))


def test_baseline_result_and_evidence(baseline_result):
    result = baseline_result
    assert result["status"] == "done"
    metrics = result["metrics"]
    assert 1 < metrics["perplexity"]["value"] < 200
    assert metrics["perplexity"]["direction"] == "lower"
    assert metrics["decode_ms_per_token"]["value"] > 0
    assert metrics["params"]["value"] == result["evidence"]["params_before"]
    evidence = result["evidence"]
    assert evidence["max_abs_dlogits"] == 0 and evidence["changed_fraction"] == 0
    assert result["environment"]["hardware"]["cpu_count"] >= 1
    assert "torch" in result["environment"]["packages"]


def test_drop_layers_evidence_and_worse_perplexity(baseline_result):
    result = trial.run_trial(config("drop_layers", 0.5, {"from": "top"}))
    evidence = result["evidence"]
    assert evidence["params_after"] < evidence["params_before"]
    assert evidence["max_abs_dlogits"] > 0
    layers = evidence["details"]["method"]
    assert layers["layers_after"] == layers["layers_before"] - len(layers["dropped_layers"])
    # The removed layers' weights count as changed, nothing else does.
    per_layer = (evidence["params_before"] - evidence["params_after"]) / len(
        layers["dropped_layers"])
    assert evidence["changed_fraction"] == pytest.approx(
        per_layer * len(layers["dropped_layers"]) / evidence["params_before"])
    assert result["metrics"]["perplexity"]["value"] > baseline_result["metrics"]["perplexity"][
        "value"] * 1.05


def test_base_model_is_loaded_once_and_left_untouched(baseline_result):
    loads = trial.cache.model_loads()
    before = copy.deepcopy(trial.base_model(config("none"), "cpu").model.state_dict())
    trial.run_trial(config("head_mask", 0.5, {"calibration_samples": 4}))
    after = trial.base_model(config("none"), "cpu").model.state_dict()
    assert trial.cache.model_loads() == loads
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_effect_is_a_failure_not_a_result(tiny_llama_dir):
    with pytest.raises(trial.NoEffectError, match="compression had no effect"):
        trial.run_trial(config("test_noop", 0.5))


def test_future_token_leak_is_refused(tiny_llama_dir):
    with pytest.raises(trial.InvalidEvaluationError, match="not causal"):
        trial.run_trial(config("test_future_leak", 0.5))


def test_failure_result_carries_type_message_traceback():
    try:
        raise ValueError("boom")
    except ValueError as exc:
        result = trial.failure_result(exc, 0.0)
    assert result["status"] == "failed"
    assert result["error"]["type"] == "ValueError" and result["error"]["message"] == "boom"
    assert "raise ValueError" in result["error"]["traceback"]


def test_multiple_choice_trial_on_openbookqa(shared_data):
    """The real aidreams260K model, OpenBookQA, the dataset's own evaluators: the trial's
    acc equals the evaluator run directly on the same subset."""
    from workers.data import load_dataset
    from workers.evaluators import evaluators
    from workers.models import load_model

    dataset = {"name": str(shared_data / "openbookqa" / "openbookqa.jsonl"),
               "format": "openbookqa", "limit": 24, "metrics": ["multiple_choice"]}
    cfg = dict(config("drop_layers", 0.25), dataset=dataset,
               model={"id": f"llama2c:{shared_data / 'aidreams260K'}"})
    result = trial.run_trial(cfg)
    assert result["status"] == "done"
    metrics = {name: m["value"] for name, m in result["metrics"].items()}
    assert set(metrics) == {"acc", "acc_norm", "mc_samples", "mc_truncated", "params", "size_mb"}
    assert metrics["mc_samples"] == 24
    assert result["metrics"]["acc"]["direction"] == "higher"

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    from workers.methods import MethodContext, get_method

    method = get_method("drop_layers")
    variant = method.apply(copy.deepcopy(loaded.model), 0.25, method.config(), MethodContext(
        tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
        calibration_documents=lambda *_: [])).model
    direct = evaluators()["multiple_choice"].evaluate(
        variant, loaded.tokenizer, load_dataset(dataset, 0), {"batch_size": 8})
    assert metrics["acc"] == direct["acc"] and metrics["acc_norm"] == direct["acc_norm"]


def test_device_follows_the_model_entry_and_the_trial_s_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trial._device({"use_gpu": True, "model": {}}) == "cuda:0"
    assert trial._device({"use_gpu": True, "model": {"device": "cpu"}}) == "cpu"
    assert trial._device({"use_gpu": False, "model": {"device": "auto"}}) == "cpu"
    with pytest.raises(RuntimeError, match="device is cuda but this trial has no GPU"):
        trial._device({"use_gpu": False, "model": {"device": "cuda"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial._device({"use_gpu": True, "model": {}}) == "cpu"


def test_a_declared_model_type_is_checked_when_the_model_loads(tiny_llama_dir):
    cfg = dict(config("none"), model={"id": "builtin:tiny-llama", "model_type": "mamba"})
    with pytest.raises(ValueError, match="is a 'llama' model, not 'mamba'"):
        trial.run_trial(cfg)


def test_model_bytes_counts_the_packed_weights_of_quantized_modules():
    """torch.ao quantized linears keep weight and bias packed, outside parameters and
    buffers: each counts 1 byte per qint8 weight plus its scale and zero point (float64 and
    int64, per output channel or once per tensor) and 4 bytes per float32 bias value."""
    import warnings

    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4, bias=False),
                                torch.nn.LayerNorm(4))
    model[2].register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    floats = 4 * (16 * 8 + 8 + 8 * 4 + 4 + 4) + 8 * 3
    assert trial.model_bytes(model) == floats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(model, {"0": per_channel_dynamic_qconfig,
                                             "1": default_dynamic_qconfig}, inplace=False)
    assert list(quantized.parameters()) == list(quantized[2].parameters())  # weights hidden
    first = 16 * 8 + 8 * (8 + 8) + 4 * 8  # per-channel weight, scales, zero points, bias
    second = 8 * 4 + 8 + 8  # per-tensor weight, one scale and zero point, no bias
    assert trial.model_bytes(quantized) == 4 * (4 + 4) + 8 * 3 + first + second
    # The other torch.ao modules with packed weights.
    from torch.ao.nn import quantized as nnq

    conv = nnq.Conv2d(3, 4, 3)  # a per-tensor qint8 weight, a float32 bias
    assert trial.model_bytes(conv) == 4 * 3 * 3 * 3 + 8 + 8 + 4 * 4
    embedding = nnq.Embedding(10, 8)  # quint8 rows, a float32 scale and offset per row
    assert trial.model_bytes(embedding) == 10 * 8 + 10 * (4 + 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lstm = quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(8, 4)), {torch.nn.LSTM})
    # Two per-tensor qint8 matrices (16×8, 16×4) and two float32 biases of 16.
    assert trial.model_bytes(lstm) == 16 * 8 + 16 * 4 + 2 * (8 + 8) + 2 * 16 * 4


def test_int8_variants_keep_the_parameter_count_and_their_bytes_are_counted_by_hand():
    """A quantized variant still represents the weights of its float model: parameter_count
    counts the int8 values of Int8PerTokenLinear (a buffer) and the packed weights and
    biases of torch.ao modules as parameters (never their scales or zero points).
    model_bytes counts Int8PerTokenLinear's buffers: 1 byte per int8 weight and a float32
    scale per output channel, plus its float32 bias."""
    import warnings

    from torch.ao.nn import quantized as nnq
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from workers.methods.quantize import (
        Int8PerTokenLinear,
        quantize_int8_dynamic_per_tensor,
        quantize_int8_per_token,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4, bias=False),
                                torch.nn.LayerNorm(4))
    model[2].register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    floats = 16 * 8 + 8 + 8 * 4 + 4 + 4
    assert trial.parameter_count(model) == floats
    norm_bytes = 4 * (4 + 4) + 8 * 3

    per_token = copy.deepcopy(model)
    quantize_int8_per_token(per_token, ["0", "1"])
    assert isinstance(per_token[0], Int8PerTokenLinear)
    assert [n for n, _ in per_token.named_parameters()] == ["0.bias", "2.weight", "2.bias"]
    assert trial.parameter_count(per_token) == floats
    first = 16 * 8 + 4 * 8 + 4 * 8  # int8 weight, float32 scale per output channel, bias
    second = 8 * 4 + 4 * 4  # int8 weight, float32 scale per output channel, no bias
    assert trial.model_bytes(per_token) == norm_bytes + first + second

    per_tensor = copy.deepcopy(model)
    quantize_int8_dynamic_per_tensor(per_tensor, ["0", "1"])
    assert list(per_tensor.parameters()) == list(per_tensor[2].parameters())  # weights hidden
    assert trial.parameter_count(per_tensor) == floats
    # Other torch.ao modules with packed weights count their weight and bias values.
    assert trial.parameter_count(nnq.Conv2d(3, 4, 3)) == 4 * 3 * 3 * 3 + 4
    assert trial.parameter_count(nnq.Embedding(10, 8)) == 10 * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lstm = quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(8, 4)), {torch.nn.LSTM},
                                inplace=False)
        linear = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                                  {"0": per_channel_dynamic_qconfig})
    assert trial.parameter_count(lstm) == 16 * 8 + 16 * 4 + 2 * 16
    assert trial.parameter_count(linear) == 16 * 8 + 8

    # A linear shared under two names stays one module, counted once.
    shared = torch.nn.Linear(8, 8)
    twice = torch.nn.Sequential(shared, shared)
    assert trial.parameter_count(twice) == 8 * 8 + 8
    quantize_int8_per_token(twice, ["0"])
    assert twice[0] is twice[1] and isinstance(twice[1], Int8PerTokenLinear)
    assert trial.parameter_count(twice) == 8 * 8 + 8
    assert trial.model_bytes(twice) == 8 * 8 + 4 * 8 + 4 * 8


def test_a_trial_given_no_gpu_hides_the_nodes_gpus(monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES as the node had it for a trial without GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    # CUDA reads the variable once, when it starts: keep it from starting in this process.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = {"model": {"id": "m"}, "gpus_per_trial": 0, "use_gpu": False}
    assert trial._device(config) == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert trial._gpu_evidence(config, "cpu") == {}


def test_gpu_evidence_names_the_visible_gpus_and_sharing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    whole = trial._gpu_evidence({"gpus_per_trial": 1.0}, "cuda:0")
    assert whole == {"gpus_per_trial": 1.0, "cuda_visible_devices": ["3"], "gpu_shared": False,
                     "gpu_used": True}
    assert trial._gpu_evidence({"gpus_per_trial": 0.25}, "cpu")["gpu_shared"] is True
