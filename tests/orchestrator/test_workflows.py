"""CPU twins of the users' workflows (../shared/SEEDS.md), end to end through sweep launch:
real local Ray Tune, SQLite, tiny models of their families, data in their formats.

- LLaVA × ScienceQA-format image questions × multiple_choice (with head_mask and
  drop_layers on the language model);
- Qwen2.5-VL × MMMU-Pro-format × modality_dominance (MDI/AEI per band);
- aidreams260K (real llama2.c model) × WikiText-2 × perplexity;
- Mamba × text × perplexity and speed;
- aidreams260K × OpenBookQA × multiple_choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models  # tests/ is on sys.path (rootdir conftest)
import yaml
from sqlalchemy import select

from orchestrator import launch, spec
from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.models import Sweep, Trial

pytestmark = pytest.mark.slow

FAST_SPEED = {"warmup": 0, "repeats": 1, "prompt_length": 8, "new_tokens": 2, "prompts": 2}


def run_sweep(tmp_path: Path, data: dict) -> dict[str, dict]:
    """Launch ``data`` as a spec; {method@rate: {status, metrics, evidence}} per trial."""
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    url = f"sqlite:///{tmp_path / 'results.db'}"
    outcome = launch.run(launch.plan(spec.load(path), str(path), url), url)
    assert outcome.ran == outcome.total
    engine = ensure_schema(url, create=False)
    out = {}
    with session_scope(engine) as session:
        for trial in session.scalars(select(Trial).join(Sweep).where(Sweep.name == data["name"])):
            label = trial.method if trial.rate is None else f"{trial.method}@{trial.rate:g}"
            if (trial.params or {}).get("allocation"):
                label += f"/{trial.params['allocation']}"
            out[label] = {
                "status": trial.status, "error": trial.error_message,
                "metrics": {m.name: m.value for m in trial.metrics},
                "evidence": trial.evidence.max_abs_dlogits if trial.evidence else None,
            }
    return out


def assert_all_done(results: dict[str, dict]) -> None:
    failed = {k: v["error"] for k, v in results.items() if v["status"] != "done"}
    assert not failed, failed
    for label, row in results.items():
        if label != "none":
            assert row["evidence"] and row["evidence"] > 0, label  # the variant differs


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflows")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        tiny_models.probe_image(seed=i).save(images / f"q{i}.png")
    scienceqa = [
        {"question": "Which of these is a mammal?", "choices": ["shark", "whale", "trout"],
         "answer": 1, "hint": "Mammals feed their young milk.", "image": "q0.png"},
        {"question": "Which direction is the arrow?", "choices": ["left", "right"],
         "answer": 0, "hint": "", "image": "q1.png"},
        {"question": "What is two plus two?", "choices": ["three", "four"], "answer": 1,
         "hint": "", "image": None},  # ScienceQA has text-only questions too
    ]
    (root / "scienceqa.jsonl").write_text("\n".join(json.dumps(r) for r in scienceqa) + "\n")
    mmmu = [{"id": f"m{i}", "question": q, "options": str(["A one", "A two", "A three"]),
             "answer": "B", "image_1": f"images/q{i}.png"}
            for i, q in enumerate(["<image 1> What is shown?", "<image 1> Which part is red?"])]
    (root / "mmmu_pro.jsonl").write_text("\n".join(json.dumps(r) for r in mmmu) + "\n")
    (root / "text.txt").write_text("\n".join(
        f"Line {i} of a small text about state space models and their scan order."
        for i in range(12)) + "\n")
    return {"root": root, "llava": tiny_models.BUILDERS["llava"](root / "llava"),
            "qwen2_5_vl": tiny_models.BUILDERS["qwen2_5_vl"](root / "qwen2_5_vl"),
            "mamba": tiny_models.BUILDERS["mamba"](root / "mamba")}


def test_llava_scienceqa_multiple_choice(tmp_path, ray_session, fixtures):
    results = run_sweep(tmp_path, {
        "name": "s4-twin", "models": [{"id": f"local:{fixtures['llava']}"}],
        "methods": [{"name": "head_mask", "rates": [0.5], "params": {"calibration_samples": 2,
                                                                     "calibration_length": 16}},
                    {"name": "drop_layers", "rates": [0.34]}],
        "datasets": [{"name": str(fixtures["root"] / "scienceqa.jsonl"), "format": "scienceqa",
                      "images": str(fixtures["root"] / "images"),
                      "metrics": ["multiple_choice", "speed"]}],
        "evaluation": {"speed": FAST_SPEED, "probe_length": 8},
    })
    assert set(results) == {"none", "head_mask@0.5", "drop_layers@0.34"}
    assert_all_done(results)
    for row in results.values():
        assert row["metrics"]["mc_samples"] == 3
        assert 0 <= row["metrics"]["acc"] <= 1 and "latency_ms_p50" in row["metrics"]


def test_qwen_vl_mmmu_pro_modality_dominance(tmp_path, ray_session, fixtures):
    results = run_sweep(tmp_path, {
        "name": "langoverrule-twin", "models": [{"id": f"local:{fixtures['qwen2_5_vl']}"}],
        "methods": [{"name": "head_mask", "rates": [0.5], "params": {"calibration_samples": 2,
                                                                     "calibration_length": 16}}],
        "datasets": [{"name": str(fixtures["root"] / "mmmu_pro.jsonl"), "format": "mmmu_pro",
                      "metrics": ["modality_dominance", "multiple_choice"]}],
        "evaluation": {"probe_length": 8, "modality_dominance": {"new_tokens": 2}},
    })
    assert_all_done(results)
    for row in results.values():
        metrics = row["metrics"]
        assert metrics["md_samples"] == 2 and metrics["md_generated_tokens"] == 4
        for band in ("early", "middle", "late"):
            assert metrics[f"mdi_{band}"] > 0 and metrics[f"aei_{band}_pooled"] > 0
    assert results["head_mask@0.5"]["metrics"]["mdi_late"] != pytest.approx(
        results["none"]["metrics"]["mdi_late"])


def test_mamba_text_perplexity_and_speed(tmp_path, ray_session, fixtures):
    results = run_sweep(tmp_path, {
        "name": "mamba-twin", "models": [{"id": f"local:{fixtures['mamba']}"}],
        "methods": [{"name": "drop_layers", "rates": [0.5], "params": {"from": "bottom"}}],
        "datasets": [{"name": str(fixtures["root"] / "text.txt")}],
        "evaluation": {"max_length": 32, "stride": 16, "probe_length": 8, "speed": FAST_SPEED},
    })
    assert_all_done(results)
    assert results["drop_layers@0.5"]["metrics"]["perplexity"] != pytest.approx(
        results["none"]["metrics"]["perplexity"])


def test_aidreams_wikitext_perplexity_and_openbookqa(tmp_path, ray_session, shared_data):
    model = f"llama2c:{shared_data / 'aidreams260K'}"
    results = run_sweep(tmp_path, {
        "name": "aidreams-twin", "models": [{"id": model}],
        "methods": [{"name": "drop_layers", "rates": [0.25]}],
        "datasets": [
            {"name": str(shared_data / "wikitext2" / "test.txt"), "format": "wikitext",
             "limit": 3, "metrics": ["perplexity"]},
        ],
        "evaluation": {"max_length": 128, "stride": 64, "probe_length": 16},
    })
    assert_all_done(results)
    # The README's figure: hundreds on out-of-domain WikiText.
    assert 50 < results["none"]["metrics"]["perplexity"] < 5000
    results = run_sweep(tmp_path, {
        "name": "obqa-twin", "models": [{"id": model}],
        "methods": [{"name": "drop_layers", "rates": [0.25]}],
        "datasets": [{"name": str(shared_data / "openbookqa" / "openbookqa.jsonl"),
                      "format": "openbookqa", "limit": 40, "metrics": ["multiple_choice"]}],
        "evaluation": {"probe_length": 16},
    })
    assert_all_done(results)
    assert results["none"]["metrics"]["mc_samples"] == 40


def test_relative_paths_in_a_spec_mean_the_launch_directory(tmp_path, ray_session, fixtures,
                                                            monkeypatch):
    """Tune runs each trial in its own directory; the spec's relative dataset, image and
    model paths must still resolve from where `sweep launch` ran."""
    root = fixtures["root"]
    monkeypatch.chdir(root)
    results = run_sweep(tmp_path, {
        "name": "relative", "models": [{"id": "./mamba"}],
        "methods": [{"name": "drop_layers", "rates": [0.5]}],
        "datasets": [{"name": "text.txt", "metrics": ["perplexity"]}],
        "evaluation": {"max_length": 32, "stride": 16, "probe_length": 8},
    })
    assert_all_done(results)


def test_s4_rates_twin_llava_scienceqa(tmp_path, ray_session, fixtures):
    """sweeps/s4_rates.yaml on a tiny LLaVA: three allocations, calibrated once each."""
    root = fixtures["root"]
    shared = {"calibration": {"name": str(root / "scienceqa.jsonl"), "format": "scienceqa",
                              "images": str(root / "images")},
              "n_calibration": 2, "gamma": 0.4}
    results = run_sweep(tmp_path, {
        "name": "s4-twin-rates", "models": [{"id": f"local:{fixtures['llava']}"}],
        "methods": [
            {"name": "s4_heads", "rates": [0.25, 0.5], "params": dict(shared,
                                                                    allocation="uniform")},
            {"name": "s4_heads", "rates": [0.25], "params": dict(shared, allocation="adaptive")},
            {"name": "s4_heads", "rates": [0.25], "params": dict(
                shared, allocation="early_skip", protected_layers=1, late_start=2)},
        ],
        "datasets": [{"name": str(root / "scienceqa.jsonl"), "format": "scienceqa",
                      "images": str(root / "images"), "metrics": ["multiple_choice"]}],
        "evaluation": {"probe_length": 8},
        "max_concurrent_trials": 1,
    })
    assert_all_done(results)
    assert set(results) == {"none", "s4_heads@0.25/uniform", "s4_heads@0.5/uniform",
                            "s4_heads@0.25/adaptive", "s4_heads@0.25/early_skip"}


def test_mamba_scan_twin_is_invalid_not_better(tmp_path, ray_session, fixtures):
    """sweeps/mamba_scan.yaml on a tiny Mamba: the reordered variant is recorded as an
    invalid evaluation (it sees future tokens), the layer-dropped one is measured."""
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump({
        "name": "scan-twin", "models": [{"id": f"local:{fixtures['mamba']}"}],
        "methods": [{"name": "mamba_scan_order", "params": {"length": 32}},
                    {"name": "drop_layers", "rates": [0.5]}],
        "datasets": [{"name": str(fixtures["root"] / "text.txt"), "metrics": ["perplexity"]}],
        "evaluation": {"max_length": 32, "stride": 16, "probe_length": 16},
    }))
    url = f"sqlite:///{tmp_path / 'scan.db'}"
    launch.run(launch.plan(spec.load(path), str(path), url), url)
    engine = ensure_schema(url, create=False)
    with session_scope(engine) as session:
        rows = {t.method: (t.status, t.failure_reason, {m.name for m in t.metrics})
                for t in session.scalars(select(Trial))}
    assert rows["mamba_scan_order"][:2] == ("failed", "invalid_evaluation")
    assert "perplexity" not in rows["mamba_scan_order"][2]
    assert rows["drop_layers"][0] == rows["none"][0] == "done"


def test_exaone_lightweight_twin(tmp_path, ray_session, fixtures):
    """sweeps/exaone_lightweight.yaml on a tiny EXAONE 4: drop layers, prune heads, reduce
    the hidden size (channels basis: post-norm), cast; scored against the baseline."""
    exaone = tiny_models.BUILDERS["exaone4"](fixtures["root"] / "exaone4")
    text = {"calibration_samples": 2, "calibration_length": 32}
    results = run_sweep(tmp_path, {
        "name": "exaone-twin", "models": [{"id": f"local:{exaone}"}],
        "methods": [
            {"name": "drop_layers", "rates": [0.25], "params": {"from": "top"}},
            {"name": "prune_heads", "rates": [0.5], "params": dict(text, groups="query_heads")},
            {"name": "reduce_hidden", "rates": [0.25], "params": dict(text, basis="channels")},
            {"name": "cast", "params": {"dtype": "bfloat16"}},
        ],
        "datasets": [{"name": str(fixtures["root"] / "text.txt")}],
        "evaluation": {"max_length": 32, "stride": 16, "probe_length": 8, "speed": FAST_SPEED},
        "score": {"quality_metric": "perplexity", "weight": 0.5},
    })
    assert_all_done(results)
    base = results["none"]["metrics"]["params"]
    for label in ("drop_layers@0.25", "prune_heads@0.5", "reduce_hidden@0.25"):
        assert results[label]["metrics"]["params"] < base, label
