"""Every way a dataset entry can be wrong: one clear, one-line message naming what to fix,
raised by load_dataset and returned (never raised) by check_dataset."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from datafiles import write_csv, write_json, write_jsonl

from workers.data import DatasetCheck, DatasetError, check_dataset, formats, load_dataset

Entry = dict[str, Any]

GOOD_MC = {"question": "Fine?", "choices": ["yes", "no"], "answer": 0}


def _mc(tmp_path: Path, *records: dict, **entry: Any) -> Entry:
    path = write_jsonl(tmp_path / "mc.jsonl", [GOOD_MC, *records])
    return {"name": str(path), "format": "multiple_choice", **entry}


def _file(tmp_path: Path, name: str, content: str | bytes, **entry: Any) -> Entry:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return {"name": str(path), **entry}


def _unknown_format(tmp_path: Path) -> Entry:
    return _mc(tmp_path, format="mcq")


def _unknown_field_key(tmp_path: Path) -> Entry:
    return _mc(tmp_path, fields={"label": "answerKey"})


def _fields_on_a_fixed_layout(tmp_path: Path) -> Entry:
    return _mc(tmp_path, format="arc", fields={"question": "q"})


def _missing_field(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "Q?", "answers": ["a"]}, {"prompt": "Q2?", "answers": ["b"]}])
    return {"name": str(path), "format": "question"}


def _dict_where_text_is_expected(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "obqa.jsonl", [
        {"question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"},
                                                {"text": "b", "label": "B"}]},
         "answerKey": "A"}])
    return {"name": str(path), "format": "multiple_choice"}


def _non_json_line(tmp_path: Path) -> Entry:
    return _file(tmp_path, "bad.jsonl", json.dumps(GOOD_MC) + "\n\n{'question': 1}\n",
                 format="multiple_choice")


def _jsonl_line_not_an_object(tmp_path: Path) -> Entry:
    return _file(tmp_path, "bad.jsonl", "[1, 2]\n", format="multiple_choice")


def _json_syntax_error(tmp_path: Path) -> Entry:
    return _file(tmp_path, "bad.json", '[\n{"question": "a",}\n]', format="multiple_choice")


def _json_without_a_list(tmp_path: Path) -> Entry:
    path = write_json(tmp_path / "obj.json", {"meta": 1, "items": [GOOD_MC]})
    return {"name": str(path), "format": "multiple_choice"}


def _missing_image(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {**GOOD_MC, "image": "figures/missing.png"}, fields={"image": "image"},
               images=str(tmp_path))


def _vqa_without_image(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"question": "Q?", "answers": ["a"] * 10}])
    return {"name": str(path), "format": "vqav2"}


def _directory(tmp_path: Path) -> Entry:
    (tmp_path / "corpus").mkdir()
    return {"name": str(tmp_path / "corpus"), "format": "text"}


def _missing_file(tmp_path: Path) -> Entry:
    return {"name": str(tmp_path / "nowhere.jsonl"), "format": "multiple_choice"}


def _unknown_file_type(tmp_path: Path) -> Entry:
    return _file(tmp_path, "data.tsv", "text\nhello\n", source="local", format="text")


def _unknown_source(tmp_path: Path) -> Entry:
    return {"name": "bucket/data.jsonl", "source": "s3", "format": "question"}


def _source_cannot_be_told(tmp_path: Path) -> Entry:
    return {"name": "my-dataset", "format": "question"}


def _format_not_set(tmp_path: Path) -> Entry:
    return {"name": _mc(tmp_path)["name"]}


def _split_on_a_local_file(tmp_path: Path) -> Entry:
    return _mc(tmp_path, split="test")


def _one_choice(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {"question": "Only?", "choices": ["yes"], "answer": 0})


def _choices_text_not_a_list(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {"question": "Q?", "choices": "yes; no", "answer": 0})


def _choices_not_a_list(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {"question": "Q?", "choices": 4, "answer": 0})


def _labels_do_not_match_choices(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {"question": "Q?", "choices": {"text": ["a", "b", "c"],
                                                        "label": ["A", "B"]}, "answer": "A"})


def _choice_objects_without_text(tmp_path: Path) -> Entry:
    return _mc(tmp_path, {"question": "Q?", "choices": [{"label": "A"}, {"label": "B"}],
                          "answer": "A"})


def _empty_jsonl(tmp_path: Path) -> Entry:
    return _file(tmp_path, "empty.jsonl", "\n", format="multiple_choice")


def _blank_text_file(tmp_path: Path) -> Entry:
    return _file(tmp_path, "blank.txt", "\n   \n\n")


def _records_format_on_a_txt_file(tmp_path: Path) -> Entry:
    return _file(tmp_path, "q.txt", "What?\n", format="multiple_choice")


def _not_utf8(tmp_path: Path) -> Entry:
    return _file(tmp_path, "latin1.txt", "caf\u00e9\n".encode("latin-1"))


def _not_parquet(tmp_path: Path) -> Entry:
    return _file(tmp_path, "x.parquet", b"PAR1 this is not parquet", format="question")


def _ragged_csv(tmp_path: Path) -> Entry:
    # An unquoted comma in the question: the values would shift one column to the right.
    return _file(tmp_path, "qa.csv", "question,answers\nWhat is 2+2?,4\nWhat is 1,2?,x\n",
                 format="question")


def _short_csv_row(tmp_path: Path) -> Entry:
    return _file(tmp_path, "qa.csv", "id,question,answers\n1,What?,yes\n2,Who?\n",
                 format="question")


def _truthfulqa_wrong_columns(tmp_path: Path) -> Entry:
    path = write_csv(tmp_path / "tqa.csv", ["Question", "Correct Answers"], [["Q?", "a; b"]])
    return {"name": str(path), "format": "truthfulqa_mc"}


def _truthfulqa_no_incorrect_answer(tmp_path: Path) -> Entry:
    path = write_csv(tmp_path / "tqa.csv", ["Question", "Best Answer", "Incorrect Answers"],
                     [["Q?", "Yes", " ; "]])
    return {"name": str(path), "format": "truthfulqa_mc"}


def _truthfulqa_mc1_without_a_correct_label(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "tqa.jsonl", [
        {"question": "Q?", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]}},
        {"question": "R?", "mc1_targets": {"choices": ["a", "b"], "labels": [0, 0]}}])
    return {"name": str(path), "format": "truthfulqa_mc"}


def _not_arc(tmp_path: Path) -> Entry:
    return _mc(tmp_path, format="arc")


def _not_scienceqa(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "Q?", "choices": ["a", "b"]}])
    return {"name": str(path), "format": "scienceqa"}


def _not_mmmu_pro(tmp_path: Path) -> Entry:
    return _mc(tmp_path, format="mmmu_pro")


def _no_reference_answers(tmp_path: Path) -> Entry:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answers": []}])
    return {"name": str(path), "format": "question"}


def _unknown_builtin(tmp_path: Path) -> Entry:
    return {"name": "builtin:wiki"}


def _builtin_unknown_split(tmp_path: Path) -> Entry:
    return {"name": "builtin:pydoc", "split": "dev"}


# (entry builder, fragments the message must contain; "{name}" is the entry's file name)
REFUSALS: list[tuple[Callable[[Path], Entry], list[str]]] = [
    (_unknown_format, ["unknown dataset format 'mcq'; formats: ",
                       ", ".join(sorted(formats()))]),
    (_unknown_field_key, ["fields: unknown key 'label'",
                          "format multiple_choice maps answer, choices, context, id, image, "
                          "question"]),
    (_fields_on_a_fixed_layout, ["fields: unknown key 'question'",
                                 "format arc has a fixed layout and takes no fields"]),
    (_missing_field, ["dataset '{name}', record 2 has no 'question' for the question",
                      "set fields.question to the record's key (it has: answers, prompt)"]),
    (_dict_where_text_is_expected, ["record 1: the question must be text, not dict",
                                    "a dotted path in fields", "e.g. question.stem"]),
    (_non_json_line, ["{name}: line 3 is not JSON"]),
    (_jsonl_line_not_an_object, ["{name}: line 1 is not a JSON object"]),
    (_json_syntax_error, ["{name} is not JSON", "at line 2"]),
    (_json_without_a_list, ["must hold a list of objects (or one under data/rows/examples)"]),
    (_missing_image, ["record 2: image 'figures/missing.png' not found at ",
                      "figures/missing.png; set images: to the folder"]),
    (_vqa_without_image, ["record 1: VQAv2 questions need their image"]),
    (_directory, ["is a directory; give the path of a .txt/.jsonl/.json/.csv/.parquet file"]),
    (_missing_file, ["dataset file {name} does not exist"]),
    (_unknown_file_type, ["unknown file type .tsv; use .txt, .jsonl, .json, .csv or .parquet"]),
    (_unknown_source, ["unknown dataset source 's3'; sources: builtin, local, hub"]),
    (_source_cannot_be_told, ["cannot tell where dataset 'my-dataset' comes from",
                              "set source: hub"]),
    (_format_not_set, ["set format, one of ", "multiple_choice"]),
    (_split_on_a_local_file, ["split applies to built-in and hub datasets only; remove it"]),
    (_one_choice, ["record 2: a multiple-choice question needs at least 2 choices, it has 1"]),
    (_choices_text_not_a_list, ["record 2: the choices are text that is not a list"]),
    (_choices_not_a_list, ["record 2: the choices must be a list, not int"]),
    (_labels_do_not_match_choices, ["record 2: 2 labels for 3 choices"]),
    (_choice_objects_without_text, ["record 2: each choice object needs a text"]),
    (_empty_jsonl, ["dataset '{name}' has no samples"]),
    (_blank_text_file, ["dataset '{name}' has no samples"]),
    (_records_format_on_a_txt_file, ["format multiple_choice reads records, not a .txt file"]),
    (_not_utf8, ["{name} is not UTF-8 text"]),
    (_not_parquet, ["{name} is not readable as Parquet"]),
    (_ragged_csv, ["{name}: line 3 does not have one value for each of the header's 2 columns",
                   "quote values that contain commas"]),
    (_short_csv_row, ["{name}: line 3 does not have one value for each of the header's 3"]),
    (_truthfulqa_wrong_columns, ["record 1 has neither mc1_targets nor Best Answer and "
                                 "Incorrect Answers"]),
    (_truthfulqa_no_incorrect_answer, ["record 1: a question and at least one incorrect answer"]),
    (_truthfulqa_mc1_without_a_correct_label, ["record 2: mc1_targets needs one label per "
                                                "choice and exactly one label 1"]),
    (_not_arc, ["record 1 is not ARC/OpenBookQA-style", "use format: multiple_choice"]),
    (_not_scienceqa, ["record 1 has no 'answer': not ScienceQA-style"]),
    (_not_mmmu_pro, ["record 1 has no options/answer: not MMMU-Pro-style"]),
    (_no_reference_answers, ["record 1: the reference answers must be text or a non-empty list"]),
    (_unknown_builtin, ["unknown built-in dataset 'wiki'; built-ins: builtin:pydoc"]),
    (_builtin_unknown_split, ["builtin:pydoc has no split 'dev'; splits: train, validation, "
                              "test"]),
]


@pytest.mark.parametrize(("build", "fragments"), REFUSALS,
                         ids=[build.__name__.strip("_") for build, _ in REFUSALS])
def test_refusal_is_one_clear_message_from_load_and_check(tmp_path, build, fragments):
    entry = build(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(entry)
    message = str(info.value)
    name = str(entry["name"]).removeprefix("builtin:")
    for fragment in fragments:
        assert fragment.replace("{name}", name) in message
    assert "\n" not in message
    assert check_dataset(entry) == DatasetCheck(False, message)


def test_check_refuses_a_split_on_a_text_file_and_takes_a_bare_name(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a line\n", encoding="utf-8")
    check = check_dataset(str(path), split="train")
    assert not check.ok and "split applies to built-in and hub datasets only" in check.message
    assert check_dataset(str(path)).ok
    assert check_dataset("builtin:pydoc", "validation").ok
    assert not check_dataset("builtin:pydoc", "dev").ok


def test_a_missing_text_file_is_named_by_load_and_by_check(tmp_path):
    # load_dataset reads a .txt without check_local_file (a calibration split is ignored
    # for it), so its wording differs from the driver-side check; both name the file.
    path = tmp_path / "nowhere.txt"
    with pytest.raises(DatasetError, match=f"dataset file {path} is not readable: No such file"):
        load_dataset({"name": str(path)})
    assert check_dataset({"name": str(path)}) == DatasetCheck(
        False, f"dataset file {path} does not exist")


def test_records_with_raw_line_separators_inside_strings_are_one_line(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 unescaped: still one record."""
    text = "before\u2028after \x85 end\x0c"
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    entry = {"name": str(path), "format": "text"}
    assert check_dataset(entry).ok
    assert load_dataset(entry).documents() == [text]
    txt = tmp_path / "docs.txt"
    txt.write_text(f"{text}\r\nsecond\n", encoding="utf-8")
    assert load_dataset({"name": str(txt)}).documents() == [text, "second"]


def test_quoted_commas_in_csv_are_fine(tmp_path):
    path = write_csv(tmp_path / "qa.csv", ["question", "answers"], [["What is 1,2?", "x, y"]])
    data = load_dataset({"name": str(path), "format": "question"})
    assert [(s.question, s.answers) for s in data.samples] == [("What is 1,2?", ("x, y",))]
