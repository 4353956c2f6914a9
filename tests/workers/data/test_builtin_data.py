"""``builtin:pydoc``: real text, disjoint held-out splits, identical on every run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workers.data import load_documents
from workers.data.builtin import (
    HELD_OUT_FRACTION,
    MIN_DOCUMENT_CHARS,
    SPLITS,
    pydoc_documents,
    split_summary,
    topic_documents,
    topic_groups,
    topic_splits,
)

ROOT = Path(__file__).resolve().parents[3]


def _ngrams(documents: list[str], n: int = 10) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for document in documents:
        words = document.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def test_every_split_has_documents_and_held_out_splits_are_large() -> None:
    summary = split_summary()
    total = sum(part["characters"] for part in summary.values())
    for split in SPLITS:
        assert summary[split]["documents"] > 0
    for split in ("validation", "test"):
        # Perplexity over fewer characters than this is too noisy to rank methods.
        assert summary[split]["characters"] >= 30_000
        assert summary[split]["characters"] >= HELD_OUT_FRACTION * total * 0.99
    assert summary["train"]["characters"] > 0.7 * total


def test_splits_are_disjoint_by_topic_and_cover_every_topic() -> None:
    from pydoc_data.topics import topics

    names = topic_splits()
    assigned = [name for split in SPLITS for name in names[split]]
    assert len(assigned) == len(set(assigned))
    with_text = {name for name, text in topics.items() if topic_documents(text)}
    assert set(assigned) == with_text


def test_topics_sharing_a_paragraph_share_a_split() -> None:
    from pydoc_data.topics import topics

    split_of = {name: split for split, names in topic_splits().items() for name in names}
    owners: dict[str, set[str]] = {}
    for name in split_of:
        for document in topic_documents(topics[name]):
            owners.setdefault(document, set()).add(split_of[name])
    assert all(len(splits) == 1 for splits in owners.values())
    # pydoc really does repeat itself (e.g. "compound" quotes "for"): the grouping matters.
    assert any(len(group) > 1 for group in topic_groups())


def test_no_held_out_text_is_training_text() -> None:
    train = pydoc_documents("train")
    train_set = set(train)
    train_grams = _ngrams(train)
    for split in ("validation", "test"):
        held_out = pydoc_documents(split)
        assert not train_set & set(held_out)
        grams = _ngrams(held_out)
        # Ten-word runs shared with training text: stock phrases only, no paragraphs.
        assert len(grams & train_grams) < 0.02 * len(grams)


def test_documents_are_normalised_paragraphs() -> None:
    for split in SPLITS:
        documents = pydoc_documents(split)
        assert len(documents) == len(set(documents))
        for document in documents:
            assert len(document) >= MIN_DOCUMENT_CHARS
            assert document == " ".join(document.split())
            # Title underlines ("*****" as a word of its own) are gone.
            assert not re.search(r"(^| )\*{3,}( |$)", document)


def test_topic_documents_splits_at_blank_lines_and_drops_underlines() -> None:
    text = ("Heading\n*******\n\nFirst paragraph of enough words\n  to be kept as a document.\n"
            "\n   \nshort\n\nSecond   paragraph,\tstill long enough to be a document.\n")
    assert topic_documents(text) == [
        "First paragraph of enough words to be kept as a document.",
        "Second paragraph, still long enough to be a document.",
    ]


def test_documents_are_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    code = ("import json\nfrom workers.data.builtin import pydoc_documents\n"
            "print(json.dumps({s: pydoc_documents(s) for s in ('train', 'validation', 'test')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert json.loads(out.stdout) == {split: pydoc_documents(split) for split in SPLITS}


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="validation"):
        pydoc_documents("dev")


def test_load_documents_resolves_builtin_pydoc() -> None:
    assert load_documents("builtin:pydoc", "test") == pydoc_documents("test")
    assert load_documents("builtin:pydoc", "validation", limit=3) == pydoc_documents(
        "validation")[:3]
