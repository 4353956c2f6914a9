"""Multiple-choice formats: generic, ARC/OpenBookQA, TruthfulQA (MC1), ScienceQA, MMMU-Pro.

Every sample has a ``question``, its ``choices`` and the index of the correct one in
``answer``; ``context`` (ScienceQA's hint) and ``image`` when the format has them.
"""

from __future__ import annotations

from typing import Any

from workers.data import DatasetError, DatasetRequest, Records, Sample, register_format
from workers.data._convert import (
    answer_index,
    choices_of,
    field_value,
    image_of,
    sample_id,
    text_of,
    where,
)


@register_format(
    "multiple_choice", kind="multiple_choice",
    fields={"question": "question", "choices": "choices", "answer": "answer", "context": None,
            "image": None, "id": None},
    description="Generic multiple choice: question, choices (list, {text,label} objects or "
                "the text of a list), answer (index, label/letter or the choice's text); "
                "optional context and image.")
def generic(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        question = text_of(field_value(record, request, i, "question", "question", True),
                           "question", request, i)
        choices, labels = choices_of(field_value(record, request, i, "choices", "choices", True),
                                     request, i)
        answer = answer_index(field_value(record, request, i, "answer", "answer", True),
                              choices, labels, request, i)
        context = field_value(record, request, i, "context", None, False)
        out.append(Sample(
            id=sample_id(record, request, i), question=question, choices=choices, answer=answer,
            context=None if context in (None, "") else text_of(context, "context", request, i),
            image=image_of(field_value(record, request, i, "image", None, False), request, i)))
    return out


def _arc(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        question: Any = record.get("question")
        if isinstance(question, dict):  # the original jsonl: question.stem, question.choices
            stem, choices_value = question.get("stem"), question.get("choices")
        else:  # the hub: question (ARC) or question_stem (OpenBookQA), choices.{text,label}
            stem = question if question is not None else record.get("question_stem")
            choices_value = record.get("choices")
        if stem is None or choices_value is None or record.get("answerKey") is None:
            raise DatasetError(f"{where(request, i)} is not ARC/OpenBookQA-style (question stem, "
                               "choices with labels, answerKey); use format: multiple_choice "
                               "with fields")
        choices, labels = choices_of(choices_value, request, i)
        out.append(Sample(id=sample_id(record, request, i), question=text_of(
            stem, "question", request, i), choices=choices,
            answer=answer_index(str(record["answerKey"]), choices, labels, request, i)))
    return out


register_format("arc", kind="multiple_choice",
                description="ARC-style multiple choice (question.stem, question.choices[].text/"
                            "label, answerKey), also the hub's ai2_arc layout.")(_arc)
register_format("openbookqa", kind="multiple_choice",
                description="OpenBookQA: ARC-style records (the original jsonl or the hub's "
                            "question_stem/choices layout).")(_arc)


def _split_answers(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(";") if part.strip()]


@register_format(
    "truthfulqa_mc", kind="multiple_choice",
    description="TruthfulQA as MC1: the best answer against the incorrect ones (the original "
                "CSV: Question, Best Answer, Incorrect Answers; or the hub's mc1_targets).")
def truthfulqa(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        targets = record.get("mc1_targets")
        question = record.get("Question", record.get("question"))
        if isinstance(targets, dict):
            choices = tuple(str(c) for c in targets.get("choices") or ())
            labels = list(targets.get("labels") or ())
            if len(labels) != len(choices) or labels.count(1) != 1:
                raise DatasetError(f"{where(request, i)}: mc1_targets needs one label per choice "
                                   "and exactly one label 1 (the correct choice)")
            answer = labels.index(1)
        elif "Best Answer" in record and "Incorrect Answers" in record:
            # Correct answer first, as lm-evaluation-harness's truthfulqa_mc1 orders them.
            choices = (str(record["Best Answer"]).strip(),
                       *_split_answers(record["Incorrect Answers"]))
            answer = 0
        else:
            raise DatasetError(f"{where(request, i)} has neither mc1_targets nor Best Answer and "
                               "Incorrect Answers")
        if question is None or len(choices) < 2:
            raise DatasetError(f"{where(request, i)}: a question and at least one incorrect "
                               "answer are needed")
        out.append(Sample(id=str(i), question=str(question), choices=choices, answer=answer))
    return out


@register_format(
    "scienceqa", kind="multiple_choice", fields={"image": "image"},
    description="ScienceQA: question, choices, answer index, optional image; the hint is the "
                "context (fields.image renames the image column).")
def scienceqa(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        for key in ("question", "choices", "answer"):
            if key not in record:
                raise DatasetError(f"{where(request, i)} has no {key!r}: not ScienceQA-style")
        choices, labels = choices_of(record["choices"], request, i)
        hint = record.get("hint")
        out.append(Sample(
            id=sample_id(record, request, i), question=text_of(record["question"], "question",
                                                               request, i),
            choices=choices, answer=answer_index(record["answer"], choices, labels, request, i),
            context=str(hint) if hint not in (None, "") else None,
            image=image_of(field_value(record, request, i, "image", "image", False), request, i)))
    return out


@register_format(
    "mmmu_pro", kind="multiple_choice", fields={"image": None},
    description="MMMU-Pro-style: question (may be absent in the vision setting), options "
                "(list or its text), answer letter, image (image_1, or image).")
def mmmu_pro(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        if "options" not in record or "answer" not in record:
            raise DatasetError(f"{where(request, i)} has no options/answer: not MMMU-Pro-style")
        choices, labels = choices_of(record["options"], request, i)
        image_key = request.fields.get("image") or next(
            (k for k in ("image_1", "image") if record.get(k) is not None), None)
        image = image_of(record.get(image_key) if image_key else None, request, i)
        out.append(Sample(
            id=sample_id(record, request, i),
            question=text_of(record.get("question") or "", "question", request, i),
            choices=choices, answer=answer_index(record["answer"], choices, labels, request, i),
            image=image))
    return out
