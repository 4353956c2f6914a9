"""reduce_hidden: a narrower residual stream that reloads with stock transformers.

Tiny random checkpoints of every family (tests/tiny_models.py, with their RMSNorm weights
randomised so that folding them matters) and the real aidreams260K from ../shared/data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from workers.data import token_stream
from workers.evaluators.perplexity import sum_log_likelihood
from workers.methods import MethodContext, family_lacks, get_method
from workers.methods.reduce_hidden import (
    ReduceHiddenConfig,
    new_hidden_size,
    residual_statistics,
    top_channels,
)
from workers.models import LoadedModel, load_model

CALIBRATION = ["The residual stream carries every token's state from layer to layer. " * 6,
               "Principal components of hidden states, measured on a little text. " * 6]
TEXT = "Slicing the hidden size keeps the principal directions of the stream."
SMALL = {"calibration_samples": 4, "calibration_length": 32}
PRE_NORM = ("llama", "qwen2", "qwen3")
COMBINATIONS = [(t, b) for t in PRE_NORM for b in ("pca", "channels")] + [("exaone4", "channels")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Directory of a tiny checkpoint of a model type, built once per module."""
    root = tmp_path_factory.mktemp("reduce-hidden-tiny")
    built: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tiny_models.BUILDERS[model_type](root / model_type)
        return built[model_type]

    return build


def hidden_norm_modules(loaded: LoadedModel) -> list[Any]:
    """Every RMSNorm over the hidden size, found by module name (not by the method's code)."""
    names = ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")
    layers = loaded.family.decoder_layers(loaded.model)
    found = [getattr(layer, name) for layer in layers for name in names if hasattr(layer, name)]
    return [*found, loaded.family.final_norm(loaded.model)]


def tiny(checkpoint: Callable[[str], Path], model_type: str) -> LoadedModel:
    """The tiny model with random norm weights in [0.5, 1.5] (freshly initialised models
    have all-ones norms, which would make folding them a no-op)."""
    loaded = load_model(f"local:{checkpoint(model_type)}")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for norm in hidden_norm_modules(loaded):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    return loaded


def context(loaded: LoadedModel, documents: list[str] | None = None) -> MethodContext:
    texts = CALIBRATION if documents is None else documents
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
                         calibration_documents=lambda name, split, seed: texts)


def probe(loaded: LoadedModel) -> torch.Tensor:
    return torch.tensor([token_stream(loaded.tokenizer, [TEXT])[:48]])


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def reduce(loaded: LoadedModel, rate: float, basis: str, ctx: MethodContext | None = None,
           **options: Any) -> tuple[Any, dict[str, Any]]:
    """Apply the method to a deep copy of the loaded model (as run_trial does)."""
    config = ReduceHiddenConfig(basis=basis, **{**SMALL, **options})
    outcome = get_method("reduce_hidden").apply(copy.deepcopy(loaded.model), rate, config,
                                                ctx or context(loaded))
    return outcome.model, outcome.info


def is_tied(model: Any) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------- sizes


def test_new_hidden_size_rounds_to_the_multiple_and_refuses_zero():
    assert new_hidden_size(2048, 0.25, 8) == 1536  # EXAONE-4.0-1.2B, workflow 3
    assert new_hidden_size(64, 0.25, 8) == 48
    assert new_hidden_size(64, 0.3, 8) == 48  # 44.8 → 48 (nearest multiple)
    assert new_hidden_size(64, 0.3, 1) == 45
    assert new_hidden_size(32, 0.1, 8) == 32  # 28.8 → 32: a rotation only
    assert new_hidden_size(30, 0.01, 8) == 30  # 29.7 → 32, capped at the original width
    assert new_hidden_size(30, 0.0, 8) == 30
    with pytest.raises(ValueError, match="no hidden dimension"):
        new_hidden_size(32, 0.9, 8)  # 3.2 → 0
    for rate in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            new_hidden_size(32, rate, 8)


def test_config_rejects_unknown_bases_and_keys():
    with pytest.raises(ValidationError):
        ReduceHiddenConfig.model_validate({"basis": "svd"})
    with pytest.raises(ValidationError):
        ReduceHiddenConfig.model_validate({"multiple": 8})
    with pytest.raises(ValidationError):
        ReduceHiddenConfig.model_validate({"multiple_of": 0})


def test_top_channels_orders_by_energy_then_index():
    energy = torch.tensor([0.1, 0.4, 0.2, 0.4, 0.05], dtype=torch.float64)
    assert top_channels(energy, 3).tolist() == [1, 2, 3]
    assert top_channels(energy, 1).tolist() == [1]  # tie at 0.4: the lower index


# --------------------------------------------------------------------------- statistics


def test_statistics_are_the_normalised_second_moment_of_the_residual_stream(checkpoint):
    """C computed by hand: the state entering each layer, the state after the attention
    residual add, and the final norm's input; each token normalised to unit length."""
    loaded = tiny(checkpoint, "llama")
    model, family = loaded.model, loaded.family
    ids = probe(loaded)
    stats = residual_statistics(model, family, [ids], full=True)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = model.model.rotary_emb(hidden, positions)
        states = []
        for layer in model.model.layers:
            states.append(hidden)
            attention = layer.self_attn(layer.input_layernorm(hidden),
                                        position_embeddings=rotary, attention_mask=None)[0]
            hidden = hidden + attention
            states.append(hidden)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        states.append(hidden)
    expected = torch.zeros(32, 32, dtype=torch.float64)
    for state in states:
        x = state.reshape(-1, 32).double()
        unit = x / x.norm(dim=1, keepdim=True)
        expected += unit.T @ unit / x.shape[0]
    assert len(stats.sites) == len(states) == 2 * 4 + 1
    torch.testing.assert_close(stats.second_moment, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.stream_energy, expected.diagonal(), rtol=1e-5, atol=1e-6)
    final = states[-1].reshape(-1, 32).double()
    torch.testing.assert_close(stats.norm_energy["final_norm"],
                               (final.square() / final.square().sum(1, keepdim=True)).mean(0),
                               rtol=1e-5, atol=1e-6)
    channels_only = residual_statistics(model, family, [ids], full=False)
    assert channels_only.second_moment is None
    torch.testing.assert_close(channels_only.stream_energy, stats.stream_energy)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("model_type", PRE_NORM)
def test_rotation_without_slicing_keeps_the_logits(checkpoint, model_type):
    """Computational invariance: norms folded, stream rotated by Q, nothing sliced."""
    loaded = tiny(checkpoint, model_type)
    ids = probe(loaded)
    variant, info = reduce(loaded, 0.1, "pca")  # 32 · 0.9 = 28.8 → 32
    assert info["hidden_size_after"] == 32 and info["norm_scale"] == {"min": 1.0, "max": 1.0}
    assert info["variance_kept"] == pytest.approx(1.0)
    # It really rotated: the embedding and the norms are not the base's.
    base_embedding = loaded.model.get_input_embeddings().weight
    assert (variant.get_input_embeddings().weight - base_embedding).abs().max() > 1e-3
    assert all(torch.all(norm.weight == 1.0)
               for norm in hidden_norm_modules(LoadedModel(variant, loaded.tokenizer,
                                                           loaded.family, "")))
    torch.testing.assert_close(logits(variant, ids), logits(loaded.model, ids),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type,basis", COMBINATIONS)
def test_rate_zero_is_the_identity(checkpoint, model_type, basis):
    loaded = tiny(checkpoint, model_type)

    def no_calibration(*_: Any) -> list[str]:
        raise AssertionError("rate 0 must not calibrate")

    ctx = MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
                        calibration_documents=no_calibration)
    variant, info = reduce(loaded, 0.0, basis, ctx)
    assert info["identity"] and info["hidden_size_after"] == info["hidden_size_before"]
    base = dict(loaded.model.named_parameters())
    for name, param in variant.named_parameters():
        assert torch.equal(param, base[name]), name
    assert is_tied(variant) == is_tied(loaded.model)


# --------------------------------------------------------------------------- structure


def per_hidden_unit(loaded: LoadedModel) -> int:
    """Parameters per unit of hidden width: embedding (and untied head) rows, the q/k/v/
    gate/up inputs, the o/down outputs (and their biases), two norms per layer, the final
    norm."""
    model, family = loaded.model, loaded.family
    vocabulary = model.get_input_embeddings().num_embeddings
    count = vocabulary * (1 if is_tied(model) else 2) + 1
    for layer in family.decoder_layers(model):
        attention, mlp = family.attention_projections(layer), family.mlp_projections(layer)
        count += sum(attention[r].out_features for r in "qkv") + attention["o"].in_features
        count += mlp["gate"].out_features + mlp["up"].out_features + mlp["down"].in_features
        count += sum(p.bias is not None for p in (attention["o"], mlp["down"])) + 2
    return count


@pytest.mark.parametrize("model_type,basis", COMBINATIONS)
def test_reduced_model_shapes_count_and_stock_reload(checkpoint, tmp_path, model_type, basis):
    loaded = tiny(checkpoint, model_type)
    ids = probe(loaded)
    base_tied = is_tied(loaded.model)
    before = sum(p.numel() for p in loaded.model.parameters())
    variant, info = reduce(loaded, 0.25, basis)
    new = 24
    assert variant.config.hidden_size == info["hidden_size_after"] == new
    assert 0 < info["variance_kept"] < 1
    # Shapes, role by role, against the base model's.
    family = loaded.family
    assert tuple(variant.get_input_embeddings().weight.shape) == (
        loaded.model.get_input_embeddings().num_embeddings, new)
    assert tuple(variant.get_output_embeddings().weight.shape) == (
        loaded.model.get_output_embeddings().out_features, new)
    for old, layer in zip(family.decoder_layers(loaded.model), family.decoder_layers(variant),
                          strict=True):
        attention, base_attention = (family.attention_projections(layer),
                                     family.attention_projections(old))
        mlp, base_mlp = family.mlp_projections(layer), family.mlp_projections(old)
        for role in "qkv":
            assert attention[role].weight.shape == (base_attention[role].out_features, new)
        assert attention["o"].weight.shape == (new, base_attention["o"].in_features)
        for role in ("gate", "up"):
            assert mlp[role].weight.shape == (base_mlp[role].out_features, new)
        assert mlp["down"].weight.shape == (new, base_mlp["down"].in_features)
        for name in ("q_norm", "k_norm"):  # act on head_dim: untouched
            if hasattr(layer.self_attn, name):
                assert torch.equal(getattr(layer.self_attn, name).weight,
                                   getattr(old.self_attn, name).weight)
    variant_loaded = LoadedModel(variant, loaded.tokenizer, family, "")
    assert all(n.weight.shape == (new,) for n in hidden_norm_modules(variant_loaded))
    # Tied embeddings stay tied with channels; pca unties them (the head absorbs g_final).
    untied = basis == "pca" and base_tied
    assert info["untied_embeddings"] is untied
    assert is_tied(variant) == (base_tied and not untied)
    assert variant.config.tie_word_embeddings == is_tied(variant)
    vocabulary = variant.get_input_embeddings().num_embeddings
    expected = before - (32 - new) * per_hidden_unit(loaded) + (vocabulary * new if untied else 0)
    assert sum(p.numel() for p in variant.parameters()) == info["parameters_after"] == expected
    got = logits(variant, ids)
    assert torch.isfinite(got).all() and not torch.allclose(got, logits(loaded.model, ids))
    variant.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == new and is_tied(reloaded) == is_tied(variant)
    assert {n: p.shape for n, p in reloaded.named_parameters()} == {
        n: p.shape for n, p in variant.named_parameters()}
    assert torch.equal(logits(reloaded, ids), got)


@pytest.mark.parametrize("model_type,basis", COMBINATIONS)
def test_reduced_model_equals_the_base_with_its_stream_confined(checkpoint, model_type, basis):
    """The d'-wide model computes exactly what the base computes when its residual stream is
    projected onto the kept subspace (embedding and o/down outputs multiplied by P) and
    every hidden norm's output is scaled by c·sqrt(d'/d): so every reader, writer and norm
    was reduced in the same basis. Q_k (or the kept channels) is recovered from the
    variant's embedding, not from the method. ``eps`` is set to 0 on both sides."""
    loaded = tiny(checkpoint, model_type)
    ids = probe(loaded)
    variant, info = reduce(loaded, 0.25, basis)
    base, family, d, new = loaded.model, loaded.family, 32, 24
    embedding = base.get_input_embeddings().weight.detach().double()
    reduced = variant.get_input_embeddings().weight.detach().double()
    kept = torch.linalg.lstsq(embedding, reduced).solution  # [d, d']: E Q_k = E'
    torch.testing.assert_close(embedding @ kept, reduced, rtol=0, atol=1e-5)
    torch.testing.assert_close(kept.T @ kept, torch.eye(new, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    if basis == "channels":  # a selection of channels: columns of the identity, in order
        channels = kept.abs().argmax(dim=0)
        assert channels.tolist() == sorted(channels.tolist())
        torch.testing.assert_close(kept, torch.eye(d, dtype=torch.float64)[:, channels])
    projection = (kept @ kept.T).float()
    base_norms = hidden_norm_modules(loaded)
    variant_norms = hidden_norm_modules(LoadedModel(variant, loaded.tokenizer, family, ""))
    scales = []
    for old, new_norm in zip(base_norms, variant_norms, strict=True):
        if basis == "pca":  # folded: every norm is the constant c
            assert torch.allclose(new_norm.weight, new_norm.weight[0].expand(new))
            scale = float(new_norm.weight[0].detach())
        else:
            ratio = new_norm.weight.detach().double() / old.weight.detach().double()[channels]
            scale = float(ratio[0])
            torch.testing.assert_close(ratio, torch.full_like(ratio, scale))
        scales.append(scale)
        old.variance_epsilon = new_norm.variance_epsilon = 0.0
    assert min(scales) == pytest.approx(info["norm_scale"]["min"])
    assert max(scales) == pytest.approx(info["norm_scale"]["max"])
    if basis == "pca":
        assert scales[0] == pytest.approx(math.sqrt(d * info["variance_kept"] / new))

    def project(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output @ projection

    def scaled(factor: float) -> Callable[..., torch.Tensor]:
        return lambda _module, _args, output: output * factor

    handles = [base.get_input_embeddings().register_forward_hook(project)]
    for layer in family.decoder_layers(base):
        handles.append(family.attention_projections(layer)["o"].register_forward_hook(project))
        handles.append(family.mlp_projections(layer)["down"].register_forward_hook(project))
    for norm, scale in zip(base_norms, scales, strict=True):
        handles.append(norm.register_forward_hook(scaled(scale * math.sqrt(new / d))))
    try:
        expected = logits(base, ids)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits(variant, ids), expected, rtol=1e-4, atol=1e-4)


def test_pca_keeps_at_least_the_variance_of_the_best_channels(checkpoint):
    """Ky Fan: the top-d' eigen-subspace of C holds at least as much of trace C as any d'
    coordinate channels; strictly more on a real stream with correlated channels."""
    loaded = tiny(checkpoint, "qwen2")
    ctx = context(loaded)
    _, pca = reduce(loaded, 0.25, "pca", ctx)
    _, channels = reduce(loaded, 0.25, "channels", ctx)
    assert pca["variance_kept"] > channels["variance_kept"] > 0
    assert ctx.cache_hits == 0  # pca gathers the full C, channels only its diagonal


# --------------------------------------------------------------------------- refusals


def test_mamba_is_refused_at_validation_and_at_apply(checkpoint):
    method = get_method("reduce_hidden")
    loaded = load_model(f"local:{checkpoint('mamba')}")
    assert method.requires == ("mlp",)
    assert family_lacks(loaded.family, method.requires) == "MLP projections"
    with pytest.raises(ValueError, match="mamba models have neither"):
        reduce(loaded, 0.25, "channels")


def test_pca_refuses_post_norm_exaone(checkpoint):
    loaded = tiny(checkpoint, "exaone4")
    with pytest.raises(ValueError, match=r"basis 'pca' supports .*not exaone4.*post-norm.*"
                                         r"basis: channels"):
        reduce(loaded, 0.25, "pca")


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl"])
def test_vision_language_models_are_refused(checkpoint, model_type):
    loaded = load_model(f"local:{checkpoint(model_type)}")
    for basis in ("pca", "channels"):
        with pytest.raises(ValueError, match=f"vision-language models \\({model_type}\\)"):
            reduce(loaded, 0.25, basis)


# --------------------------------------------------------------------------- aidreams260K


def wikitext_lines(shared_data: Path, split: str) -> list[str]:
    text = (shared_data / "wikitext2" / f"{split}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def mean_kl(base: Any, variant: Any, ids: list[int]) -> float:
    """Mean KL(base ‖ variant) per token over 128-token chunks of ``ids``: the expected
    rise in log-perplexity on text drawn from the base model's own predictions."""
    chunks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    p = torch.log_softmax(logits(base, chunks), dim=-1)
    q = torch.log_softmax(logits(variant, chunks), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())


def perplexity(model: Any, ids: list[int]) -> float:
    total, count = sum_log_likelihood(model, ids, max_length=128, stride=64, batch_size=8,
                                      device="cpu")
    return math.exp(-total / count)


def test_aidreams_rotation_without_slicing_keeps_the_logits(shared_data):
    loaded = load_model("llama2c:" + str(shared_data / "aidreams260K"))
    assert loaded.model.config.tie_word_embeddings and is_tied(loaded.model)
    ids = torch.tensor([token_stream(loaded.tokenizer, wikitext_lines(shared_data, "test"),
                                    max_tokens=128)[:128]])
    ctx = context(loaded, wikitext_lines(shared_data, "valid"))
    variant, info = reduce(loaded, 0.05, "pca", ctx, calibration_samples=8,
                           calibration_length=128)  # 64 · 0.95 = 60.8 → 64
    assert info["hidden_size_after"] == 64 and info["untied_embeddings"]
    assert (variant.lm_head.weight - loaded.model.lm_head.weight).abs().max() > 1e-2
    torch.testing.assert_close(logits(variant, ids), logits(loaded.model, ids),
                               rtol=0, atol=1e-4)


def test_aidreams_quarter_of_the_hidden_size(shared_data, tmp_path, record_property):
    """pca and channels at rate 0.25 (64 → 48) on the real model: finite perplexity on
    WikiText-2 test, variance kept reported, stock reload, and pca closer to the base.

    aidreams260K was trained on other text, and its WikiText-2 perplexity *falls* when
    slicing flattens its over-confident predictions (measured: base 401, pca 397,
    channels 235 on these 512 tokens), so "pca loses less perplexity than channels" does
    not hold here and is not asserted. What is asserted instead is the KL divergence to
    the base's next-token distributions (the perplexity lost on the base model's own
    predictions): pca ≈ 0.45 nats/token, channels ≈ 1.55.
    """
    loaded = load_model("llama2c:" + str(shared_data / "aidreams260K"))
    ids = token_stream(loaded.tokenizer, wikitext_lines(shared_data, "test"),
                       max_tokens=512)[:512]
    ctx = context(loaded, wikitext_lines(shared_data, "valid"))
    base_ppl = perplexity(loaded.model, ids)
    results = {}
    for basis in ("pca", "channels"):
        variant, info = reduce(loaded, 0.25, basis, ctx, calibration_samples=16,
                               calibration_length=128)
        assert info["hidden_size_after"] == 48 and variant.config.hidden_size == 48
        assert 0.5 < info["variance_kept"] < 1
        assert info["parameters_after"] < info["parameters_before"] == 230_976
        ppl = perplexity(variant, ids)
        assert math.isfinite(ppl)
        results[basis] = {"perplexity": ppl, "kl": mean_kl(loaded.model, variant, ids),
                          "variance_kept": info["variance_kept"],
                          "parameters": info["parameters_after"]}
        variant.save_pretrained(tmp_path / basis)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / basis).eval()
        assert is_tied(reloaded) == (basis == "channels")
        check = torch.tensor([ids[:128]])
        assert torch.equal(logits(reloaded, check), logits(variant, check))
    record_property("reduce_hidden_aidreams", {"base_perplexity": base_ppl, **results})
    # 64 → 48: pca unties the head (4 · 37,152 + 2 · 512 · 48 + 48), channels keeps it tied.
    assert results["pca"]["parameters"] == 197_808
    assert results["channels"]["parameters"] == 173_232
    assert results["pca"]["variance_kept"] > results["channels"]["variance_kept"]
    assert results["pca"]["kl"] < results["channels"]["kl"]
