"""s4_heads: saliency checked against attention from output_attentions=True on tiny models of
every attention family; allocation counts (the 206-head early-skip case); masking, scale and
residual transfer on the weights; one calibration for all rates; save → reload; refusals;
and a run on the real aidreams260K model with WikiText calibration text."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)
import torch
from pydantic import ValidationError

from workers.data import load_dataset
from workers.evaluators._vision import image_inputs
from workers.methods import MethodContext, get_method
from workers.methods import s4_heads as s4
from workers.methods.s4_heads import (
    S4HeadsConfig,
    attention_statistics,
    layer_quotas,
    residual_transfer,
    select_heads,
)
from workers.models import family_for, load_model

TEXT_TYPES = ("llama", "qwen3", "exaone4")
ATTENTION_TYPES = tiny_models.VISION_LANGUAGE_MODEL_TYPES + TEXT_TYPES
TEXT_PROBE = "Context: heads attend to the question.\nWhich heads matter?"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def calibration_files(tmp_path_factory) -> dict[str, dict]:
    """Calibration entries: ScienceQA-style with images (one question without), a generic
    question set with a context field, and the same without context."""
    root = tmp_path_factory.mktemp("s4-calibration")
    for seed in range(4):
        tiny_models.probe_image(seed=seed).save(root / f"q{seed}.png")
    scienceqa = [
        {"question": "Which of these is a mammal?", "choices": ["shark", "whale"], "answer": 1,
         "hint": "Mammals feed their young milk.", "image": "q0.png"},
        {"question": "What is two plus two?", "choices": ["three", "four"], "answer": 1,
         "hint": "", "image": None},  # no image: skipped by VLM calibration
        {"question": "Which direction does the arrow point?", "choices": ["left", "right"],
         "answer": 0, "hint": "", "image": "q1.png"},
        {"question": "Is the picture bright?", "choices": ["yes", "no"], "answer": 0,
         "hint": "Look at the colours.", "image": "q2.png"},
        {"question": "What colour dominates?", "choices": ["red", "blue"], "answer": 1,
         "hint": "", "image": "q3.png"},
    ]
    (root / "scienceqa.jsonl").write_text("\n".join(json.dumps(r) for r in scienceqa) + "\n")
    texts = [
        {"q": "Which layer prunes heads?", "a": "the middle", "c": "Pruning removes heads in "
         "the middle layers of a decoder."},
        {"q": "What does calibration measure?", "a": "attention", "c": "Calibration runs a "
         "few samples through the model and measures attention."},
        {"q": "Where is the image?", "a": "before the text", "c": "The image tokens come "
         "first, then the instruction."},
        {"q": "Why scale?", "a": "to keep the norm", "c": "Scaling the kept heads keeps the "
         "output norm roughly the same."},
    ]
    (root / "context.jsonl").write_text("\n".join(json.dumps(r) for r in texts) + "\n")
    (root / "no_context.jsonl").write_text(
        "\n".join(json.dumps({"q": r["q"], "a": r["a"]}) for r in texts) + "\n")
    fields = {"question": "q", "answers": "a", "context": "c"}
    return {
        "image": {"name": str(root / "scienceqa.jsonl"), "format": "scienceqa"},
        "text": {"name": str(root / "context.jsonl"), "format": "question", "fields": fields},
        "no_context": {"name": str(root / "no_context.jsonl"), "format": "question",
                       "fields": fields},
    }


def sharpen(loaded) -> None:
    """Sharper attention than a random init gives, so heads differ in saliency (QK-norm
    families: scaling q/k_proj is undone by the norm, so its weight is scaled too)."""
    with torch.no_grad():
        for layer in loaded.family.decoder_layers(loaded.model):
            attention = loaded.family.attention(layer)
            for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
                module = getattr(attention, name, None)
                if module is not None:
                    module.weight.mul_(4.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Loaded tiny model of a type (built and sharpened once per module; deep-copy before
    changing it)."""
    root = tmp_path_factory.mktemp("s4-models")
    loaded: dict = {}

    def get(model_type: str):
        if model_type not in loaded:
            model = load_model(f"local:{tiny_models.BUILDERS[model_type](root / model_type)}")
            if model.family.has_attention:
                sharpen(model)
            loaded[model_type] = model
        return loaded[model_type]

    return get


def make_context(loaded, seed: int = 0) -> MethodContext:
    return MethodContext(tokenizer=loaded.tokenizer, family=loaded.family, seed=seed,
                         device="cpu", calibration_documents=lambda *_: [],
                         calibration_dataset=lambda entry: load_dataset(dict(entry), seed),
                         processor=loaded.processor)


def entry_for(loaded, files) -> dict:
    return files["image"] if loaded.family.is_vision_language else files["text"]


def config(files_entry: dict, **params) -> S4HeadsConfig:
    return S4HeadsConfig.model_validate({"calibration": files_entry, **params})


def probe_inputs(loaded, files) -> dict:
    """A fixed input for comparing logits (an image question for VLMs)."""
    if loaded.family.is_vision_language:
        image = str(Path(files["image"]["name"]).parent / "q0.png")
        return image_inputs(loaded.processor, "Which picture is it?", image, "cpu")
    ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(TEXT_PROBE)]
    return {"input_ids": torch.tensor([ids])}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def o_block(weight: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    return weight[:, head * head_dim:(head + 1) * head_dim]


# --------------------------------------------------------------------------- config


def test_registered_with_requirements_and_rate_meaning():
    info = get_method("s4_heads")
    assert info.requires == ("attention_heads",) and info.uses_rate
    assert "per layer for uniform" in info.rate_meaning
    assert info.config is S4HeadsConfig


def test_config_validation(calibration_files):
    parsed = config(calibration_files["text"])
    assert (parsed.n_calibration, parsed.gamma, parsed.allocation) == (64, 0.4, "uniform")
    assert (parsed.protected_layers, parsed.late_start, parsed.late_factor) == (6, 22, 1.75)
    with pytest.raises(ValidationError, match="unknown dataset format 'nope'; formats:"):
        config({"name": "calibration.jsonl", "format": "nope"})
    with pytest.raises(ValidationError, match="fields: unknown key 'contxt'"):
        config({"name": "c.jsonl", "format": "question", "fields": {"contxt": "c"}})
    with pytest.raises(ValidationError, match="calibrates on questions"):
        config({"name": "builtin:pydoc"})
    with pytest.raises(ValidationError, match="late_start"):
        config(calibration_files["text"], protected_layers=8, late_start=4)
    with pytest.raises(ValidationError, match="extra"):
        config(calibration_files["text"], gama=0.5)


# --------------------------------------------------------------------------- saliency


def reference_masses(loaded, inputs: dict, query: list[int], context: list[int]) -> list:
    """Per layer, per head: mean over query positions of the attention summed over the
    context positions, from the attention matrices transformers returns (eager)."""
    model = copy.deepcopy(loaded.model)
    loaded.family.language_model(model).set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == loaded.family.num_layers(model)
    out = []
    for layer_attention in attentions:
        heads = []
        for head in range(layer_attention.shape[1]):
            matrix = layer_attention[0, head].double()
            rows = [float(sum(matrix[q, c] for c in context)) for q in query]
            heads.append(sum(rows) / len(rows))
        out.append(heads)
    return out


def reference_inputs(loaded, sample) -> tuple[dict, list[int], list[int]]:
    """Inputs, query and context positions as the docstring defines them, built by hand."""
    if loaded.family.is_vision_language:
        inputs = image_inputs(loaded.processor, sample.prompt(), sample.image, "cpu")
        ids = inputs["input_ids"][0].tolist()
        image_id = loaded.model.config.image_token_id
        context = [i for i, t in enumerate(ids) if t == image_id]
        return inputs, list(range(context[-1] + 1, len(ids))), context
    tok = loaded.tokenizer
    context_ids = tok.encode(sample.context + "\n")
    question_ids = tok.encode(sample.question)
    ids = [tok.bos_id, *context_ids, *question_ids]
    context = list(range(1, 1 + len(context_ids)))
    query = list(range(1 + len(context_ids), len(ids)))
    return {"input_ids": torch.tensor([ids])}, query, context


@pytest.mark.parametrize("model_type", ATTENTION_TYPES)
def test_saliency_equals_attention_from_output_attentions(tiny, calibration_files, model_type):
    loaded = tiny(model_type)
    data = load_dataset(entry_for(loaded, calibration_files))
    stats = attention_statistics(loaded.model, make_context(loaded), data.samples, 3)
    vision = loaded.family.is_vision_language
    usable = [s for s in data.samples if s.image is not None] if vision else list(data.samples)
    usable = usable[:3]
    assert stats["used"] == 3
    assert stats["skipped"] == (1 if vision else 0)  # the imageless question comes 2nd
    assert stats["context"] == ("image" if vision else "text")
    expected = torch.tensor([reference_masses(loaded, *reference_inputs(loaded, s))
                             for s in usable], dtype=torch.float64)
    torch.testing.assert_close(stats["masses"], expected, rtol=1e-5, atol=1e-7)
    num_layers, num_heads = expected.shape[1:]
    for layer in range(num_layers):
        for head in range(num_heads):
            values = [float(v) for v in expected[:, layer, head]]
            assert float(stats["mean"][layer, head]) == pytest.approx(
                statistics.fmean(values), rel=1e-5, abs=1e-9)
            assert float(stats["var"][layer, head]) == pytest.approx(
                statistics.pvariance(values), rel=1e-4, abs=1e-9)
    score = s4.saliency(stats, 0.4)
    torch.testing.assert_close(score, stats["var"] + 0.4 * stats["mean"])
    # Attention really concentrates differently per head (the test is not vacuous).
    assert float(score.max() - score.min()) > 1e-3
    # Eager was only for the calibration.
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.family.language_model(loaded.model).config._attn_implementation == "sdpa"


def test_n_calibration_caps_the_samples_used(tiny, calibration_files):
    loaded = tiny("llama")
    data = load_dataset(calibration_files["text"])
    stats = attention_statistics(loaded.model, make_context(loaded), data.samples, 2)
    assert stats["used"] == 2 and stats["masses"].shape[0] == 2
    more = attention_statistics(loaded.model, make_context(loaded), data.samples, 100)
    assert more["used"] == len(data.samples) == 4
    torch.testing.assert_close(more["masses"][:2], stats["masses"])


# --------------------------------------------------------------------------- allocation


def assert_lowest_within_layers(scores: torch.Tensor, chosen: list[list[int]]) -> None:
    for layer, heads in enumerate(chosen):
        kept = [h for h in range(scores.shape[1]) if h not in heads]
        if heads and kept:
            assert max(float(scores[layer, h]) for h in heads) <= min(
                float(scores[layer, h]) for h in kept)


def test_early_skip_prunes_206_of_1024_heads():
    scores = torch.rand(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = select_heads(scores, 0.2, "early_skip", protected_layers=6, late_start=22,
                          late_factor=1.75)
    counts = [len(heads) for heads in chosen]
    assert counts == [0] * 6 + [6] * 16 + [11] * 10
    assert sum(counts) == 206
    assert_lowest_within_layers(scores, chosen)


def test_uniform_counts_and_lowest_heads():
    scores = torch.rand(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    chosen = select_heads(scores, 0.3, "uniform")
    assert [len(h) for h in chosen] == [10] * 32  # the users' "10 of 32 in all 32 = 320"
    assert_lowest_within_layers(scores, chosen)
    # At least one head per layer whenever the rate is positive.
    assert [len(h) for h in select_heads(scores, 0.001, "uniform")] == [1] * 32
    assert select_heads(scores, 0.0, "uniform") == [[] for _ in range(32)]


def test_adaptive_global_ranking_never_takes_a_whole_layer():
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0], [0.15, 5.0, 6.0, 7.0]])
    # round(0.25 · 12) = 3 lowest over all layers.
    assert select_heads(scores, 0.25, "adaptive") == [[0, 1], [], [0]]
    # 6 heads: layer 0 would lose all four; its last head is passed over for the next ones.
    assert select_heads(scores, 0.5, "adaptive") == [[0, 1, 2], [0, 1], [0]]
    random = torch.rand(8, 4, generator=torch.Generator().manual_seed(2))
    chosen = select_heads(random, 0.3, "adaptive")
    assert sum(len(h) for h in chosen) == round(0.3 * 32)
    # Global ranking: a head left unpruned while a higher-score head is pruned must be the
    # last head of a layer that already lost all the others.
    highest = max(float(random[layer, h]) for layer, hs in enumerate(chosen) for h in hs)
    for layer in range(8):
        for head in range(4):
            if head not in chosen[layer] and float(random[layer, head]) < highest:
                assert len(chosen[layer]) == 3
    assert all(len(hs) < 4 for hs in chosen)


@pytest.mark.parametrize("allocation", ["uniform", "adaptive", "early_skip"])
def test_selections_are_nested_across_rates(allocation):
    scores = torch.rand(12, 16, generator=torch.Generator().manual_seed(3))
    previous: set = set()
    for rate in (0.05, 0.1, 0.2, 0.3, 0.5):
        chosen = select_heads(scores, rate, allocation, protected_layers=2, late_start=9,
                              late_factor=1.5)
        current = {(layer, h) for layer, heads in enumerate(chosen) for h in heads}
        assert previous <= current and len(current) > len(previous)
        previous = current


def test_allocation_refusals():
    with pytest.raises(ValueError, match="all 4 heads of layer 0"):
        layer_quotas(3, 4, 0.9, "uniform")
    with pytest.raises(ValueError, match="late_start < 32"):
        layer_quotas(32, 32, 0.2, "early_skip", 6, 32, 1.75)
    with pytest.raises(ValueError, match="late_start < 4"):
        layer_quotas(4, 4, 0.2, "early_skip")  # defaults 6 / 22 on a 4-layer model
    with pytest.raises(ValueError, match="all 32 heads of layer 22"):
        layer_quotas(32, 32, 0.6, "early_skip", 6, 22, 1.75)  # late band: min(1.05, 1) · 32
    with pytest.raises(ValueError, match="all but one head"):
        layer_quotas(2, 2, 0.75, "adaptive")
    assert layer_quotas(4, 8, 0.25, "early_skip", 1, 3, 2.0) == [0, 2, 2, 4]


# --------------------------------------------------------------------------- weights


def changed_parameters(base, variant) -> set[str]:
    base_params = dict(base.named_parameters())
    return {name for name, p in variant.named_parameters()
            if not torch.equal(p, base_params[name])}


@pytest.mark.parametrize("model_type", ["llama", "llava"])
def test_masking_zeroes_exactly_the_pruned_columns(tiny, calibration_files, model_type):
    loaded = tiny(model_type)
    base = loaded.model
    family = loaded.family
    outcome = get_method("s4_heads").apply(
        copy.deepcopy(base), 0.5, config(entry_for(loaded, calibration_files),
                                         allocation="adaptive", n_calibration=4),
        make_context(loaded))
    variant, info = outcome.model, outcome.info
    chosen = info["pruned_heads_per_layer"]
    layers_total = family.num_layers(base) * family.num_heads(base)
    assert info["heads_pruned"] == round(0.5 * layers_total) == sum(len(h) for h in chosen)
    assert info["heads_total"] == layers_total
    assert all(len(h) < family.num_heads(base) for h in chosen)
    head_dim = family.head_dim(base)
    prefix = family.decoder_layers_prefix(base)
    expected_changed = set()
    for index, (layer, base_layer) in enumerate(zip(family.decoder_layers(variant),
                                                    family.decoder_layers(base), strict=True)):
        weight = family.attention_output_projection(layer).weight
        original = family.attention_output_projection(base_layer).weight
        for head in range(family.num_heads(base)):
            if head in chosen[index]:
                assert torch.count_nonzero(o_block(weight, head, head_dim)) == 0
            else:
                assert torch.equal(o_block(weight, head, head_dim),
                                   o_block(original, head, head_dim))
        if chosen[index]:
            expected_changed.add(f"{prefix}.{index}.self_attn.o_proj.weight")
    assert changed_parameters(base, variant) == expected_changed
    assert sum(p.numel() for p in variant.parameters()) == sum(p.numel()
                                                               for p in base.parameters())
    inputs = probe_inputs(loaded, calibration_files)
    assert not torch.equal(logits(variant, inputs), logits(base, inputs))
    assert variant.config._attn_implementation == base.config._attn_implementation == "sdpa"
    assert family.language_model(variant).config._attn_implementation == "sdpa"
    assert info["calibration"]["samples_used"] == 4
    assert info["calibration"]["samples_skipped"] == (1 if model_type == "llava" else 0)
    assert info["saliency"]["min"] <= info["saliency"]["median"] <= info["saliency"]["max"]
    assert info["scale_factors"] is None and info["transfers"] == [] and info["warnings"] == []


def test_rate_zero_is_identity(tiny, calibration_files):
    loaded = tiny("llama")
    model = copy.deepcopy(loaded.model)
    outcome = get_method("s4_heads").apply(model, 0.0, config(calibration_files["text"]),
                                           make_context(loaded))
    assert outcome.model is model and not changed_parameters(loaded.model, model)
    assert outcome.info["heads_pruned"] == 0 and "nothing was pruned" in outcome.info["note"]
    inputs = probe_inputs(loaded, calibration_files)
    assert torch.equal(logits(model, inputs), logits(loaded.model, inputs))


@pytest.mark.parametrize("model_type", ["llama", "exaone4"])
def test_calibration_scale_multiplies_kept_columns_by_h_over_kept(tiny, calibration_files,
                                                                   model_type):
    loaded = tiny(model_type)
    base, family = loaded.model, loaded.family
    outcome = get_method("s4_heads").apply(
        copy.deepcopy(base), 0.5, config(calibration_files["text"], calibration_scale=True),
        make_context(loaded))
    chosen = outcome.info["pruned_heads_per_layer"]
    heads, head_dim = family.num_heads(base), family.head_dim(base)
    assert all(len(h) == 2 for h in chosen)  # uniform: round(0.5 · 4) per layer
    assert outcome.info["scale_factors"] == [heads / (heads - 2)] * family.num_layers(base)
    for index, (layer, base_layer) in enumerate(zip(family.decoder_layers(outcome.model),
                                                    family.decoder_layers(base), strict=True)):
        weight = family.attention_output_projection(layer).weight
        original = family.attention_output_projection(base_layer).weight
        for head in range(heads):
            block = o_block(weight, head, head_dim)
            if head in chosen[index]:
                assert torch.count_nonzero(block) == 0
            else:
                assert torch.equal(block, o_block(original, head, head_dim) * (heads / 2))
    warnings = outcome.info["warnings"]
    if family.is_post_norm:
        assert len(warnings) == 1 and "no-op" in warnings[0] and "post-norm" in warnings[0]
    else:
        assert warnings == []


def test_residual_transfer_definition_on_synthetic_weights():
    head_dim, hidden = 2, 6
    gen = torch.Generator().manual_seed(4)
    # GQA: 4 query heads, 2 KV heads (heads 0, 1 share KV 0; heads 2, 3 share KV 1).
    o_weight = torch.randn(hidden, 4 * head_dim, generator=gen)
    o_weight[:, 0:2] = 3.0 * o_weight[:, 2:4]  # head 0 parallel to head 1 of another group
    o_weight[:, 6:8] = 0.5 * o_weight[:, 4:6] + 0.01  # head 3 nearly parallel to head 2
    v_weight = torch.randn(2 * head_dim, hidden, generator=gen)
    o_base, v_base = o_weight.clone(), v_weight.clone()
    records = residual_transfer(o_weight, v_weight, None, [0, 3], head_dim, 2, clip=1.0)
    assert [(r["pruned"], r["kept"]) for r in records] == [(0, 1), (3, 2)]  # same KV group
    assert torch.equal(v_weight, v_base)  # shared value heads: v_proj untouched
    for record in records:
        p, k = record["pruned"], record["kept"]
        op, ok = o_block(o_base, p, head_dim).double(), o_block(o_base, k, head_dim).double()
        cosine = float((op * ok).sum() / (op.norm() * ok.norm()))
        assert record["beta"] == pytest.approx(max(0.0, cosine), abs=1e-12)
        delta = record["beta"] * (op - ok)
        if float(delta.norm()) > float(ok.norm()):
            delta = delta * (float(ok.norm()) / float(delta.norm()))
            assert record["o_clipped"]
        torch.testing.assert_close(o_block(o_weight, k, head_dim).double(), ok + delta)
        assert float((o_block(o_weight, k, head_dim).double() - ok).norm()) <= \
            float(ok.norm()) * (1 + 1e-6)
        assert record["v_clipped"] is None
    # Head 3 → 2: cos ≈ 1, Δ = β(O3 − O2) ≈ −0.5·O2 is shorter than ‖O2‖: not clipped.
    assert records[1]["beta"] > 0.99 and not records[1]["o_clipped"]
    # Unrelated heads are unchanged (the pruned ones are zeroed later, by the masking).
    assert torch.equal(o_block(o_weight, 0, head_dim), o_block(o_base, 0, head_dim))

    # A kept head in the pruned head's group is preferred even if another is more similar.
    o_weight = o_base.clone()
    o_weight[:, 2:4] = o_weight[:, 0:2] * 2.0  # head 1 ∥ head 0 (same group as 0)
    o_weight[:, 4:6] = o_weight[:, 0:2] * 3.0  # head 2 ∥ head 0 too (other group)
    records = residual_transfer(o_weight, v_weight.clone(), None, [0], head_dim, 2, clip=0.1)
    assert records[0]["kept"] == 1 and records[0]["beta"] == pytest.approx(1.0)
    # β = 1: Δ = O0 − O1 = −O0, norm ‖O0‖ = ‖O1‖/2 > 0.1·‖O1‖: clipped to 0.1·‖O1‖.
    ok = o_base[:, 0:2].double() * 2.0
    got = o_block(o_weight, 1, head_dim).double()
    assert records[0]["o_clipped"]
    assert float((got - ok).norm()) == pytest.approx(0.1 * float(ok.norm()), rel=1e-5)


def test_residual_transfer_moves_values_when_value_heads_are_not_shared():
    head_dim, hidden = 2, 5
    gen = torch.Generator().manual_seed(5)
    o_weight = torch.randn(hidden, 3 * head_dim, generator=gen)
    o_weight[:, 2:4] = o_weight[:, 0:2] * 2.0 + 0.05 * torch.randn(hidden, 2, generator=gen)
    v_weight = torch.randn(3 * head_dim, hidden, generator=gen)
    v_bias = torch.randn(3 * head_dim, generator=gen)
    o_base, v_base, b_base = o_weight.clone(), v_weight.clone(), v_bias.clone()
    records = residual_transfer(o_weight, v_weight, v_bias, [0], head_dim, 1, clip=0.5)
    assert len(records) == 1 and records[0]["kept"] == 1
    beta = records[0]["beta"]
    assert 0.9 < beta <= 1.0
    base_rows = torch.cat([v_base, b_base.unsqueeze(1)], dim=1).double()
    vp, vk = base_rows[0:2], base_rows[2:4]
    delta = beta * (vp - vk)
    limit = 0.5 * float(vk.norm())
    if float(delta.norm()) > limit:
        delta = delta * (limit / float(delta.norm()))
        assert records[0]["v_clipped"]
    else:
        assert records[0]["v_clipped"] is False
    got = torch.cat([v_weight, v_bias.unsqueeze(1)], dim=1).double()
    torch.testing.assert_close(got[2:4], vk + delta)
    torch.testing.assert_close(got[[0, 1, 4, 5]], base_rows[[0, 1, 4, 5]])
    assert torch.equal(o_block(o_weight, 2, head_dim), o_block(o_base, 2, head_dim))


def test_residual_transfer_on_a_model(tiny, calibration_files):
    loaded = tiny("llama")  # GQA: 4 query heads, 2 KV heads
    base, family = loaded.model, loaded.family
    outcome = get_method("s4_heads").apply(
        copy.deepcopy(base), 0.25, config(calibration_files["text"], residual_transfer=True,
                                          transfer_clip=0.05), make_context(loaded))
    info = outcome.info
    transfers = info["transfers"]
    assert len(transfers) == info["heads_pruned"] == 4
    assert info["transfer_betas"] == [t["beta"] for t in transfers]
    head_dim = family.head_dim(base)
    received: dict = {}
    for t in transfers:
        layer = family.decoder_layers(base)[t["layer"]]
        weight = family.attention_output_projection(layer).weight.detach().double()
        op, ok = o_block(weight, t["pruned"], head_dim), o_block(weight, t["kept"], head_dim)
        assert t["kept"] // 2 == t["pruned"] // 2  # a kept head of the same KV group
        cosine = float(torch.nn.functional.cosine_similarity(op.flatten(), ok.flatten(), dim=0))
        assert t["beta"] == pytest.approx(max(0.0, cosine), abs=1e-9)
        delta = t["beta"] * (op - ok)
        if float(delta.norm()) > 0.05 * float(ok.norm()):
            delta = delta * (0.05 * float(ok.norm()) / float(delta.norm()))
        key = (t["layer"], t["kept"])
        received[key] = received.get(key, 0) + delta
    for index, (layer, base_layer) in enumerate(zip(family.decoder_layers(outcome.model),
                                                    family.decoder_layers(base), strict=True)):
        weight = family.attention_output_projection(layer).weight.double()
        original = family.attention_output_projection(base_layer).weight.double()
        for head in range(family.num_heads(base)):
            expected = o_block(original, head, head_dim) + received.get((index, head), 0)
            if head in info["pruned_heads_per_layer"][index]:
                expected = torch.zeros_like(expected)
            torch.testing.assert_close(o_block(weight, head, head_dim), expected,
                                       rtol=1e-6, atol=1e-7)
        assert torch.equal(family.attention_projections(layer)["v"].weight,
                           family.attention_projections(base_layer)["v"].weight)


# --------------------------------------------------------------------------- caching


def test_calibration_runs_once_across_rates_and_selections_nest(random_llama, byte_tokenizer,
                                                                calibration_files,
                                                                monkeypatch):
    calls = []
    original = s4.attention_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(s4, "attention_statistics", counting)
    family = family_for(random_llama)  # 8 heads, 2 KV heads, 4 layers
    ctx = MethodContext(tokenizer=byte_tokenizer, family=family, seed=0, device="cpu",
                        calibration_documents=lambda *_: [],
                        calibration_dataset=lambda entry: load_dataset(dict(entry), 0))
    method = get_method("s4_heads")
    from_cache = []
    for allocation in ("uniform", "adaptive"):
        selections = []
        for rate in (0.1, 0.3):
            outcome = method.apply(copy.deepcopy(random_llama), rate,
                                   config(calibration_files["text"], allocation=allocation), ctx)
            selections.append({(layer, h) for layer, heads in
                               enumerate(outcome.info["pruned_heads_per_layer"]) for h in heads})
            from_cache.append(outcome.info["calibration"]["from_cache"])
        assert selections[0] < selections[1]  # nested, and strictly more at the higher rate
    assert len(calls) == 1 and ctx.cache_hits == 3
    assert from_cache == [False, True, True, True]
    # Another calibration size is another calibration.
    method.apply(copy.deepcopy(random_llama), 0.1,
                 config(calibration_files["text"], n_calibration=2), ctx)
    assert len(calls) == 2


# --------------------------------------------------------------------------- reload


@pytest.mark.parametrize("model_type", ["llama", "llava"])
def test_variant_survives_save_and_reload(tiny, calibration_files, model_type, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    loaded = tiny(model_type)
    outcome = get_method("s4_heads").apply(
        copy.deepcopy(loaded.model), 0.25,
        config(entry_for(loaded, calibration_files), calibration_scale=True,
               residual_transfer=True), make_context(loaded))
    inputs = probe_inputs(loaded, calibration_files)
    got = logits(outcome.model, inputs)
    assert not torch.equal(got, logits(loaded.model, inputs))
    outcome.model.save_pretrained(tmp_path)
    auto = AutoModelForImageTextToText if loaded.family.is_vision_language else \
        AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, inputs), got)


# --------------------------------------------------------------------------- refusals


def test_mamba_is_refused_by_its_family(tiny, calibration_files):
    loaded = tiny("mamba")
    with pytest.raises(ValueError, match="mamba models have no attention heads"):
        get_method("s4_heads").apply(copy.deepcopy(loaded.model), 0.2,
                                     config(calibration_files["text"]), make_context(loaded))


def test_text_calibration_without_context_is_refused(tiny, calibration_files):
    loaded = tiny("qwen3")
    model = copy.deepcopy(loaded.model)
    with pytest.raises(ValueError, match="fields.context"):
        get_method("s4_heads").apply(model, 0.2, config(calibration_files["no_context"]),
                                     make_context(loaded))
    assert model.config._attn_implementation == "sdpa"  # restored after the failure


def test_vlm_calibration_without_images_is_refused(tiny, calibration_files):
    loaded = tiny("llava")
    with pytest.raises(ValueError, match="no calibration sample has an image"):
        get_method("s4_heads").apply(copy.deepcopy(loaded.model), 0.2,
                                     config(calibration_files["text"]), make_context(loaded))


def test_rates_outside_zero_one_are_refused(tiny, calibration_files):
    loaded = tiny("llama")
    for rate in (None, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"rate in \[0, 1\)"):
            get_method("s4_heads").apply(copy.deepcopy(loaded.model), rate,
                                         config(calibration_files["text"]), make_context(loaded))


# --------------------------------------------------------------------------- real model


def wikitext_calibration(shared_data: Path, directory: Path, count: int) -> dict:
    """A question set from consecutive WikiText-2 lines: context = a line, question = the
    next (both cut to a few words so the pair fits aidreams' 128 positions)."""
    lines = [line.strip() for line in
             (shared_data / "wikitext2" / "test.txt").read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("=")]
    records = [{"question": " ".join(lines[i + 1].split()[:8]), "answers": "-",
                "context": " ".join(lines[i].split()[:14])} for i in range(count)]
    path = directory / "wikitext_pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"name": str(path), "format": "question", "fields": {"context": "context"}}


def test_aidreams_uniform_quarter(shared_data, tmp_path):
    from workers.trial import causality_violation, changed_fraction

    loaded = load_model(f"llama2c:{shared_data / 'aidreams260K'}")
    base, family = loaded.model, loaded.family
    entry = wikitext_calibration(shared_data, tmp_path, 8)
    ctx = make_context(loaded)
    outcome = get_method("s4_heads").apply(
        copy.deepcopy(base), 0.25, config(entry, n_calibration=8, residual_transfer=True), ctx)
    variant, info = outcome.model, outcome.info
    assert info["pruned_count_per_layer"] == [1, 1, 1, 1]  # 4 heads per layer, 4 layers
    assert info["calibration"]["samples_used"] == 8
    assert info["saliency"]["min"] < info["saliency"]["max"]
    # Evidence as run_trial computes it: same parameter count, a small changed fraction,
    # different logits, still causal.
    assert sum(p.numel() for p in variant.parameters()) == sum(p.numel()
                                                               for p in base.parameters())
    fraction = changed_fraction(base, variant, {})
    assert 0 < fraction < 0.1
    probe = torch.tensor([[loaded.tokenizer.bos_id,
                           *loaded.tokenizer.encode("The film was released in 2004 .")]])
    assert float((logits(variant, {"input_ids": probe})
                  - logits(base, {"input_ids": probe})).abs().max()) > 1e-4
    assert causality_violation(variant, probe) < 1e-5
    head_dim = family.head_dim(base)
    for index, layer in enumerate(family.decoder_layers(variant)):
        (pruned,) = info["pruned_heads_per_layer"][index]
        assert torch.count_nonzero(o_block(family.attention_output_projection(layer).weight,
                                           pruned, head_dim)) == 0
    # aidreams has one value head per query head: the transfer also moves V rows of the
    # receiving head, exactly when β > 0.
    for t in info["transfers"]:
        v_now = family.attention_projections(family.decoder_layers(variant)[t["layer"]])["v"]
        v_base = family.attention_projections(family.decoder_layers(base)[t["layer"]])["v"]
        rows = slice(t["kept"] * head_dim, (t["kept"] + 1) * head_dim)
        assert torch.equal(v_now.weight[rows], v_base.weight[rows]) == (t["beta"] == 0)
        assert t["v_clipped"] is not None
    assert base.config._attn_implementation == variant.config._attn_implementation
