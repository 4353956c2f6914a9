"""Dataset entries of a spec: formats, fields, per-dataset evaluators, and what evaluators
can score, all refused at validation with the entry's path and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import spec
from orchestrator.errors import SpecError

BASE = {"name": "s", "models": [{"id": "builtin:tiny-llama"}],
        "methods": [{"name": "drop_layers", "rates": [0.5]}]}


@pytest.fixture
def mc_file(tmp_path: Path) -> str:
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(
        {"q": f"question {i}?", "options": ["yes", "no", "maybe"], "label": i % 3})
        for i in range(5)) + "\n")
    return str(path)


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec.loads(yaml.safe_dump(data, sort_keys=False))
    assert info.value.exit_code == 2
    return info.value.problems


def test_a_multiple_choice_dataset_with_its_own_evaluators_expands(mc_file: str):
    entry = {"name": mc_file, "format": "multiple_choice",
             "fields": {"question": "q", "choices": "options", "answer": "label"},
             "metrics": ["multiple_choice", "speed"], "limit": 3}
    loaded = spec.loads(yaml.safe_dump(dict(BASE, datasets=[{"name": "builtin:pydoc"}, entry])))
    trials = spec.expand(loaded)
    mc_trials = [t for t in trials if t.dataset == mc_file]
    assert len(mc_trials) == 2
    assert mc_trials[0].config["dataset"]["metrics"] == ["multiple_choice", "speed"]
    assert mc_trials[0].config["dataset"]["fields"] == entry["fields"]


def test_an_evaluator_that_cannot_score_the_dataset_is_refused_with_the_fix(mc_file: str):
    entry = {"name": mc_file, "format": "multiple_choice",
             "fields": {"question": "q", "choices": "options", "answer": "label"}}
    found = problems(dict(BASE, datasets=[entry]))
    assert len(found) == 1
    assert "datasets[0]" in found[0] and "evaluator perplexity cannot score multiple_choice" \
        in found[0] and "set this dataset's metrics" in found[0] and "multiple_choice" in found[0]
    # Named metrics point at the offending one.
    found = problems(dict(BASE, datasets=[dict(entry, metrics=["speed", "perplexity"])]))
    assert len(found) == 1 and "datasets[0].metrics[1]" in found[0]
    # And the other way round: multiple_choice on running text.
    found = problems(dict(BASE, datasets=[{"name": "builtin:pydoc"}],
                          evaluation={"metrics": ["multiple_choice"]}))
    assert len(found) == 1 and "cannot score text samples" in found[0]


@pytest.mark.parametrize("entry,fragment", [
    ({"name": "builtin:pydoc", "format": "txt"},
     "datasets[0].format: unknown dataset format 'txt' (did you mean 'text'?)"),
    ({"name": "x.jsonl", "format": "multiple_choice", "fields": {"questoin": "q"}},
     "datasets[0].fields.questoin: unknown key 'questoin' (did you mean 'question'?)"),
    ({"name": "x.jsonl", "format": "arc", "fields": {"question": "q"}},
     "format arc has a fixed layout and takes no fields"),
    ({"name": "builtin:pydoc", "metrics": ["perplexty"]},
     "datasets[0].metrics[0]: unknown evaluator 'perplexty' (did you mean 'perplexity'?)"),
    ({"name": "builtin:pydoc", "metrics": ["perplexity", "perplexity"]},
     "datasets[0].metrics[1]: duplicate evaluator 'perplexity'"),
    ({"name": "builtin:pydoc", "metrics": []}, "datasets[0].metrics"),
    ({"name": "builtin:pydoc", "source": "web"}, "datasets[0].source"),
])
def test_entry_mistakes_are_located(entry: dict, fragment: str):
    found = problems(dict(BASE, datasets=[entry]))
    assert any(fragment in p for p in found), found


def test_records_are_read_at_validation(tmp_path: Path, mc_file: str):
    """A broken record is a validation error (exit 2), not a failed trial later."""
    entry = {"name": mc_file, "format": "multiple_choice", "metrics": ["multiple_choice"]}
    found = problems(dict(BASE, datasets=[entry]))
    assert len(found) == 1 and "datasets[0].name" in found[0]
    assert "has no 'question' for the question; set fields.question" in found[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{oops\n')
    found = problems(dict(BASE, datasets=[{"name": str(bad), "format": "multiple_choice",
                                           "metrics": ["multiple_choice"]}]))
    assert len(found) == 1 and "line 2 is not JSON" in found[0]
    found = problems(dict(BASE, datasets=[{"name": str(tmp_path / "data.jsonl")}]))
    assert len(found) == 1 and "set format" in found[0]


def test_new_dataset_fields_left_at_default_keep_trial_keys(mc_file: str):
    plain = spec.expand(spec.loads(yaml.safe_dump(dict(BASE,
                                                       datasets=[{"name": "builtin:pydoc"}]))))
    spelled = spec.expand(spec.loads(yaml.safe_dump(dict(
        BASE, datasets=[{"name": "builtin:pydoc", "fields": {}, "seed": None,
                         "metrics": None}]))))
    assert [t.trial_key for t in plain] == [t.trial_key for t in spelled]
    subset = spec.expand(spec.loads(yaml.safe_dump(dict(
        BASE, datasets=[{"name": "builtin:pydoc", "seed": 7}]))))
    assert {t.trial_key for t in subset}.isdisjoint({t.trial_key for t in plain})


@pytest.fixture
def image_questions(tmp_path: Path) -> str:
    (tmp_path / "q.png").write_bytes(b"not decoded at validation")
    path = tmp_path / "sqa.jsonl"
    path.write_text(json.dumps({"question": "Which?", "choices": ["a", "b"], "answer": 0,
                                "hint": "", "image": "q.png"}) + "\n")
    return str(path)


def test_image_questions_need_a_vision_language_model(image_questions: str, tmp_path: Path):
    entry = {"name": image_questions, "format": "scienceqa", "metrics": ["multiple_choice"]}
    found = problems(dict(BASE, datasets=[entry]))
    assert len(found) == 1 and "datasets[0]" in found[0]
    assert "needs a vision-language model; models[0] is a llama model" in found[0]
    found = problems(dict(BASE, datasets=[dict(entry, metrics=["modality_dominance"])]))
    assert len(found) == 1 and "modality_dominance needs a vision-language model" in found[0]
    # Text evaluators ask no image question: speed on image questions is fine.
    spec.loads(yaml.safe_dump(dict(BASE, datasets=[dict(entry, metrics=["speed"])])))


def test_modality_dominance_needs_images_and_a_supported_model_type(mc_file: str, tmp_path):
    import tiny_models  # tests/ is on sys.path

    llava = tiny_models.BUILDERS["llava"](tmp_path / "llava")
    entry = {"name": mc_file, "format": "multiple_choice", "metrics": ["modality_dominance"],
             "fields": {"question": "q", "choices": "options", "answer": "label"}}
    found = problems(dict(BASE, models=[{"id": f"local:{llava}"}], datasets=[entry]))
    assert len(found) == 1 and "needs image questions and this dataset has none" in found[0]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "gpt_bigcode"}')
    found = problems(dict(BASE, models=[{"id": str(odd)}], datasets=[{"name": "builtin:pydoc"}]))
    assert len(found) == 1 and "models[0].id: unsupported model type 'gpt_bigcode'" in found[0]


@pytest.mark.parametrize("section", ["multiple_choice", "generation", "modality_dominance"])
def test_prompt_templates_name_only_known_placeholders(section: str):
    found = problems(dict(BASE, datasets=[{"name": "builtin:pydoc"}],
                          evaluation={section: {"template": "Q: {questoin}"}}))
    assert len(found) == 1
    assert found[0].endswith(f"evaluation.{section}.template: unknown placeholder {{questoin}}; "
                             "use {question}, {context}, {prompt}")
    found = problems(dict(BASE, datasets=[{"name": "builtin:pydoc"}],
                          evaluation={section: {"template": "{ broken"}}))
    assert len(found) == 1 and "not a valid template" in found[0]
    ok = dict(BASE, datasets=[{"name": "builtin:pydoc"}],
              evaluation={section: {"template": "{context}\nQ: {question} {{A}}:"}})
    spec.loads(yaml.safe_dump(ok))


def test_a_method_s_calibration_data_is_checked_before_launch(tmp_path: Path, mc_file: str):
    missing = {"name": "s4_heads", "rates": [0.1],
               "params": {"calibration": {"name": str(tmp_path / "nope.jsonl"),
                                          "format": "scienceqa"}}}
    found = problems(dict(BASE, methods=[missing], datasets=[{"name": "builtin:pydoc"}]))
    assert len(found) == 1 and "methods[0].params.calibration.name" in found[0]
    assert "does not exist" in found[0]
    present = dict(missing, params={"calibration": {
        "name": mc_file, "format": "multiple_choice",
        "fields": {"question": "q", "choices": "options", "answer": "label"}}})
    spec.loads(yaml.safe_dump(dict(BASE, methods=[present], datasets=[{"name": "builtin:pydoc"}])))
