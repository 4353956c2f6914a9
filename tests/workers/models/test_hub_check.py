"""Driver-side hub checks under HF_HUB_OFFLINE, against a real cache layout.

The cache is built the way ``huggingface_hub`` lays it out
(``models--ORG--NAME/refs/<ref>`` → commit, ``snapshots/<commit>/<files>``); a
subprocess then loads from it with transformers, so "the check says ok" is shown to
mean "it loads", revision included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_llama

from workers.models import check_model_id, hub_cache_dir

ROOT = Path(__file__).resolve().parents[3]
MAIN_COMMIT = "a" * 40
V1_COMMIT = "b" * 40


def add_to_cache(cache: Path, repo_id: str, commit: str, files_from: Path,
                 refs: tuple[str, ...] = ("main",)) -> None:
    """Put ``files_from``'s files into ``cache`` as snapshot ``commit`` of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files_from.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty hub cache under HF_HOME=tmp."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    assert hub_cache_dir() == cache
    return cache


@pytest.mark.parametrize("model_id,source", [("hub:org/absent", None), ("org/absent", None),
                                             ("org/absent", "hub")])
def test_missing_hub_id_offline_fails_naming_the_fix(offline_cache, model_id, source):
    check = check_model_id(model_id, source)
    assert not check.ok
    assert "org/absent" in check.message and str(offline_cache) in check.message
    assert "hf download org/absent" in check.message
    assert "unset HF_HUB_OFFLINE" in check.message


def test_cached_hub_id_offline_is_ok_at_its_revisions(offline_cache, tmp_path):
    source = tmp_path / "files"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    add_to_cache(offline_cache, "org/present", MAIN_COMMIT, source, refs=("main", "v1"))
    assert check_model_id("hub:org/present").ok
    assert check_model_id("org/present").ok
    assert check_model_id("org/present", revision="v1").ok
    assert check_model_id("org/present", revision=MAIN_COMMIT).ok
    missing = check_model_id("org/present", revision="v2")
    assert not missing.ok
    assert "revision 'v2'" in missing.message and "--revision v2" in missing.message


def test_hub_cache_variables_take_precedence_like_huggingface_hub(offline_cache, monkeypatch,
                                                                  tmp_path):
    elsewhere = tmp_path / "elsewhere"
    source = tmp_path / "files"
    source.mkdir()
    (source / "config.json").write_text("{}")
    add_to_cache(elsewhere, "org/present", MAIN_COMMIT, source)
    assert not check_model_id("org/present").ok  # HF_HOME/hub has nothing
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(elsewhere))
    assert check_model_id("org/present").ok
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert not check_model_id("org/present").ok


def test_online_hub_ids_are_checked_when_they_load(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert check_model_id("org/absent").ok
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")  # the older variable counts too
    assert not check_model_id("org/absent").ok


def test_malformed_hub_id_fails(offline_cache):
    check = check_model_id("hub:not//a valid id")
    assert not check.ok and "valid Hugging Face Hub id" in check.message


def test_cached_checkpoint_loads_offline_at_the_requested_revision(tiny_checkpoint, tmp_path):
    """What the check accepts, transformers loads, and ``revision`` selects the snapshot."""
    cache = tmp_path / "cache"
    add_to_cache(cache, "org/tiny", MAIN_COMMIT, tiny_checkpoint("llama"))
    smaller = build_llama(tmp_path / "smaller", layers=2)
    add_to_cache(cache, "org/tiny", V1_COMMIT, smaller, refs=("v1",))
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    code = (
        "import json\n"
        "from workers.models import check_model_id, load_model\n"
        "out = {}\n"
        "for revision in (None, 'v1'):\n"
        "    assert check_model_id('hub:org/tiny', revision=revision).ok\n"
        "    loaded = load_model('hub:org/tiny', revision=revision, attn_implementation='eager')\n"
        "    out[str(revision)] = [loaded.family.num_layers(loaded.model),\n"
        "                          loaded.model.config._attn_implementation]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "None": [4, "eager"], "v1": [2, "eager"]}
