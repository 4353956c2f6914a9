"""Open-question formats (answers generated, then compared): generic and VQAv2."""

from __future__ import annotations

from typing import Any

from workers.data import DatasetError, DatasetRequest, Records, Sample, register_format
from workers.data._convert import field_value, image_of, sample_id, text_of, where


def _answers(value: Any, request: DatasetRequest, index: int) -> tuple[str, ...]:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, list) and value:
        out = []
        for item in value:
            if isinstance(item, dict):  # the hub's VQAv2: {answer, answer_confidence, ...}
                item = item.get("answer")
            if item is None:
                continue
            out.append(text_of(item, "answer", request, index))
        if out:
            return tuple(out)
    raise DatasetError(f"{where(request, index)}: the reference answers must be text or a "
                       "non-empty list of texts")


@register_format(
    "question", kind="question",
    fields={"question": "question", "answers": "answers", "context": None, "image": None,
            "id": None},
    description="Generic open question: question, reference answers (one text or a list), "
                "optional context and image.")
def generic(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        context = field_value(record, request, i, "context", None, False)
        out.append(Sample(
            id=sample_id(record, request, i),
            question=text_of(field_value(record, request, i, "question", "question", True),
                             "question", request, i),
            answers=_answers(field_value(record, request, i, "answers", "answers", True),
                             request, i),
            context=None if context in (None, "") else text_of(context, "context", request, i),
            image=image_of(field_value(record, request, i, "image", None, False), request, i)))
    return out


@register_format(
    "vqav2", kind="question", fields={"image": "image"},
    description="VQAv2: question, image, the ten human answers (answers: texts or the hub's "
                "{answer: ...} objects).")
def vqav2(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        if "question" not in record or "answers" not in record:
            raise DatasetError(f"{where(request, i)} has no question/answers: not VQAv2-style")
        image = image_of(field_value(record, request, i, "image", "image", False), request, i)
        if image is None:
            raise DatasetError(f"{where(request, i)}: VQAv2 questions need their image")
        out.append(Sample(id=sample_id(record, request, i),
                          question=text_of(record["question"], "question", request, i),
                          answers=_answers(record["answers"], request, i), image=image))
    return out
