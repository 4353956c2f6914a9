"""Every dataset format and file type on small generated files: what each record becomes."""

from __future__ import annotations

from pathlib import Path

import pytest
from datafiles import write_csv, write_image, write_json, write_jsonl, write_parquet

import workers.data as data_module
from workers.data import (
    Dataset,
    DatasetError,
    Sample,
    check_dataset,
    dataset_kind,
    formats,
    load_dataset,
    register_format,
    resolve,
    token_stream,
)

MC_RECORDS = [
    {"id": "q0", "question": "Which is a fruit?", "choices": ["stone", "apple", "chair"],
     "answer": 1},
    {"id": "q1", "question": "What colour is the sky?", "choices": ["blue", "green"], "answer": 0},
    {"id": "q2", "question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1,
     "context": "Arithmetic."},
]
MC_SAMPLES = (
    Sample(id="q0", question="Which is a fruit?", choices=("stone", "apple", "chair"), answer=1),
    Sample(id="q1", question="What colour is the sky?", choices=("blue", "green"), answer=0),
    Sample(id="q2", question="2 + 2 = ?", choices=("3", "4", "5", "6"), answer=1,
           context="Arithmetic."),
)


def _mc_jsonl(path: Path) -> Path:
    return write_jsonl(path / "mc.jsonl", MC_RECORDS)


def _mc_json_list(path: Path) -> Path:
    return write_json(path / "mc.json", MC_RECORDS)


def _mc_json_data(path: Path) -> Path:
    return write_json(path / "mc.json", {"version": 2, "data": MC_RECORDS})


def _mc_json_rows(path: Path) -> Path:
    return write_json(path / "mc.json", {"rows": MC_RECORDS})


def _mc_parquet(path: Path) -> Path:
    return write_parquet(path / "mc.parquet", MC_RECORDS)


def _mc_csv(path: Path) -> Path:
    # Every CSV value is a string: choices as the text of a Python list, answer as a digit.
    return write_csv(path / "mc.csv", ["id", "question", "choices", "answer", "context"],
                     [[r["id"], r["question"], repr(r["choices"]), str(r["answer"]),
                       r.get("context", "")] for r in MC_RECORDS])


@pytest.mark.parametrize("write", [_mc_jsonl, _mc_json_list, _mc_json_data, _mc_json_rows,
                                   _mc_parquet, _mc_csv])
def test_generic_multiple_choice_reads_the_same_samples_from_every_file_type(tmp_path, write):
    path = write(tmp_path)
    entry = {"name": str(path), "format": "multiple_choice", "fields": {"context": "context"}}
    data = load_dataset(entry)
    assert (data.kind, data.format, data.name) == ("multiple_choice", "multiple_choice",
                                                   str(path))
    assert data.samples == MC_SAMPLES
    assert check_dataset(entry).ok


def test_local_prefix_and_relative_paths_name_local_files(tmp_path, monkeypatch):
    _mc_jsonl(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in ("mc.jsonl", "local:mc.jsonl", "./mc.jsonl"):
        data = load_dataset({"name": name, "format": "multiple_choice"})
        assert [s.id for s in data.samples] == ["q0", "q1", "q2"]
        assert resolve({"name": name, "format": "multiple_choice"}).source == "local"


# --------------------------------------------------------------------------- text


def test_text_records_with_a_dotted_text_field_drop_blank_texts(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"doc": {"body": "First document."}}, {"doc": {"body": "   "}},
        {"doc": {"body": "Third document."}}])
    data = load_dataset({"name": str(path), "format": "text", "fields": {"text": "doc.body"}})
    assert data.documents() == ["First document.", "Third document."]
    assert [s.id for s in data.samples] == ["0", "2"]  # the record's number in the file


def test_text_csv_column(tmp_path):
    path = write_csv(tmp_path / "docs.csv", ["title", "text"],
                     [["a", "Alpha, with a comma."], ["b", "Beta\nover two lines."]])
    data = load_dataset({"name": str(path), "format": "text"})
    assert data.documents() == ["Alpha, with a comma.", "Beta\nover two lines."]


def test_text_file_is_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \n second line \nthird\n", encoding="utf-8")
    data = load_dataset({"name": str(path)})
    assert data.format == "text"
    assert data.documents() == ["first line", " second line ", "third"]


WIKI_TEXT = (" \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n"
             " \n = Beta = \n \n Beta @-@ two <unk> . \n \n")


def test_wikitext_file_is_split_into_articles_at_top_level_headings(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("Preamble before any heading\n" + WIKI_TEXT, encoding="utf-8")
    data = load_dataset({"name": str(path), "format": "wikitext"})
    assert data.format == "wikitext"
    assert data.documents() == [
        "Preamble before any heading",
        " = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . ",
        " = Beta = \n \n Beta @-@ two <unk> . ",
    ]


def test_wikitext_hub_style_line_records_become_the_same_articles(tmp_path):
    # The hub's wikitext: one record per line, each with its newline.
    lines = WIKI_TEXT.split("\n")[:-1]
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"text": line + "\n"} for line in lines])
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKI_TEXT, encoding="utf-8")
    from_records = load_dataset({"name": str(path), "format": "wikitext"})
    assert from_records.documents() == load_dataset({"name": str(txt),
                                                     "format": "wikitext"}).documents()
    assert len(from_records) == 2


# --------------------------------------------------------------------------- multiple choice


def test_arc_labels_and_the_hub_layout(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [
        # ARC's numeric labels: answerKey "3" is the third choice, not index 3.
        {"id": "a", "question": {"stem": "Numbered?", "choices": [
            {"text": t, "label": str(n)} for n, t in enumerate(["w", "x", "y", "z"], 1)]},
         "answerKey": "3"},
        # The hub's ai2_arc layout: question text, choices {text: [...], label: [...]}.
        {"id": "b", "question": "Hub ARC?", "choices": {"text": ["p", "q", "r"],
                                                        "label": ["A", "B", "C"]},
         "answerKey": "C"},
        # The hub's OpenBookQA layout: question_stem.
        {"id": "c", "question_stem": "Hub OBQA?", "choices": {"text": ["m", "n"],
                                                               "label": ["A", "B"]},
         "answerKey": "A"},
    ])
    data = load_dataset({"name": str(path), "format": "arc"})
    assert data.samples == (
        Sample(id="a", question="Numbered?", choices=("w", "x", "y", "z"), answer=2),
        Sample(id="b", question="Hub ARC?", choices=("p", "q", "r"), answer=2),
        Sample(id="c", question="Hub OBQA?", choices=("m", "n"), answer=0),
    )
    assert load_dataset({"name": str(path), "format": "openbookqa"}).samples == data.samples


def test_truthfulqa_csv_and_hub_mc1_targets(tmp_path):
    csv_path = write_csv(tmp_path / "tqa.csv",
                         ["Type", "Question", "Best Answer", "Correct Answers",
                          "Incorrect Answers"],
                         [["Adversarial", "Is the moon cheese?", " No, it is rock ",
                           "No; It is rock", "Yes; It is Brie;  ; Only on Tuesdays"]])
    data = load_dataset({"name": str(csv_path), "format": "truthfulqa_mc"})
    assert data.samples == (Sample(id="0", question="Is the moon cheese?", choices=(
        "No, it is rock", "Yes", "It is Brie", "Only on Tuesdays"), answer=0),)

    hub_path = write_jsonl(tmp_path / "tqa.jsonl", [
        {"question": "Hub?", "mc1_targets": {"choices": ["wrong", "right", "also wrong"],
                                             "labels": [0, 1, 0]}}])
    hub = load_dataset({"name": str(hub_path), "format": "truthfulqa_mc"})
    assert hub.samples == (Sample(id="0", question="Hub?",
                                  choices=("wrong", "right", "also wrong"), answer=1),)


def _scienceqa_records() -> list[dict]:
    return [
        {"id": "s0", "question": "Which is a mammal?", "choices": ["frog", "whale"],
         "answer": 1, "hint": "Think about the ocean.", "image": "s0/image.png"},
        {"id": "s1", "question": "Pick c.", "choices": ["a", "b", "c"], "answer": 2, "hint": "",
         "image": None},
        {"id": "s2", "question": "Pick x.", "choices": ["x", "y"], "answer": 0, "hint": "h"},
    ]


def test_scienceqa_hint_is_context_and_images_resolve_against_the_images_folder(tmp_path):
    images = tmp_path / "images"
    write_image(images / "s0" / "image.png")
    path = write_jsonl(tmp_path / "data" / "problems.jsonl", _scienceqa_records())
    entry = {"name": str(path), "format": "scienceqa", "images": str(images)}
    data = load_dataset(entry)
    assert data.samples == (
        Sample(id="s0", question="Which is a mammal?", choices=("frog", "whale"), answer=1,
               context="Think about the ocean.", image=str(images / "s0" / "image.png")),
        Sample(id="s1", question="Pick c.", choices=("a", "b", "c"), answer=2),
        Sample(id="s2", question="Pick x.", choices=("x", "y"), answer=0, context="h"),
    )
    assert data.has_images
    assert data.documents() == ["Think about the ocean.\nWhich is a mammal?", "Pick c.",
                                "h\nPick x."]
    assert check_dataset(entry).ok
    # Without images: the paths are relative to the data file's folder.
    assert not check_dataset({"name": str(path), "format": "scienceqa"}).ok
    write_image(path.parent / "s0" / "image.png")
    default = load_dataset({"name": str(path), "format": "scienceqa"})
    assert default.samples[0].image == str(path.parent / "s0" / "image.png")


def test_scienceqa_fields_image_renames_the_image_column(tmp_path):
    write_image(tmp_path / "pic.png")
    records = [{"question": "Q?", "choices": ["a", "b"], "answer": 0, "picture": "pic.png",
                "image": "not-used.png"}]
    path = write_jsonl(tmp_path / "sqa.jsonl", records)
    data = load_dataset({"name": str(path), "format": "scienceqa",
                         "fields": {"image": "picture"}})
    assert data.samples[0].image == str(tmp_path / "pic.png")


def test_mmmu_pro_options_as_list_or_text_answer_letter_and_image_1(tmp_path):
    for name in ("m0.png", "m1.png", "m2.png"):
        write_image(tmp_path / "img" / name)
    path = write_jsonl(tmp_path / "mmmu.jsonl", [
        {"id": "m0", "question": "Which one?", "options": ["a", "b", "c", "d"], "answer": "C",
         "image_1": "img/m0.png", "image_2": None},
        {"id": "m1", "question": "Which two?", "options": "['x', 'y', 'z']", "answer": "a",
         "image_1": "img/m1.png"},
        # The vision setting: the question is inside the image.
        {"id": "m2", "options": "['p', 'q']", "answer": "B", "image": "img/m2.png"},
    ])
    data = load_dataset({"name": str(path), "format": "mmmu_pro"})
    assert data.samples == (
        Sample(id="m0", question="Which one?", choices=("a", "b", "c", "d"), answer=2,
               image=str(tmp_path / "img" / "m0.png")),
        Sample(id="m1", question="Which two?", choices=("x", "y", "z"), answer=0,
               image=str(tmp_path / "img" / "m1.png")),
        Sample(id="m2", question="", choices=("p", "q"), answer=1,
               image=str(tmp_path / "img" / "m2.png")),
    )
    assert data.documents() == ["Which one?", "Which two?", ""]


def test_mmmu_pro_csv(tmp_path):
    write_image(tmp_path / "a.png")
    path = write_csv(tmp_path / "mmmu.csv", ["id", "question", "options", "answer", "image_1"],
                     [["1", "Q?", "['yes', 'no']", "B", "a.png"]])
    data = load_dataset({"name": str(path), "format": "mmmu_pro"})
    assert data.samples == (Sample(id="1", question="Q?", choices=("yes", "no"), answer=1,
                                   image=str(tmp_path / "a.png")),)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("answer", "index"), [
    (2, 2), (0, 0), ("2", 2), ("C", 2), ("c", 2), ("blue", 2), (" blue ", 2), ("A", 0)])
def test_answer_as_index_digit_letter_or_choice_text(tmp_path, answer, index):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "Which?", "choices": ["red", "green", "blue", "yellow"], "answer": answer}])
    assert load_dataset({"name": str(path), "format": "multiple_choice"}).samples[0].answer == index


@pytest.mark.parametrize(("answer", "index"), [("3", 2), ("1", 0), ("four", 3), (3, 3)])
def test_answer_as_label_of_labelled_choices(tmp_path, answer, index):
    choices = [{"text": t, "label": str(n)} for n, t in enumerate(["one", "two", "three",
                                                                     "four"], 1)]
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "Which?", "choices": choices, "answer": answer}])
    assert load_dataset({"name": str(path), "format": "multiple_choice"}).samples[0].answer == index


@pytest.mark.parametrize(("choices", "answer", "message"), [
    (["r", "g", "b", "y"], 4, "answer index 4 is not in 0..3"),
    (["r", "g", "b", "y"], -1, "answer index -1 is not in 0..3"),
    (["r", "g", "b", "y"], "E", "answer 'E' is neither an index, a label (A, B, C, D)"),
    (["r", "g", "b", "y"], "7", "answer '7' is neither"),
    (["r", "g", "b", "y"], "purple", "answer 'purple' is neither"),
    ([{"text": t, "label": str(n)} for n, t in enumerate("wxyz", 1)], "5",
     "answer '5' is neither an index, a label (1, 2, 3, 4)"),
    # With labels A-D, a digit is not read as an index.
    ([{"text": t, "label": x} for t, x in zip("wxyz", "ABCD", strict=True)], "2",
     "answer '2' is neither"),
    (["r", "g"], None, "'answer' (the answer) is empty"),
])
def test_bad_answers_are_refused_naming_the_record(tmp_path, choices, answer, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "Fine?", "choices": ["yes", "no"], "answer": 0},
        {"question": "Broken?", "choices": choices, "answer": answer}])
    entry = {"name": str(path), "format": "multiple_choice"}
    with pytest.raises(DatasetError) as info:
        load_dataset(entry)
    assert f"dataset {str(path)!r}, record 2" in str(info.value)
    assert message in str(info.value)
    assert check_dataset(entry) == data_module.DatasetCheck(False, str(info.value))


def test_arc_unknown_answer_label_names_the_record(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [
        {"question": {"stem": "Q", "choices": [{"text": "a", "label": "A"},
                                               {"text": "b", "label": "B"}]},
         "answerKey": "E"}])
    with pytest.raises(DatasetError, match=r"record 1: answer 'E' is neither .* label \(A, B\)"):
        load_dataset({"name": str(path), "format": "arc"})


# --------------------------------------------------------------------------- questions


def test_generic_question_with_fields_single_and_listed_answers(tmp_path):
    write_image(tmp_path / "paris.png")
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"qid": "a", "q": {"text": "Capital of France?"}, "refs": "Paris", "ctx": "Geography.",
         "pic": "paris.png"},
        {"qid": "b", "q": {"text": "Two primes?"}, "refs": ["2 and 3", "3 and 5"], "ctx": "",
         "pic": ""},
        {"qid": "c", "q": {"text": "How many?"}, "refs": [7, None, "seven"]},
    ])
    entry = {"name": str(path), "format": "question",
             "fields": {"question": "q.text", "answers": "refs", "context": "ctx",
                        "image": "pic", "id": "qid"}}
    data = load_dataset(entry)
    assert data.kind == "question"
    assert data.samples == (
        Sample(id="a", question="Capital of France?", answers=("Paris",), context="Geography.",
               image=str(tmp_path / "paris.png")),
        Sample(id="b", question="Two primes?", answers=("2 and 3", "3 and 5")),
        Sample(id="c", question="How many?", answers=("7", "seven")),
    )
    assert data.documents() == ["Geography.\nCapital of France?", "Two primes?", "How many?"]
    assert data.has_images


def test_vqav2_answers_as_texts_and_as_hub_objects(tmp_path):
    write_image(tmp_path / "val2014" / "COCO_1.png")
    write_image(tmp_path / "val2014" / "COCO_2.png", (0, 0, 255))
    texts = ["red"] * 6 + ["dark red"] * 4
    objects = [{"answer": str(n % 3), "answer_confidence": "yes", "answer_id": n}
               for n in range(1, 11)]
    path = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question_id": 7, "question": "What colour?", "image": "COCO_1.png", "answers": texts},
        {"question_id": 8, "question": "How many?", "image": "COCO_2.png", "answers": objects},
    ])
    data = load_dataset({"name": str(path), "format": "vqav2",
                         "images": str(tmp_path / "val2014")})
    assert data.kind == "question" and data.has_images
    first, second = data.samples
    assert (first.id, first.question, first.answers) == ("7", "What colour?", tuple(texts))
    assert first.image == str(tmp_path / "val2014" / "COCO_1.png")
    assert second.id == "8" and second.answers == tuple(str(n % 3) for n in range(1, 11))
    assert len(second.answers) == 10


# --------------------------------------------------------------------------- subsets


def _questions(tmp_path: Path, n: int = 30) -> Path:
    return write_jsonl(tmp_path / "qs.jsonl", [
        {"id": f"q{i:02d}", "question": f"Question {i}?", "answers": [str(i)]} for i in range(n)])


def test_limit_of_a_text_dataset_keeps_the_first_documents_in_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)), encoding="utf-8")
    for seed in (0, 1):
        data = load_dataset({"name": str(path), "limit": 4, "seed": seed})
        assert data.documents() == ["line 0", "line 1", "line 2", "line 3"]


def test_limit_of_questions_is_a_seeded_sample_kept_in_file_order(tmp_path):
    path = _questions(tmp_path)
    entry = {"name": str(path), "format": "question", "limit": 10}
    first = [s.id for s in load_dataset(entry, seed=0).samples]
    assert len(first) == len(set(first)) == 10
    assert first == sorted(first)  # file order
    assert first != [f"q{i:02d}" for i in range(10)]  # a sample, not the head of the file
    assert [s.id for s in load_dataset(entry, seed=0).samples] == first
    assert [s.id for s in load_dataset(entry, seed=1).samples] != first
    # The entry's seed wins over the sweep's.
    assert load_dataset({**entry, "seed": 1}, seed=0).samples == load_dataset(entry,
                                                                              seed=1).samples


def test_limit_of_multiple_choice_is_seeded_too(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": str(i), "question": f"Q{i}", "choices": ["a", "b"], "answer": i % 2}
        for i in range(40)])
    entry = {"name": str(path), "format": "multiple_choice", "limit": 5}
    ids = [[int(s.id) for s in load_dataset(entry, seed=seed).samples] for seed in (3, 3, 4)]
    assert ids[0] == ids[1] != ids[2]
    assert all(x == sorted(x) and len(x) == 5 for x in ids)


def test_limit_larger_than_the_dataset_keeps_everything(tmp_path):
    path = _questions(tmp_path, 6)
    data = load_dataset({"name": str(path), "format": "question", "limit": 100})
    assert [s.id for s in data.samples] == [f"q{i:02d}" for i in range(6)]
    text = tmp_path / "t.txt"
    text.write_text("a\nb\n", encoding="utf-8")
    assert load_dataset({"name": str(text), "limit": 5}).documents() == ["a", "b"]


# --------------------------------------------------------------------------- the pieces


def test_sample_prompt_is_context_then_question_or_the_text():
    assert Sample(id="0", question="Q?", context="C.").prompt() == "C.\nQ?"
    assert Sample(id="0", question="Q?").prompt() == "Q?"
    assert Sample(id="0", question="", context="Only context").prompt() == "Only context"
    assert Sample(id="0", text="Running text.").prompt() == "Running text."
    assert Sample(id="0").prompt() == ""


def test_dataset_of_texts_documents_and_has_images():
    data = Dataset.of_texts(["one", "two"], name="calib")
    assert (data.name, data.kind, data.format, len(data)) == ("calib", "text", "text", 2)
    assert data.documents() == ["one", "two"]
    assert [s.id for s in data.samples] == ["0", "1"]
    assert not data.has_images
    with_image = Dataset(name="x", kind="question", format="question", samples=(
        Sample(id="0", question="Q", answers=("a",)),
        Sample(id="1", question="R", answers=("b",), image=object())))
    assert with_image.has_images
    assert with_image.documents() == ["Q", "R"]


def test_token_stream_prefixes_bos_and_stops_after_max_tokens(byte_tokenizer):
    assert token_stream(byte_tokenizer, ["ab", "c"]) == [256, 97, 98, 256, 99]
    # Stops once enough ids are collected (after the document that reached the limit).
    assert token_stream(byte_tokenizer, ["ab", "c", "d"], max_tokens=2) == [256, 97, 98]
    assert token_stream(byte_tokenizer, ["ab", "c", "d"], max_tokens=4) == [256, 97, 98, 256, 99]

    class NoBos:
        bos_id = None

        def encode(self, text: str) -> list[int]:
            return [len(text)]

    assert token_stream(NoBos(), ["abc", "de"]) == [3, 2]


def test_every_format_is_registered_with_its_kind():
    kinds = {name: fmt.kind for name, fmt in formats().items()}
    assert kinds == {
        "text": "text", "wikitext": "text", "multiple_choice": "multiple_choice",
        "arc": "multiple_choice", "openbookqa": "multiple_choice",
        "truthfulqa_mc": "multiple_choice", "scienceqa": "multiple_choice",
        "mmmu_pro": "multiple_choice", "question": "question", "vqav2": "question"}
    assert all(fmt.description for fmt in formats().values())
    assert dataset_kind({"name": "x.jsonl", "format": "vqav2"}) == "question"
    assert dataset_kind({"name": "builtin:pydoc"}) == "text"


def test_register_format_refuses_a_bad_kind_and_a_second_registration():
    with pytest.raises(ValueError, match="kind must be one of"):
        register_format("bad", kind="images", description="")
    with pytest.raises(ValueError, match="'text' registered twice"):
        register_format("text", kind="text", description="again")(lambda records, request: [])


def test_a_registered_format_is_used_by_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_FORMATS", dict(formats()))

    @register_format("pairs", kind="question", fields={"left": "l"}, description="test pairs")
    def pairs(records, request):
        key = request.fields.get("left", "l")
        return [Sample(id=str(i), question=r[key], answers=(r["r"],))
                for i, r in enumerate(records)]

    path = write_jsonl(tmp_path / "p.jsonl", [{"l": "a", "x": "b", "r": "c"}])
    assert load_dataset({"name": str(path), "format": "pairs"}).samples == (
        Sample(id="0", question="a", answers=("c",)),)
    assert load_dataset({"name": str(path), "format": "pairs",
                         "fields": {"left": "x"}}).samples[0].question == "b"


def test_resolve_tells_the_source_from_the_name(tmp_path):
    assert resolve({"name": "builtin:pydoc"}).source == "builtin"
    assert resolve({"name": "builtin:pydoc"}).name == "pydoc"
    hub = resolve({"name": "hub:allenai/openbookqa", "format": "openbookqa", "split": "test",
                   "config": "main"})
    assert (hub.source, hub.name, hub.split, hub.config) == ("hub", "allenai/openbookqa",
                                                             "test", "main")
    assert resolve({"name": "allenai/openbookqa", "source": "hub",
                    "format": "openbookqa"}).source == "hub"
    assert resolve({"name": "data/x.parquet", "format": "question"}).source == "local"
    assert resolve({"name": "~/x.csv", "format": "question"}).path == Path.home() / "x.csv"
    assert resolve({"name": "t.txt"}).format == "text"
    request = resolve({"name": "x.jsonl", "format": "scienceqa", "images": str(tmp_path)})
    assert request.image_dir() == tmp_path
    assert resolve({"name": "x.jsonl", "format": "question"}, seed=9).seed == 9
    assert resolve({"name": "x.jsonl", "format": "question", "seed": 2}, seed=9).seed == 2
