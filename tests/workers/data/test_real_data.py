"""The dataset layer on real files in ../shared/data (OpenBookQA, TruthfulQA, WikiText-2),
checked against a straightforward independent reading of the same files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from workers.data import check_dataset, load_dataset


def _openbookqa(shared_data: Path) -> tuple[Path, list[dict]]:
    path = shared_data / "openbookqa" / "openbookqa.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")
    return path, [json.loads(line) for line in lines if line.strip()]


def _wikitext(shared_data: Path) -> tuple[Path, list[str]]:
    path = shared_data / "wikitext2" / "test.txt"
    return path, path.read_text(encoding="utf-8").split("\n")


def _is_article_heading(line: str) -> bool:
    # " = Title = ", but not " = = Section = = " and not a table cell like " = National record "
    body = line.strip()
    return (line.startswith(" = ") and line.endswith(" = ") and body.startswith("= ")
            and not body.startswith("= =") and body.endswith(" ="))


@pytest.mark.parametrize("fmt", ["openbookqa", "arc"])
def test_openbookqa_every_record_as_a_sample(shared_data, fmt):
    path, records = _openbookqa(shared_data)
    data = load_dataset({"name": str(path), "format": fmt})
    assert data.kind == "multiple_choice" and data.format == fmt
    assert len(data) == len(records) == 500
    for sample, record in zip(data.samples, records, strict=True):
        choices = record["question"]["choices"]
        labels = [c["label"] for c in choices]
        assert sample.id == record["id"]
        assert sample.question == record["question"]["stem"]
        assert sample.choices == tuple(c["text"] for c in choices)
        assert sample.answer == labels.index(record["answerKey"])
        assert sample.context is None and sample.image is None
    assert not data.has_images
    # Not all answers are the same letter: the label → index mapping really varies.
    assert len({s.answer for s in data.samples}) == 4


def test_openbookqa_generic_multiple_choice_with_dotted_fields_gives_the_same_samples(
        shared_data):
    path, _ = _openbookqa(shared_data)
    generic = load_dataset({
        "name": str(path), "format": "multiple_choice",
        "fields": {"question": "question.stem", "choices": "question.choices",
                   "answer": "answerKey"}})
    named = load_dataset({"name": str(path), "format": "openbookqa"})
    assert generic.samples == named.samples
    assert generic.format == "multiple_choice"


def test_openbookqa_limit_draws_the_same_subset_for_the_same_seed(shared_data):
    path, records = _openbookqa(shared_data)
    entry = {"name": str(path), "format": "openbookqa", "limit": 50}
    first = load_dataset(entry, seed=1)
    assert load_dataset(entry, seed=1).samples == first.samples
    other = load_dataset(entry, seed=2)
    assert len(first) == len(other) == 50
    assert [s.id for s in first.samples] != [s.id for s in other.samples]
    # Kept in file order.
    position = {r["id"]: i for i, r in enumerate(records)}
    assert [position[s.id] for s in first.samples] == sorted(position[s.id] for s in first.samples)


def test_openbookqa_checks_ok(shared_data):
    path, _ = _openbookqa(shared_data)
    assert check_dataset({"name": str(path), "format": "openbookqa"}).ok


def test_truthfulqa_best_answer_first_then_the_incorrect_answers(shared_data):
    path = shared_data / "truthfulqa" / "TruthfulQA.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    data = load_dataset({"name": str(path), "format": "truthfulqa_mc"})
    assert data.kind == "multiple_choice"
    assert len(data) == len(rows) == 817
    for sample, row in zip(data.samples, rows, strict=True):
        incorrect = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
        assert sample.question == row["Question"]
        assert sample.choices == (row["Best Answer"].strip(), *incorrect)
        assert sample.answer == 0
        assert len(sample.choices) >= 2
    assert check_dataset({"name": str(path), "format": "truthfulqa_mc"}).ok


def test_wikitext_as_text_is_one_document_per_non_empty_line(shared_data):
    path, lines = _wikitext(shared_data)
    data = load_dataset({"name": str(path)})  # .txt: format text is inferred
    assert data.kind == "text" and data.format == "text"
    assert data.documents() == [line for line in lines if line.strip()]
    limited = load_dataset({"name": str(path), "limit": 25})
    assert limited.documents() == data.documents()[:25]


def test_wikitext_articles_start_at_their_headings_and_keep_every_line(shared_data):
    path, lines = _wikitext(shared_data)
    headings = [line for line in lines if _is_article_heading(line)]
    data = load_dataset({"name": str(path), "format": "wikitext"})
    documents = data.documents()
    assert data.format == "wikitext" and data.kind == "text"
    assert len(headings) > 50
    assert len(documents) == len(headings)
    for document, heading in zip(documents, headings, strict=True):
        first, *rest = document.split("\n")
        assert first == heading
        assert not any(_is_article_heading(line) for line in rest)
    article_lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    assert article_lines == [line for line in lines if line.strip()]
    # limit keeps the first articles, in order.
    assert load_dataset({"name": str(path), "format": "wikitext",
                         "limit": 3}).documents() == documents[:3]
