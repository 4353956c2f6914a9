"""cast: float16 / bfloat16 variants of every family, checked against the float32 base.

Tolerance of "close to the base": max |Δlogits| ≤ 8 u · max(1, max |base logits|), with u
the unit roundoff of the dtype (float16 2^-11, bfloat16 2^-8): a few roundings per layer
of a shallow model. Measured here: float16 ≤ 1.2e-3, bfloat16 ≤ 1.2e-2 of that scale.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers

from workers.methods import MethodContext, get_method
from workers.methods.cast import CastConfig, dtype_support
from workers.models import LoadedModel, load_model
from workers.models.hf import auto_class_name

TOLERANCE = {"float16": 8 * 2.0**-11, "bfloat16": 8 * 2.0**-8}
TEXT = "Once upon a time, a small model read a short sentence twice."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Directory of a tiny checkpoint of a model type, built once per module."""
    root = tmp_path_factory.mktemp("tiny-cast")
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return get


@pytest.fixture(autouse=True)
def _fresh_support_check():
    dtype_support.cache_clear()
    yield
    dtype_support.cache_clear()


def context_for(loaded: LoadedModel, device: str = "cpu") -> MethodContext:
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device=device,
                         calibration_documents=lambda *_: [TEXT])


def probe(loaded: LoadedModel) -> torch.Tensor:
    ids = loaded.tokenizer.encode(TEXT)
    bos = loaded.tokenizer.bos_id
    return torch.tensor([([bos] if bos is not None else []) + ids])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def cast(loaded: LoadedModel, dtype: str, model=None):
    method = get_method("cast")
    return method.apply(model if model is not None else copy.deepcopy(loaded.model), None,
                        CastConfig(dtype=dtype), context_for(loaded))


def assert_close_to_base(got: torch.Tensor, base: torch.Tensor, dtype: str) -> None:
    scale = max(1.0, float(base.abs().max()))
    error = float((got - base).abs().max())
    assert 0 < error <= TOLERANCE[dtype] * scale, (error, scale)


def reload(directory: Path):
    config = transformers.AutoConfig.from_pretrained(directory)
    return getattr(transformers, auto_class_name(config)).from_pretrained(directory).eval()


def test_registered_without_a_rate_and_config_is_strict():
    method = get_method("cast")
    assert method.uses_rate is False and method.changes_model
    with pytest.raises(ValueError):
        CastConfig.model_validate({"dtype": "float8"})
    with pytest.raises(ValueError):
        CastConfig.model_validate({"dtype": "float16", "dtpye": "float16"})
    with pytest.raises(ValueError):
        CastConfig.model_validate({})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("model_type", tiny_models.ALL_MODEL_TYPES)
def test_every_family_is_cast_and_reloads(checkpoint, tmp_path, model_type, dtype):
    loaded = load_model(f"local:{checkpoint(model_type)}")
    base = loaded.model
    ids = probe(loaded)
    outcome = cast(loaded, dtype)
    variant = outcome.model
    target = getattr(torch, dtype)
    assert {p.dtype for p in variant.parameters() if p.is_floating_point()} == {target}
    persistent = set(variant.state_dict())
    for name, buffer in variant.named_buffers():
        if buffer.is_floating_point():
            # What save_pretrained writes is cast; tables the model code rebuilds are not.
            assert buffer.dtype == (target if name in persistent else torch.float32), name
    assert outcome.info["bytes_per_parameter_before"] == 4.0
    assert outcome.info["bytes_per_parameter_after"] == 2.0
    assert outcome.info["dtypes_before"] == ["float32"]
    assert outcome.info["dtypes_after"] == [dtype]
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sum(p.numel() * p.element_size() for p in variant.parameters()) * 2 == base_bytes
    got = logits(variant, ids)
    assert_close_to_base(got, logits(base, ids), dtype)

    variant.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {target}
    assert torch.equal(logits(reloaded, ids), got)


@pytest.mark.parametrize("model_type", tiny_models.VISION_LANGUAGE_MODEL_TYPES)
def test_vision_language_models_answer_an_image_question_after_the_cast(checkpoint,
                                                                        model_type):
    from workers.evaluators._vision import image_inputs

    loaded = load_model(f"local:{checkpoint(model_type)}")
    inputs = image_inputs(loaded.processor, "What is in the picture?",
                          tiny_models.probe_image(), "cpu")
    variant = cast(loaded, "float16").model
    assert variant.dtype == torch.float16
    with torch.no_grad():
        base = loaded.model(**inputs).logits.float()
        got = variant(**inputs).logits.float()
    assert_close_to_base(got, base, "float16")


def test_real_model_aidreams(shared_data, tmp_path):
    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    ids = probe(loaded)
    base = logits(loaded.model, ids)
    for dtype in ("float16", "bfloat16"):
        variant = cast(loaded, dtype).model
        got = logits(variant, ids)
        assert_close_to_base(got, base, dtype)
        # The tied embedding / LM head stays one tensor.
        assert variant.lm_head.weight is variant.model.embed_tokens.weight
        agree = float((got.argmax(-1) == base.argmax(-1)).float().mean())
        assert agree >= 0.9, agree
    variant.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, ids), got)


def test_support_means_the_ops_run_and_are_right_on_the_device(monkeypatch):
    # torch 2.13 on CPU has float16 and bfloat16 kernels for all of them.
    assert dtype_support("cpu", "float16") is None
    assert dtype_support("cpu", "bfloat16") is None
    softmax = torch.softmax

    def wrong_half_softmax(x, *args, **kwargs):
        out = softmax(x, *args, **kwargs)
        return torch.zeros_like(out) if x.dtype == torch.float16 else out

    monkeypatch.setattr(torch, "softmax", wrong_half_softmax)
    dtype_support.cache_clear()
    problem = dtype_support("cpu", "float16")
    assert problem is not None and "softmax in float16 is off by" in problem
    assert dtype_support("cpu", "bfloat16") is None


def test_float16_without_device_support_is_refused(checkpoint, monkeypatch):
    layer_norm = torch.nn.functional.layer_norm

    def no_half_kernel(x, *args, **kwargs):  # what older torch CPU builds raised
        if x.dtype == torch.float16:
            raise RuntimeError('"LayerNormKernelImpl" not implemented for \'Half\'')
        return layer_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", no_half_kernel)
    loaded = load_model(f"local:{checkpoint('llama')}")
    with pytest.raises(ValueError, match=r"float16 is not supported on device cpu \(Runtime"
                                         r"Error: \"LayerNormKernelImpl\" not implemented.*"
                                         r"use dtype: bfloat16 instead"):
        cast(loaded, "float16")
    assert loaded.model.dtype == torch.float32  # refused before touching the model
    assert cast(loaded, "bfloat16").model.dtype == torch.bfloat16


def test_activation_overflow_is_refused_naming_the_module(checkpoint):
    loaded = load_model(f"local:{checkpoint('llama')}")
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():  # weights stay in float16's range; their products do not
        model.model.layers[1].mlp.up_proj.weight.mul_(5000)
        model.model.layers[1].mlp.down_proj.weight.mul_(5000)
    assert torch.isfinite(logits(model, probe(loaded))).all()  # fine in float32
    with pytest.raises(ValueError, match=r"float16 variant gives non-finite logits.*first "
                                         r"module with a non-finite output is "
                                         r"model\.layers\.1\.mlp\.down_proj"):
        cast(loaded, "float16", model)
    # bfloat16 has float32's range.
    variant = cast(loaded, "bfloat16", copy.deepcopy(model)).model
    assert torch.isfinite(logits(variant, probe(loaded))).all()


def test_weights_beyond_float16_range_are_refused(checkpoint):
    loaded = load_model(f"local:{checkpoint('qwen2')}")
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias[3] = 1e6
    with pytest.raises(ValueError, match=r"parameter model\.layers\.0\.self_attn\.q_proj\.bias "
                                         r"has values beyond the float16 range"):
        cast(loaded, "float16", model)


def test_a_model_already_in_the_dtype_is_refused(checkpoint):
    loaded = load_model(f"local:{checkpoint('llama')}", dtype="bfloat16")
    with pytest.raises(ValueError, match="already in bfloat16"):
        cast(loaded, "bfloat16")
    outcome = cast(loaded, "float16")  # bfloat16 → float16 is a change
    assert outcome.info["dtypes_before"] == ["bfloat16"]
    assert outcome.info["bytes_per_parameter_before"] == 2.0


def test_parameters_the_class_keeps_in_float32_stay_float32_as_on_reload(checkpoint, tmp_path,
                                                                         monkeypatch):
    from transformers import MambaForCausalLM

    # Mamba's mixer reads A_log as self.A_log.float(), so float32 there runs as it is.
    monkeypatch.setattr(MambaForCausalLM, "_keep_in_fp32_modules", ["A_log"])
    loaded = load_model(f"local:{checkpoint('mamba')}")
    outcome = cast(loaded, "float16")
    variant = outcome.model
    assert outcome.info["kept_float32"] == ["backbone.layers.0.mixer.A_log",
                                            "backbone.layers.1.mixer.A_log"]
    assert variant.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert variant.backbone.layers[0].mixer.in_proj.weight.dtype == torch.float16
    ids = probe(loaded)
    got = logits(variant, ids)
    variant.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert reloaded.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert reloaded.backbone.layers[0].mixer.in_proj.weight.dtype == torch.float16
    assert torch.equal(logits(reloaded, ids), got)
    # _keep_in_fp32_modules is for float16 only; bfloat16 casts everything.
    assert cast(loaded, "bfloat16").info["kept_float32"] == []


def real_model_trial(shared_data: Path, method: str, params: dict) -> dict:
    """A run_trial config: aidreams260K, perplexity on TinyShakespeare (no Ray)."""
    return {"trial_key": "c" * 64, "sweep": "t",
            "model": {"id": f"llama2c:{shared_data / 'aidreams260K'}"},
            "method": {"name": method, "params": params, "rate": None},
            "dataset": {"name": str(shared_data / "tinyshakespeare" / "input.txt"), "limit": 20},
            "evaluation": {"metrics": ["perplexity"], "max_length": 64, "stride": 32,
                           "batch_size": 4, "probe_length": 32},
            "seed": 0, "is_baseline": False}


def test_trial_of_a_cast_variant(shared_data):
    """What the trial's evidence makes of a cast: size halves, the parameter count stays, the
    probe logits move (so the no-effect guard passes) — and changed_fraction is 0, because
    it compares the base's weights rounded to the variant's dtype with the variant's."""
    from workers import trial

    result = trial.run_trial(real_model_trial(shared_data, "cast", {"dtype": "float16"}))
    evidence, details = result["evidence"], result["evidence"]["details"]
    assert result["status"] == "done"
    # Each parameter saves 2 bytes; the rotary tables (float32 buffers) stay as they were.
    assert details["bytes_before"] - details["bytes_after"] == 2 * evidence["params_before"]
    assert result["metrics"]["size_mb"]["value"] == details["bytes_after"] / 2**20
    assert evidence["params_after"] == evidence["params_before"]
    assert evidence["max_abs_dlogits"] > 0
    assert evidence["changed_fraction"] == 0.0
    assert details["method"]["bytes_per_parameter_after"] == 2.0
    assert result["metrics"]["perplexity"]["value"] > 1
