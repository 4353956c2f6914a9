"""Hub datasets without the network: HF_HUB_OFFLINE=1 (set by tests/conftest.py) refuses an
uncached id with the fix in the message; a local folder in the hub's layout (data files named
by split, read by ``datasets.load_dataset`` like a downloaded repository) is the success path."""

from __future__ import annotations

from pathlib import Path

import pytest
from datafiles import write_jsonl, write_parquet

import workers.data.records as records_module
from workers.data import DatasetError, Sample, check_dataset, load_dataset, resolve
from workers.data.records import check_hub_dataset, read_hub

UNCACHED = "compress-sweep-tests/no-such-dataset-in-any-cache"


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """``datasets`` in offline mode, with its cache in tmp_path (nothing written elsewhere)."""
    datasets = pytest.importorskip("datasets")
    # Never reach the network: offline mode must already be on when datasets was imported.
    assert datasets.config.HF_HUB_OFFLINE, "HF_HUB_OFFLINE=1 must be set before import"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    return datasets


def test_an_uncached_hub_dataset_fails_the_check_naming_hf_hub_offline(offline_datasets):
    entry = {"name": UNCACHED, "source": "hub", "format": "openbookqa", "split": "test"}
    check = check_dataset(entry)
    assert not check.ok
    assert f"hub dataset {UNCACHED!r} (config None, split 'test') cannot be read" in check.message
    assert "HF_HUB_OFFLINE=1 is set: download it first" in check.message
    assert "or unset HF_HUB_OFFLINE" in check.message
    with pytest.raises(DatasetError, match="HF_HUB_OFFLINE=1 is set"):
        check_hub_dataset(resolve(entry))
    with pytest.raises(DatasetError, match=f"hub dataset {UNCACHED!r}.* cannot be read"):
        read_hub(resolve(entry))
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset(entry)


def test_online_the_check_leaves_hub_datasets_to_the_trial(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("the check must not read a hub dataset when online")

    monkeypatch.setattr(records_module, "read_hub", no_reading)
    assert check_dataset({"name": f"hub:{UNCACHED}", "format": "openbookqa"}).ok


def _obqa_repo(root: Path) -> Path:
    """OpenBookQA in the hub's layout: question_stem, choices {text, label}, answerKey."""
    write_jsonl(root / "test.jsonl", [
        {"id": f"o{i}", "question_stem": f"Question {i}?",
         "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]},
         "answerKey": "ABCD"[i % 4]} for i in range(12)])
    return root


def test_hub_layout_openbookqa_offline(offline_datasets, tmp_path):
    repo = _obqa_repo(tmp_path / "obqa")
    entry = {"name": str(repo), "source": "hub", "format": "openbookqa", "split": "test"}
    assert check_dataset(entry) == check_dataset({**entry, "split": None})  # test by default
    assert check_dataset(entry).ok
    data = load_dataset(entry)
    assert data.samples == tuple(
        Sample(id=f"o{i}", question=f"Question {i}?", choices=("w", "x", "y", "z"),
               answer=i % 4) for i in range(12))
    limited = load_dataset({**entry, "limit": 5, "seed": 4})
    assert len(limited) == 5 and set(limited.samples) <= set(data.samples)
    assert limited.samples == load_dataset({**entry, "limit": 5}, seed=4).samples

    wrong_split = check_dataset({**entry, "split": "train"})
    assert not wrong_split.ok
    assert "split 'train') cannot be read" in wrong_split.message
    assert "HF_HUB_OFFLINE" in wrong_split.message


def test_hub_layout_truthfulqa_vqav2_and_wikitext_offline(offline_datasets, tmp_path):
    tqa = tmp_path / "tqa"
    write_parquet(tqa / "data" / "validation-00000-of-00001.parquet", [
        {"question": "Q?", "mc1_targets": {"choices": ["no", "yes"], "labels": [0, 1]}}])
    data = load_dataset({"name": str(tqa), "source": "hub", "format": "truthfulqa_mc",
                         "split": "validation"})
    assert data.samples == (Sample(id="0", question="Q?", choices=("no", "yes"), answer=1),)

    vqa = tmp_path / "vqa"
    write_jsonl(vqa / "validation.jsonl", [
        {"question_id": 5, "question": "Colour?", "image": {"bytes": b"\x89PNG".hex()},
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": n}
                     for n in range(10)]}])
    data = load_dataset({"name": str(vqa), "source": "hub", "format": "vqav2",
                         "split": "validation"})
    assert data.samples[0].answers == ("red",) * 10
    assert data.samples[0].id == "5" and data.has_images

    wiki = tmp_path / "wiki"
    write_parquet(wiki / "test.parquet", [{"text": t} for t in (
        "", " = A = \n", "", " a . \n", " = = Sub = = \n", " b . \n", " = B = \n", " c . \n")])
    data = load_dataset({"name": str(wiki), "source": "hub", "format": "wikitext"})
    # Articles at the top-level headings, every non-blank line kept in order.
    assert [[line for line in doc.split("\n") if line.strip()] for doc in data.documents()] == [
        [" = A = ", " a . ", " = = Sub = = ", " b . "], [" = B = ", " c . "]]
