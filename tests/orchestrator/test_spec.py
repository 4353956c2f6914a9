"""Spec validation (every problem at once, with its YAML path) and grid expansion."""

from __future__ import annotations

import pytest
import yaml

from orchestrator import spec
from orchestrator.errors import SpecError

GOOD = {
    "name": "s",
    "models": [{"id": "builtin:tiny-llama"}],
    "methods": [{"name": "drop_layers", "rates": [0.25, 0.5]},
                {"name": "head_mask", "rates": [0.5], "params": {"scope": "layer"}}],
    "datasets": [{"name": "builtin:pydoc"}],
}


def loads(data) -> spec.SweepSpec:
    return spec.loads(yaml.safe_dump(data, sort_keys=False))


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        loads(data) if not isinstance(data, str) else spec.loads(data)
    assert info.value.exit_code == 2
    return info.value.problems


def test_good_spec_expands_model_major_with_baselines():
    data = dict(GOOD, models=[{"id": "builtin:tiny-llama"},
                              {"id": "builtin:tiny-llama", "dtype": "bfloat16"}])
    trials = spec.expand(loads(data))
    assert len(trials) == 2 * (1 + 3)
    assert [t.method for t in trials[:4]] == ["none", "drop_layers", "drop_layers", "head_mask"]
    assert trials[0].is_baseline and trials[0].rate is None
    assert [t.position for t in trials] == list(range(8))
    assert len({t.trial_key for t in trials}) == 8
    assert spec.grid_size(loads(data)) == 8


def test_trial_keys_are_stable_and_defaults_do_not_change_them():
    a = spec.expand(loads(GOOD))
    explicit = dict(GOOD, methods=[{"name": "drop_layers", "rates": [0.25, 0.5],
                                    "params": {"from": "top"}}, GOOD["methods"][1]])
    b = spec.expand(loads(explicit))
    assert [t.trial_key for t in a] == [t.trial_key for t in b]
    # Known keys: the canonical JSON is part of the contract (stored keys must stay valid),
    # and fields added to the spec since keep them as they were while left at their default.
    legacy_evaluation = {
        "metrics": ["perplexity", "speed"], "batch_size": 8, "max_length": 128, "stride": None,
        "probe_length": 32, "speed": {"warmup": 2, "repeats": 5, "prompt_length": 64,
                                      "new_tokens": 32, "batch_size": 1}}
    assert a[0].trial_key == spec.trial_key(
        {"id": "builtin:tiny-llama", "source": None, "dtype": None, "trust_remote_code": False},
        "none", {}, None, {"name": "builtin:pydoc", "split": None, "limit": None},
        legacy_evaluation, 0)
    assert [t.trial_key for t in a] == [
        "e20e46d38bbb1198341074253540ee357e4c9243e2e411cbe27c8c33f8a8c19b",
        "27d5064a958db4fdce7351cbc23cbdd2caea665fec76b226230977e467a2dfca",
        "f2ba34b3f1c549fda98fb391d32faf62cce2b3920820dc46640f3d62cc3c753b",
        "4d143dddcf9d3352a1b183087556ec6e508daca54315ec1ae2bf5622afcca989"]
    # A later field set to a non-default value does change them.
    templated = dict(GOOD, evaluation={"multiple_choice": {"template": "Q: {question}"}})
    assert {t.trial_key for t in spec.expand(loads(templated))}.isdisjoint(
        {t.trial_key for t in a})
    # Limits and retries decide how a trial is run, not what it measures.
    limited = dict(GOOD, max_attempts=3, trial_timeout_s=60,
                   evaluation=dict(GOOD.get("evaluation", {}), timeout_s=30))
    assert [t.trial_key for t in spec.expand(loads(limited))] == [t.trial_key for t in a]
    changed = spec.expand(loads(dict(GOOD, seed=1)))
    assert {t.trial_key for t in changed}.isdisjoint({t.trial_key for t in a})


def test_three_mistakes_reported_at_once_with_paths():
    data = {
        "name": "s",
        "models": [{"id": "builtin:tiny-llama"}],
        "methods": [{"name": "drop_layer", "rates": [0.5]},
                    {"name": "head_mask", "rates": [1.5]}],
        "datasets": [{"name": "builtin:pydoc", "limt": 3}],
    }
    found = problems(data)
    assert len(found) == 3
    assert any("methods[0].name" in p and "did you mean 'drop_layers'" in p for p in found)
    assert any("methods[1].rates[0]" in p and "outside (0, 1)" in p for p in found)
    assert any("datasets[0].limt" in p and "did you mean 'limit'" in p for p in found)
    assert all(p.startswith("line ") for p in found)


@pytest.mark.parametrize("data,fragment", [
    (dict(GOOD, methods=[{"name": "head_mask", "rates": [0.5], "params": {"scop": "x"}}]),
     "methods[0].params.scop: unknown field (did you mean 'scope'?)"),
    (dict(GOOD, evaluation={"metrics": ["perplexty"]}), "did you mean 'perplexity'"),
    (dict(GOOD, evaluation={"max_length": 16, "stride": 16}), "evaluation.stride"),
    (dict(GOOD, models=[]), "models"),
    (dict(GOOD, datasets=[{"name": "builtin:pydoc"}, {"name": "builtin:pydoc"}]), "duplicate"),
    (dict(GOOD, methods=[{"name": "drop_layers", "rates": [0.5, 0.5]}]), "duplicate rate"),
    (dict(GOOD, score={"quality_metric": "perplexit"}), "did you mean 'perplexity'"),
    (dict(GOOD, models=[{"id": "builtin:nope"}]), "unknown built-in model"),
    (dict(GOOD, datasets=[{"name": "/no/such/file.txt"}]), "does not exist"),
    (dict(GOOD, name="has space"), "name"),
    (dict(GOOD, methods=[{"name": "drop_layers", "rates": [0]}]), "outside (0, 1)"),
])
def test_single_mistakes(data, fragment):
    assert any(fragment in p for p in problems(data)), problems(data)


def test_yaml_syntax_error_names_the_line():
    [message] = problems("name: x\nmodels: [\n")
    assert message.startswith("line ") and "invalid YAML" in message


def test_not_a_mapping():
    assert "mapping" in problems("- a\n- b\n")[0]


def test_too_many_trials():
    data = dict(GOOD, methods=[{"name": "drop_layers",
                                "rates": [i / 20001 for i in range(1, 20001)]}])
    assert "at most" in problems(data)[0]


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        spec.load(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="UTF-8"):
        spec.load(binary)


def test_skip_sources_still_checks_structure():
    data = dict(GOOD, datasets=[{"name": "/no/such/file.txt"}])
    spec.loads(yaml.safe_dump(data), check_sources=False)
    with pytest.raises(SpecError):
        spec.loads(yaml.safe_dump(dict(data, seed="x")), check_sources=False)


def test_model_source_is_explicit(tmp_path):
    as_local = dict(GOOD, models=[{"id": str(tmp_path / "missing"), "source": "local"}])
    assert any("no config.json" in p for p in problems(as_local))
    as_builtin = dict(GOOD, models=[{"id": "tiny-llama", "source": "builtin"}])
    loads(as_builtin)  # the prefix is implied by the source
    unknown = dict(GOOD, models=[{"id": "x", "source": "ftp"}])
    assert any("models[0].source" in p for p in problems(unknown))


def test_qualified_ids():
    from workers.models import qualified_id

    assert qualified_id("tiny-llama", "builtin") == "builtin:tiny-llama"
    assert qualified_id("builtin:tiny-llama", "builtin") == "builtin:tiny-llama"
    assert qualified_id("org/model", "hub") == "hub:org/model"
    assert qualified_id("org/model", None) == "org/model"


def test_model_loading_options():
    data = dict(GOOD, models=[{"id": "builtin:tiny-llama", "attn_implementation": "eager",
                               "device": "cpu"}])
    trials = spec.expand(loads(data))
    assert trials[0].config["model"]["attn_implementation"] == "eager"
    assert {t.trial_key for t in trials}.isdisjoint({t.trial_key for t in spec.expand(
        loads(GOOD))})
    found = problems(dict(GOOD, models=[{"id": "builtin:tiny-llama", "device": "cuda"}],
                          resources={"gpus_per_trial": 0}))
    assert len(found) == 1 and "models[0].device: device cuda needs a GPU" in found[0]
    found = problems(dict(GOOD, models=[{"id": "builtin:tiny-llama", "device": "tpu"}]))
    assert len(found) == 1 and "models[0].device" in found[0]


def test_methods_are_checked_against_model_families(tmp_path):
    import tiny_models  # tests/ is on sys.path

    mamba = tiny_models.BUILDERS["mamba"](tmp_path / "mamba")
    data = dict(GOOD, models=[{"id": f"local:{mamba}"}])
    found = problems(data)
    assert len(found) == 1 and "methods[1].name: method head_mask needs attention heads, " \
        "which models[0] (mamba) does not have" in found[0]
    # Checked without reading sources too (sweep validate --skip-sources).
    with pytest.raises(SpecError):
        spec.loads(yaml.safe_dump(data), check_sources=False)
    # A hub model that cannot be read here is checked as its entry declares it.
    hub = dict(GOOD, models=[{"id": "state-spaces/mamba-130m-hf", "model_type": "mamba"}])
    with pytest.raises(SpecError, match="head_mask needs attention heads"):
        spec.loads(yaml.safe_dump(hub), check_sources=False)
    found = problems(dict(GOOD, models=[{"id": f"local:{mamba}", "model_type": "llama"}]))
    assert any("models[0].model_type: declared 'llama' but the model's config says 'mamba'"
               in p for p in found)
    found = problems(dict(GOOD, models=[{"id": "org/x", "model_type": "gpt2"}]))
    assert any("models[0].model_type: unsupported model type 'gpt2'" in p for p in found)


def test_a_method_without_rates_gives_one_trial():
    from workers.methods import MethodOutcome, NoParams, methods, register_method

    if "test_rateless" not in methods():
        @register_method("test_rateless", config=NoParams, description="a cast (test)",
                         rate_meaning="no rate", uses_rate=False)
        def _rateless(model, rate, params, ctx):
            return MethodOutcome(model=model)

    data = dict(GOOD, methods=[{"name": "test_rateless"}, GOOD["methods"][0]])
    trials = spec.expand(loads(data))
    assert [(t.method, t.rate) for t in trials] == [
        ("none", None), ("test_rateless", None), ("drop_layers", 0.25), ("drop_layers", 0.5)]
    assert spec.grid_size(loads(data)) == 4
    found = problems(dict(GOOD, methods=[{"name": "test_rateless", "rates": [0.5]}]))
    assert len(found) == 1 and "methods[0].rates: method test_rateless takes no rate" in found[0]
    found = problems(dict(GOOD, methods=[{"name": "drop_layers"}]))
    assert len(found) == 1 and "methods[0].rates: required: the rates to sweep" in found[0]


def test_yaml_merge_keys_share_parameters_and_may_be_overridden():
    text = """
name: s
models: [{id: builtin:tiny-llama}]
methods:
  - name: head_mask
    rates: [0.5]
    params: &shared {scope: global, calibration_samples: 4}
  - name: head_mask
    rates: [0.25]
    params: {<<: *shared, scope: layer}
datasets: [{name: builtin:pydoc}]
"""
    trials = spec.expand(spec.loads(text))
    params = [t.params for t in trials if t.method == "head_mask"]
    assert [p["scope"] for p in params] == ["global", "layer"]
    assert {p["calibration_samples"] for p in params} == {4}
    # A key written twice in one mapping is still an error.
    with pytest.raises(SpecError, match="duplicate key 'scope'"):
        spec.loads(text.replace("{<<: *shared, scope: layer}", "{scope: layer, scope: global}"))


def test_a_method_configuration_a_family_cannot_take_is_refused_before_launch(tmp_path):
    import tiny_models  # tests/ is on sys.path

    exaone = tiny_models.BUILDERS["exaone4"](tmp_path / "exaone4")
    pca = {"name": "reduce_hidden", "rates": [0.25], "params": {"basis": "pca"}}
    found = problems(dict(GOOD, models=[{"id": f"local:{exaone}"}], methods=[pca]))
    assert len(found) == 1 and "methods[0].params: models[0] (exaone4): reduce_hidden basis " \
        "'pca' supports the families llama, qwen, not exaone4 (post-norm" in found[0]
    channels = dict(pca, params={"basis": "channels"})
    spec.loads(yaml.safe_dump(dict(GOOD, models=[{"id": f"local:{exaone}"}],
                                   methods=[channels])))
    vlm = dict(GOOD, models=[{"id": "llava-hf/llava-1.5-7b-hf", "model_type": "llava"}],
               methods=[channels])
    with pytest.raises(SpecError, match="does not support vision-language models"):
        spec.loads(yaml.safe_dump(vlm), check_sources=False)


def test_query_head_pruning_needs_grouped_query_attention(tmp_path):
    mha = tmp_path / "mha"
    mha.mkdir()
    (mha / "config.json").write_text('{"model_type": "llama", "num_attention_heads": 4, '
                                     '"num_key_value_heads": 4}')
    method = {"name": "prune_heads", "rates": [0.5], "params": {"groups": "query_heads"}}
    found = problems(dict(GOOD, models=[{"id": str(mha)}], methods=[method]))
    assert len(found) == 1 and "methods[0].params: models[0] (llama): groups query_heads" \
        in found[0] and "use groups: kv_groups" in found[0]
    kv = dict(method, params={"groups": "kv_groups"})
    spec.loads(yaml.safe_dump(dict(GOOD, models=[{"id": str(mha)}], methods=[kv])),
               check_sources=False)
    gqa = tmp_path / "gqa"
    gqa.mkdir()
    (gqa / "config.json").write_text('{"model_type": "llava", "text_config": '
                                     '{"num_attention_heads": 8, "num_key_value_heads": 2}}')
    spec.loads(yaml.safe_dump(dict(GOOD, models=[{"id": str(gqa)}], methods=[method])),
               check_sources=False)
