"""quantize: int8_dynamic on every family (CPU), refusals and library detection for the
GPU weight-only schemes, and what the trial's evidence makes of a quantized variant.

Tolerances. A dynamic qint8 linear must equal, to float rounding (1e-5 relative), the
same product computed from its own int8 weights and the activation quantized the way
torch.ao's observer does (one scale per input tensor). Whole models: max |Δlogits| ≤
0.1 · max(1, max |base logits|) — 8-bit steps of per-tensor activation ranges add up over
the layers; measured ≤ 0.016 (tiny random models) and 0.064 (aidreams260K, whose
activations are wide) on a 37-token probe. The per-tensor step grows with the range of
the whole input, so on 256 tokens of TinyShakespeare the largest logit error reaches
0.19 of the scale; there the quality measure is used instead: the mean next-token
negative log-likelihood moves by ≤ 0.05 nats (≈ 5 % perplexity; measured 0.007).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import tiny_models
import torch

from workers import trial
from workers.methods import MethodContext, get_method
from workers.methods.quantize import QuantizeConfig, weight_only_libraries
from workers.models import LoadedModel, load_model

TEXT = "Once upon a time, a small model read a short sentence twice."
WHOLE_MODEL_TOLERANCE = 0.1
NLL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Directory of a tiny checkpoint of a model type, built once per module."""
    root = tmp_path_factory.mktemp("tiny-quantize")
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return get


def context_for(loaded: LoadedModel, device: str = "cpu") -> MethodContext:
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device=device,
                         calibration_documents=lambda *_: [TEXT])


def probe(loaded: LoadedModel) -> torch.Tensor:
    bos = loaded.tokenizer.bos_id
    return torch.tensor([([bos] if bos is not None else []) + loaded.tokenizer.encode(TEXT)])


def quantize(loaded: LoadedModel, device: str = "cpu", model=None, **params):
    method = get_method("quantize")
    config = QuantizeConfig.model_validate({"scheme": "int8_dynamic", **params})
    return method.apply(model if model is not None else copy.deepcopy(loaded.model), None,
                        config, context_for(loaded, device))


def dynamic_linears(model) -> dict[str, torch.nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def float_linears(model) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]


def expected_bytes(base, quantized_names: list[str]) -> int:
    """model_bytes of the variant by hand: the base's bytes, minus each quantized linear's
    float32 weight and bias, plus its int8 weight, a float64 scale and an int64 zero point
    per output channel, and its float32 bias."""
    total = trial.model_bytes(base)
    for name in quantized_names:
        linear = base.get_submodule(name)
        bias = linear.bias.numel() * 4 if linear.bias is not None else 0
        total += -linear.weight.numel() * 4 - bias + linear.weight.numel() + 16 * \
            linear.out_features + bias
    return total


def test_registered_without_a_rate_and_config_is_strict():
    method = get_method("quantize")
    assert method.uses_rate is False and method.changes_model
    with pytest.raises(ValueError):
        QuantizeConfig.model_validate({"scheme": "int3"})
    with pytest.raises(ValueError):
        QuantizeConfig.model_validate({"scheme": "int8_dynamic", "skpi": ["lm_head"]})
    with pytest.raises(ValueError, match="library applies to int8_weight_only"):
        QuantizeConfig.model_validate({"scheme": "int8_dynamic", "library": "torchao"})


def test_a_dynamic_linear_computes_int8_weights_times_per_tensor_quantized_input():
    """The kernel's arithmetic, rebuilt from torch's own quantization primitives."""
    from torch.ao.quantization.observer import MinMaxObserver

    from workers.methods.quantize import quantize_int8_dynamic

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    linear = copy.deepcopy(model[0])
    quantize_int8_dynamic(model, ["0"])
    weight, bias = model[0]._weight_bias()
    assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
    assert weight.q_per_channel_scales().numel() == 32
    # Symmetric int8 per output channel: the largest |w| of each row maps to ±127 (±1 step).
    scales = linear.weight.abs().amax(dim=1) / 127.5
    torch.testing.assert_close(weight.q_per_channel_scales().float(), scales, rtol=0.01,
                               atol=0)
    x = torch.randn(3, 10, 64) * 3
    # fbgemm / x86 use 7 of the 8 bits for activations (reduce_range); qnnpack all 8.
    top = 127 if torch.backends.quantized.engine in ("x86", "fbgemm") else 255
    observer = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=top)
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    x_q = torch.quantize_per_tensor(x, float(scale), int(zero_point), torch.quint8)
    with torch.no_grad():
        expected = x_q.dequantize() @ weight.dequantize().T + bias
        got = model(x)
        plain = linear(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert float((got - plain).abs().max()) > 1e-3  # and it is not the float product


@pytest.mark.parametrize("model_type", tiny_models.ALL_MODEL_TYPES)
def test_int8_dynamic_on_every_family(checkpoint, model_type):
    loaded = load_model(f"local:{checkpoint(model_type)}")
    base = loaded.model
    linears = float_linears(base)
    outcome = quantize(loaded)
    variant, info = outcome.model, outcome.info
    quantized = dynamic_linears(variant)
    keep = ["lm_head"] + ([n for n in linears if n.endswith(".dt_proj")]
                          if model_type == "mamba" else [])
    assert sorted(info["kept_modules"]) == sorted(keep)
    assert sorted(quantized) == sorted(info["quantized_modules"])
    assert sorted(quantized) == sorted(n for n in linears if n not in keep)
    assert float_linears(variant) == [n for n in linears if n in keep]
    # Size: the fixed model_bytes counts the packed weights, exactly as by hand.
    assert info["bytes_after"] == trial.model_bytes(variant) == expected_bytes(base, list(
        quantized))
    assert trial.model_bytes(variant) < 0.7 * trial.model_bytes(base)
    assert info["bytes_per_parameter_before"] == pytest.approx(4.0, abs=0.01)
    assert info["bytes_per_parameter_after"] == pytest.approx(
        info["bytes_after"] / trial.parameter_count(base))
    # Logits close to the base's, but not equal (the no-effect guard passes).
    ids = probe(loaded)
    base_logits, got = trial.logits_of(base, ids), trial.logits_of(variant, ids)
    scale = max(1.0, float(base_logits.abs().max()))
    assert 0 < float((got - base_logits).abs().max()) <= WHOLE_MODEL_TOLERANCE * scale
    assert not torch.equal(got, base_logits)
    # Evidence: the quantized weights (and biases) are no longer parameters, so the trial
    # counts them as changed ("removed") and its parameter count drops to the float ones.
    assert trial.changed_fraction(base, variant, outcome.renamed) == pytest.approx(
        info["quantized_parameters"] / trial.parameter_count(base))
    assert info["parameters"] == trial.parameter_count(base)
    assert trial.parameter_count(variant) == info["parameters"] - info["quantized_parameters"]


def test_int8_dynamic_output_depends_on_the_whole_input_tensor(checkpoint):
    """One activation scale per input tensor: changing later tokens moves the rounding of
    earlier ones, so the trial's causality check (threshold 1e-4 of the logit scale) sees
    a dependence on future tokens and refuses such a variant as an invalid evaluation."""
    loaded = load_model(f"local:{checkpoint('llama')}")
    variant = quantize(loaded).model
    ids = probe(loaded)
    assert trial.causality_violation(loaded.model, ids) == 0.0
    violation = trial.causality_violation(variant, ids)
    assert violation > 1e-4 * max(1.0, float(trial.logits_of(loaded.model, ids).abs().max()))


def test_real_model_aidreams(shared_data):
    from workers.data import token_stream

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    outcome = quantize(loaded)
    variant = outcome.model
    assert outcome.info["kept_modules"] == ["lm_head"]  # tied to the kept embedding
    assert variant.lm_head.weight is variant.model.embed_tokens.weight
    assert len(outcome.info["quantized_modules"]) == 4 * 7  # q k v o gate up down per layer
    ids = probe(loaded)
    base, got = trial.logits_of(loaded.model, ids), trial.logits_of(variant, ids)
    assert float((got - base).abs().max()) <= WHOLE_MODEL_TOLERANCE * float(base.abs().max())
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:4000]
    tokens = torch.tensor([token_stream(loaded.tokenizer, [text], 256)[:256]])

    def mean_nll(model) -> float:
        logits = trial.logits_of(model, tokens)
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]))

    assert abs(mean_nll(variant) - mean_nll(loaded.model)) <= NLL_TOLERANCE
    assert trial.model_bytes(variant) == expected_bytes(loaded.model,
                                                        outcome.info["quantized_modules"])
    assert outcome.info["bytes_per_parameter_after"] < 1.7


@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_vision_language_models_answer_an_image_question_after_quantization(checkpoint,
                                                                            model_type):
    from workers.evaluators._vision import image_inputs

    loaded = load_model(f"local:{checkpoint(model_type)}")
    variant = quantize(loaded).model
    family = loaded.family
    assert dynamic_linears(family.vision_tower(variant))  # the image side is quantized too
    inputs = image_inputs(loaded.processor, "What is in the picture?",
                          tiny_models.probe_image(), "cpu")
    with torch.no_grad():
        base = loaded.model(**inputs).logits
        got = variant(**inputs).logits
    scale = max(1.0, float(base.abs().max()))
    assert 0 < float((got - base).abs().max()) <= WHOLE_MODEL_TOLERANCE * scale


def test_skip_patterns_keep_modules_in_float(checkpoint):
    loaded = load_model(f"local:{checkpoint('llama')}")
    info = quantize(loaded, skip=["*.mlp"]).info
    # A given skip list replaces the default: the LM head is quantized now.
    assert "lm_head" in info["quantized_modules"]
    assert not [n for n in info["quantized_modules"] if ".mlp." in n]
    assert sorted(info["kept_modules"]) == sorted(
        f"model.layers.{i}.mlp.{p}_proj" for i in range(4) for p in ("gate", "up", "down"))
    with pytest.raises(ValueError, match="skip pattern 'model.layer.*' matches no module"):
        quantize(loaded, skip=["model.layer.*"])
    with pytest.raises(ValueError, match="no nn.Linear module is left to quantize"):
        quantize(loaded, skip=["model", "lm_head"])


def test_int8_dynamic_needs_a_float32_model_on_cpu(checkpoint):
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match="int8_dynamic runs on CPU only .* device is cuda:0: "
                                         "use scheme int8_weight_only"):
        quantize(loaded, device="cuda:0")
    half = load_model(f"local:{checkpoint('llama')}", dtype="bfloat16")
    with pytest.raises(ValueError, match="needs a float32 model .* this one is bfloat16"):
        quantize(half)


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_weight_only_schemes_are_refused_on_cpu(checkpoint, scheme):
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match=f"{scheme} needs a CUDA GPU .* device is cpu: use "
                                         "scheme int8_dynamic on CPU"):
        quantize(loaded, scheme=scheme)


def test_weight_only_library_detection(monkeypatch):
    fake = types.ModuleType("torchao")
    fake.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # None: import raises ImportError
    found = weight_only_libraries()
    assert found["torchao"] is not None and found["bitsandbytes"] is None
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert weight_only_libraries() == {"torchao": None, "bitsandbytes": None}


def test_weight_only_without_a_library_is_refused_on_cuda(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match="int4_weight_only needs torchao or bitsandbytes and "
                                         "neither is installed here: pip install torchao"):
        quantize(loaded, device="cuda:0", scheme="int4_weight_only")
    fake = types.ModuleType("bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    with pytest.raises(ValueError, match="with library torchao needs torchao, which is not "
                                         "installed here: pip install torchao, or use library: "
                                         "bitsandbytes"):
        quantize(loaded, device="cuda:0", scheme="int8_weight_only", library="torchao")


def test_torchao_int4_refuses_a_model_that_is_not_bfloat16(checkpoint, monkeypatch):
    fake = types.ModuleType("torchao")
    fake_quantization = types.ModuleType("torchao.quantization")

    def quantize_(*_args, **_kwargs):
        raise AssertionError("must refuse before quantizing")

    fake_quantization.quantize_ = quantize_
    fake_quantization.Int4WeightOnlyConfig = object
    fake.quantization = fake_quantization
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake_quantization)
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match="int4_weight_only with torchao .* needs a bfloat16 "
                                         "model; load it with dtype: bfloat16"):
        quantize(loaded, device="cuda:0", scheme="int4_weight_only")


def test_trial_refuses_an_int8_dynamic_variant_as_not_causal(shared_data):
    """run_trial on the real model: the causality check (see the test above) fails the
    trial as an invalid evaluation, by far more than its threshold."""
    from workers import trial

    config = {"trial_key": "q" * 64, "sweep": "t",
              "model": {"id": f"llama2c:{shared_data / 'aidreams260K'}"},
              "method": {"name": "quantize", "params": {"scheme": "int8_dynamic"}, "rate": None},
              "dataset": {"name": str(shared_data / "tinyshakespeare" / "input.txt"),
                          "limit": 20},
              "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32,
                             "batch_size": 4, "probe_length": 32},
              "seed": 0, "is_baseline": False}
    with pytest.raises(trial.InvalidEvaluationError, match="the variant is not causal"):
        trial.run_trial(config)
