"""quantize: the per-token int8 layer against a float64 reference, both int8 dynamic schemes
on every family (CPU), causality, refusals and library detection for the GPU weight-only
schemes, and what the trial's evidence makes of a quantized variant.

Tolerances. An Int8PerTokenLinear must equal, to float32 rounding (1e-5 relative), the
product computed in float64 from its own int8 weights and scales and the per-row quantized
input; its integer product (``torch._int_mm`` or the int32 fallback) is exact. A torch.ao
dynamic qint8 linear (``int8_dynamic_per_tensor``) must equal, to 1e-5 relative, the same
product computed from its own int8 weights and the activation quantized the way torch.ao's
observer does (one scale per input tensor).

Whole models, max |Δlogits| against the float32 base on a 37-token probe, as a fraction of
max(1, max |base logits|): ``int8_dynamic`` (per token) ≤ 0.05, measured ≤ 0.012 (tiny
random models) and 0.020 (aidreams260K; 0.029 on 256 tokens of TinyShakespeare);
``int8_dynamic_per_tensor`` ≤ 0.1, measured ≤ 0.027 (tiny) and 0.079 (aidreams260K) — 8-bit
steps of per-tensor activation ranges add up over the layers, and the step grows with the
range of the whole input, so on the 256 tokens its largest logit error reaches 0.19 of the
scale; there the quality measure is used instead: the mean next-token negative
log-likelihood moves by ≤ 0.05 nats (≈ 5 % perplexity; measured 0.003 per token, 0.007 per
tensor).

Causality: ``int8_dynamic`` is exactly position-wise, so its causality violation must be
≤ 1e-6 (measured 0.0 on every family and on aidreams260K); ``int8_dynamic_per_tensor``'s
exceeds the trial's threshold (measured 0.004-0.07 on tiny models, 0.99 on aidreams260K).
"""

from __future__ import annotations

import copy
import math
import sys
import types
from pathlib import Path

import pytest
import tiny_models
import torch

from workers import trial
from workers.methods import MethodContext, get_method
from workers.methods.quantize import (
    MAX_INT8_INPUT_FEATURES,
    Int8PerTokenLinear,
    QuantizeConfig,
    int8_matmul,
    int8_matmul_kernel,
    quantize_rows,
    weight_only_libraries,
)
from workers.models import LoadedModel, load_model

TEXT = "Once upon a time, a small model read a short sentence twice."
WHOLE_MODEL_TOLERANCE = {"int8_dynamic": 0.05, "int8_dynamic_per_tensor": 0.1}
NLL_TOLERANCE = 0.05
CAUSAL_TOLERANCE = 1e-6
DYNAMIC_SCHEMES = ("int8_dynamic", "int8_dynamic_per_tensor")


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
    config = QuantizeConfig.model_validate(params)
    return method.apply(model if model is not None else copy.deepcopy(loaded.model), None,
                        config, context_for(loaded, device))


def quantized_layers(model, scheme: str) -> dict[str, torch.nn.Module]:
    """The modules of ``model`` that ``scheme`` put in place of linears."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    kind = Int8PerTokenLinear if scheme == "int8_dynamic" else DynamicLinear
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def float_linears(model) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]


def expected_bytes(base, quantized_names: list[str], scheme: str) -> int:
    """model_bytes of the variant by hand: the base's bytes, minus each quantized linear's
    float32 weight, plus its int8 weight and its scales: one float32 scale per output
    channel (per token), or a float64 scale and an int64 zero point per output channel
    (torch.ao). The float32 bias stays as it was."""
    per_channel = 4 if scheme == "int8_dynamic" else 8 + 8
    total = trial.model_bytes(base)
    for name in quantized_names:
        linear = base.get_submodule(name)
        total += -linear.weight.numel() * 4 + linear.weight.numel() + \
            per_channel * linear.out_features
    return total


def test_registered_without_a_rate_and_config_is_strict():
    method = get_method("quantize")
    assert method.uses_rate is False and method.changes_model
    assert QuantizeConfig.model_validate({}).scheme == "int8_dynamic"  # the causal one
    with pytest.raises(ValueError):
        QuantizeConfig.model_validate({"scheme": "int3"})
    with pytest.raises(ValueError):
        QuantizeConfig.model_validate({"scheme": "int8_dynamic", "skpi": ["lm_head"]})
    for scheme in DYNAMIC_SCHEMES:
        with pytest.raises(ValueError, match="library applies to int8_weight_only"):
            QuantizeConfig.model_validate({"scheme": scheme, "library": "torchao"})


def test_quantize_rows_gives_each_row_its_own_symmetric_scale():
    rows = torch.tensor([[127.0, 62.5, -0.5, 1.5], [-254.0, 127.0, 0.0, 1.0],
                         [0.0, 0.0, 0.0, 0.0], [300.0, 1.0, -1.0, 2.0]])
    values, scales = quantize_rows(rows)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales, torch.tensor([[1.0], [2.0], [0.0], [300 / 127]]),
                               rtol=0, atol=0)
    # Halves round to even (62.5 → 62, 1.5 → 2, 63.5 → 64, 0.5 → 0); the largest |value|
    # of a row maps to ±127.
    assert values.tolist() == [[127, 62, 0, 2], [-127, 64, 0, 0], [0, 0, 0, 0], [127, 0, 0, 1]]


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 2048, 48),
                                   (1, MAX_INT8_INPUT_FEATURES, 2)])
def test_int8_matmul_is_exact_through_int_mm_and_through_its_int32_fallback(monkeypatch, m, k,
                                                                            n):
    """torch._int_mm takes these shapes on CPU (no size or alignment constraint there); the
    fallback gives the same int32 values. Extreme rows reach |dot| = k · 127², which at
    k = MAX_INT8_INPUT_FEATURES is the largest an int32 accumulator must hold."""
    generator = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    a[0], w[0] = 127, -127
    exact = a.long() @ w.long().T
    assert int(exact[0, 0]) == -k * 127**2
    assert int8_matmul_kernel() == "torch._int_mm"
    got = int8_matmul(a, w)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact)
    monkeypatch.delattr(torch, "_int_mm")
    assert int8_matmul_kernel() == "int32 matmul (no torch._int_mm)"
    fallback = int8_matmul(a, w)
    assert fallback.dtype == torch.int32 and torch.equal(fallback.long(), exact)


def test_the_layer_refuses_inputs_too_wide_for_its_int32_accumulator():
    assert MAX_INT8_INPUT_FEATURES * 127**2 <= 2**31 - 1 < (MAX_INT8_INPUT_FEATURES + 1) * 127**2
    assert Int8PerTokenLinear(MAX_INT8_INPUT_FEATURES, 1).in_features == MAX_INT8_INPUT_FEATURES
    with pytest.raises(ValueError, match="can overflow its int32 accumulator"):
        Int8PerTokenLinear(MAX_INT8_INPUT_FEATURES + 1, 1)


def test_a_per_token_linear_equals_a_float64_reference_row_by_row(monkeypatch):
    """Weights int8 with one symmetric scale per output channel; each input row quantized
    with its own scale; the product, rescaled, equals its float64 computation from those
    int8 values; and every row's output depends on that row only."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Int8PerTokenLinear.from_linear(linear)
    assert layer.bias.data_ptr() != linear.bias.data_ptr()  # a copy of the bias
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert {n: b.dtype for n, b in layer.named_buffers()} == {"weight_int8": torch.int8,
                                                              "weight_scale": torch.float32}
    # Weights, independently: scale = max |row| / 127, values round(w / scale), ±127 reached.
    w = linear.weight.detach()
    w_scale = w.abs().amax(dim=1) / 127
    assert torch.equal(layer.weight_scale, w_scale)
    assert torch.equal(layer.weight_int8, torch.round(w / w_scale[:, None]).to(torch.int8))
    assert torch.equal(layer.weight_int8.abs().amax(dim=1), torch.full((32,), 127,
                                                                       dtype=torch.int8))
    assert torch.equal(layer.bias, linear.bias)

    x = torch.randn(4, 6, 64) * 3
    x[1, 2] *= 1000  # one loud token: per-tensor scaling would flatten all the others
    x[2, 3] = 0  # a silent one
    rows = x.reshape(-1, 64)
    x_scale = rows.abs().amax(dim=1, keepdim=True) / 127
    x_int8 = torch.round(rows / torch.where(x_scale > 0, x_scale, 1)).to(torch.int8)
    reference = ((x_int8.double() @ layer.weight_int8.double().T) * x_scale.double()
                 * layer.weight_scale.double() + layer.bias.detach().double()).reshape(4, 6, 32)
    with torch.no_grad():
        got = layer(x)
        plain = linear(x)
    assert got.shape == (4, 6, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5,
                               atol=1e-5 * float(reference.abs().max()))
    assert torch.equal(got[2, 3], layer.bias.detach())  # a zero row gives the bias exactly
    quiet = torch.ones(4, 6, dtype=torch.bool)
    quiet[1, 2] = False
    error = float((got - plain)[quiet].abs().max())
    assert 1e-4 < error < 0.05 * float(plain[quiet].abs().max())  # int8, yet close

    # Position-wise: each row alone, or with every other row changed, gives the same bits.
    with torch.no_grad():
        for i in range(rows.shape[0]):
            assert torch.equal(layer(rows[i:i + 1])[0], got.reshape(-1, 32)[i])
        others = rows * 50
        others[5] = rows[5]
        assert torch.equal(layer(others)[5], got.reshape(-1, 32)[5])
        # The int32 fallback computes the same integers, hence the same outputs.
        monkeypatch.delattr(torch, "_int_mm")
        assert torch.equal(layer(x), got)


def test_a_dynamic_linear_computes_int8_weights_times_per_tensor_quantized_input():
    """int8_dynamic_per_tensor: the torch.ao kernel's arithmetic, rebuilt from torch's own
    quantization primitives."""
    from torch.ao.quantization.observer import MinMaxObserver

    from workers.methods.quantize import quantize_int8_dynamic_per_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    linear = copy.deepcopy(model[0])
    quantize_int8_dynamic_per_tensor(model, ["0"])
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


@pytest.mark.parametrize("scheme", DYNAMIC_SCHEMES)
@pytest.mark.parametrize("model_type", tiny_models.ALL_MODEL_TYPES)
def test_int8_dynamic_schemes_on_every_family(checkpoint, model_type, scheme):
    loaded = load_model(f"local:{checkpoint(model_type)}")
    base = loaded.model
    linears = float_linears(base)
    outcome = quantize(loaded, scheme=scheme)
    variant, info = outcome.model, outcome.info
    quantized = quantized_layers(variant, scheme)
    keep = ["lm_head"] + ([n for n in linears if n.endswith(".dt_proj")]
                          if model_type == "mamba" else [])
    assert info["scheme"] == scheme and info["causal"] is (scheme == "int8_dynamic")
    assert sorted(info["kept_modules"]) == sorted(keep)
    assert sorted(quantized) == sorted(info["quantized_modules"])
    assert sorted(quantized) == sorted(n for n in linears if n not in keep)
    assert float_linears(variant) == [n for n in linears if n in keep]
    # Size: model_bytes counts the int8 weights and their scales, exactly as by hand.
    assert info["bytes_after"] == trial.model_bytes(variant) == expected_bytes(
        base, list(quantized), scheme)
    assert trial.model_bytes(variant) < 0.7 * trial.model_bytes(base)
    assert info["bytes_per_parameter_before"] == pytest.approx(4.0, abs=0.01)
    assert info["bytes_per_parameter_after"] == pytest.approx(
        info["bytes_after"] / trial.parameter_count(base))
    # Logits close to the base's, but not equal (the no-effect guard passes).
    ids = probe(loaded)
    base_logits, got = trial.logits_of(base, ids), trial.logits_of(variant, ids)
    scale = max(1.0, float(base_logits.abs().max()))
    assert 0 < float((got - base_logits).abs().max()) <= WHOLE_MODEL_TOLERANCE[scheme] * scale
    assert not torch.equal(got, base_logits)
    # Evidence: the variant still represents every weight of the base (the int8 values
    # count as parameters), and the quantized weights count as changed.
    weights = sum(base.get_submodule(n).weight.numel() for n in quantized)
    biases = sum(base.get_submodule(n).bias.numel() for n in quantized
                 if base.get_submodule(n).bias is not None)
    assert info["quantized_parameters"] == weights
    assert info["parameters"] == trial.parameter_count(base)
    assert trial.parameter_count(variant) == trial.parameter_count(base)
    # Per token the float biases stay parameters, unchanged; torch.ao packs them too, so
    # they are no longer parameters and count as removed.
    changed = weights if scheme == "int8_dynamic" else weights + biases
    assert trial.changed_fraction(base, variant, outcome.renamed) == pytest.approx(
        changed / trial.parameter_count(base))
    if scheme == "int8_dynamic":
        assert trial.causality_violation(base, ids) == 0.0
        assert trial.causality_violation(variant, ids) <= CAUSAL_TOLERANCE


def test_int8_dynamic_per_tensor_output_depends_on_the_whole_input_tensor(checkpoint):
    """One activation scale per input tensor: changing later tokens moves the rounding of
    earlier ones, so the trial's causality check (threshold 1e-4 of the logit scale) sees
    a dependence on future tokens and refuses such a variant as an invalid evaluation."""
    loaded = load_model(f"local:{checkpoint('llama')}")
    variant = quantize(loaded, scheme="int8_dynamic_per_tensor").model
    ids = probe(loaded)
    assert trial.causality_violation(loaded.model, ids) == 0.0
    violation = trial.causality_violation(variant, ids)
    assert violation > 1e-4 * max(1.0, float(trial.logits_of(loaded.model, ids).abs().max()))


@pytest.mark.parametrize("scheme", DYNAMIC_SCHEMES)
def test_real_model_aidreams(shared_data, scheme):
    from workers.data import token_stream

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    outcome = quantize(loaded, scheme=scheme)
    variant = outcome.model
    assert outcome.info["kept_modules"] == ["lm_head"]  # tied to the kept embedding
    assert variant.lm_head.weight is variant.model.embed_tokens.weight
    assert len(outcome.info["quantized_modules"]) == 4 * 7  # q k v o gate up down per layer
    ids = probe(loaded)
    base, got = trial.logits_of(loaded.model, ids), trial.logits_of(variant, ids)
    tolerance = WHOLE_MODEL_TOLERANCE[scheme]
    assert float((got - base).abs().max()) <= tolerance * float(base.abs().max())
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:4000]
    tokens = torch.tensor([token_stream(loaded.tokenizer, [text], 256)[:256]])

    def mean_nll(model) -> float:
        logits = trial.logits_of(model, tokens)
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]))

    assert abs(mean_nll(variant) - mean_nll(loaded.model)) <= NLL_TOLERANCE
    assert trial.model_bytes(variant) == expected_bytes(
        loaded.model, outcome.info["quantized_modules"], scheme)
    assert trial.parameter_count(variant) == trial.parameter_count(loaded.model) == 230_976
    if scheme == "int8_dynamic":
        assert outcome.info["bytes_per_parameter_after"] < 1.5
        base, got = trial.logits_of(loaded.model, tokens), trial.logits_of(variant, tokens)
        assert float((got - base).abs().max()) <= tolerance * float(base.abs().max())
        assert trial.causality_violation(variant, ids) <= CAUSAL_TOLERANCE
        assert trial.causality_violation(variant, tokens) <= CAUSAL_TOLERANCE
    else:
        assert outcome.info["bytes_per_parameter_after"] < 1.7


@pytest.mark.parametrize("scheme", DYNAMIC_SCHEMES)
@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_vision_language_models_answer_an_image_question_after_quantization(checkpoint,
                                                                            model_type, scheme):
    from workers.evaluators._vision import image_inputs

    loaded = load_model(f"local:{checkpoint(model_type)}")
    variant = quantize(loaded, scheme=scheme).model
    family = loaded.family
    assert quantized_layers(family.vision_tower(variant), scheme)  # the image side too
    inputs = image_inputs(loaded.processor, "What is in the picture?",
                          tiny_models.probe_image(), "cpu")
    with torch.no_grad():
        base = loaded.model(**inputs).logits
        got = variant(**inputs).logits
    scale = max(1.0, float(base.abs().max()))
    assert 0 < float((got - base).abs().max()) <= WHOLE_MODEL_TOLERANCE[scheme] * scale


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


@pytest.mark.parametrize("scheme", DYNAMIC_SCHEMES)
def test_int8_dynamic_schemes_need_a_float32_model_on_cpu(checkpoint, scheme):
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match=f"{scheme} runs on CPU only .* device is cuda:0: "
                                         "use scheme int8_weight_only"):
        quantize(loaded, device="cuda:0", scheme=scheme)
    half = load_model(f"local:{checkpoint('llama')}", dtype="bfloat16")
    with pytest.raises(ValueError, match=f"{scheme} needs a float32 model .* this one is "
                                         "bfloat16"):
        quantize(half, scheme=scheme)


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


def aidreams_trial(shared_data: Path, scheme: str | None) -> dict:
    """A run_trial config: aidreams260K, 20 documents of TinyShakespeare, perplexity;
    ``scheme`` None is the baseline (method none)."""
    method = ({"name": "none", "params": {}, "rate": None} if scheme is None else
              {"name": "quantize", "params": {"scheme": scheme}, "rate": None})
    return {"trial_key": "q" * 64, "sweep": "t",
            "model": {"id": f"llama2c:{shared_data / 'aidreams260K'}"},
            "method": method,
            "dataset": {"name": str(shared_data / "tinyshakespeare" / "input.txt"),
                        "limit": 20},
            "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32,
                           "batch_size": 4, "probe_length": 32},
            "seed": 0, "is_baseline": scheme is None}


def test_trial_refuses_an_int8_dynamic_per_tensor_variant_as_not_causal(shared_data):
    """run_trial on the real model: the causality check (see the test above) fails the
    trial as an invalid evaluation, by far more than its threshold."""
    with pytest.raises(trial.InvalidEvaluationError, match="the variant is not causal"):
        trial.run_trial(aidreams_trial(shared_data, "int8_dynamic_per_tensor"))


def test_trial_of_an_int8_dynamic_variant_is_done(shared_data):
    """The per-token variant passes the causality check and is evaluated: a finite
    perplexity close to the base's, the base's parameter count, a smaller size."""
    base = trial.run_trial(aidreams_trial(shared_data, None))
    result = trial.run_trial(aidreams_trial(shared_data, "int8_dynamic"))
    assert result["status"] == "done"
    evidence = result["evidence"]
    assert evidence["details"]["causality_max_abs_dlogits"] <= CAUSAL_TOLERANCE
    assert evidence["details"]["method"]["scheme"] == "int8_dynamic"
    assert evidence["params_after"] == evidence["params_before"] == 230_976
    assert result["metrics"]["params"]["value"] == 230_976
    assert evidence["details"]["bytes_after"] < 0.4 * evidence["details"]["bytes_before"]
    assert 0 < evidence["max_abs_dlogits"]
    perplexity = result["metrics"]["perplexity"]["value"]
    base_perplexity = base["metrics"]["perplexity"]["value"]
    assert math.isfinite(perplexity) and perplexity > 1
    assert abs(math.log(perplexity / base_perplexity)) <= NLL_TOLERANCE
