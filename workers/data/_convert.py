"""Shared conversions from records to samples: field lookup, choices, answers, images."""

from __future__ import annotations

import ast
import string
from pathlib import Path
from typing import Any

from workers.data import DatasetError, DatasetRequest
from workers.data.records import get_path

LETTERS = string.ascii_uppercase


def where(request: DatasetRequest, index: int) -> str:
    return f"dataset {request.name!r}, record {index + 1}"


def field_value(record: dict[str, Any], request: DatasetRequest, index: int, key: str,
                default: str | None, required: bool) -> Any:
    """The record's value for sample part ``key`` (through ``fields``), or None."""
    path = request.fields.get(key, default)
    if path is None:
        return None
    try:
        value = get_path(record, path)
    except KeyError:
        if not required:
            return None
        keys = ", ".join(sorted(record)[:12])
        raise DatasetError(f"{where(request, index)} has no {path!r} for the {key}; set "
                           f"fields.{key} to the record's key (it has: {keys})") from None
    if value is None and required:
        raise DatasetError(f"{where(request, index)}: {path!r} (the {key}) is empty")
    return value


def text_of(value: Any, what: str, request: DatasetRequest, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    hint = (" (a dotted path in fields reaches text inside an object, e.g. question.stem)"
            if isinstance(value, dict) else "")
    raise DatasetError(f"{where(request, index)}: the {what} must be text, not "
                       f"{type(value).__name__}{hint}")


def choices_of(value: Any, request: DatasetRequest,
               index: int) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(choice texts, labels or None) from a list of texts, of {text, label} objects, a
    {text: [...], label: [...]} object (the hub's ARC layout) or the text of a Python list."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DatasetError(f"{where(request, index)}: the choices are text that is not a "
                               "list") from None
    labels: list[str] | None = None
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        texts = value["text"]
        if isinstance(value.get("label"), list):
            labels = [str(label) for label in value["label"]]
    elif isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        if not all("text" in c for c in value):
            raise DatasetError(f"{where(request, index)}: each choice object needs a text")
        texts = [c["text"] for c in value]
        if all("label" in c for c in value):
            labels = [str(c["label"]) for c in value]
    elif isinstance(value, list | tuple):
        texts = list(value)
    else:
        raise DatasetError(f"{where(request, index)}: the choices must be a list, not "
                           f"{type(value).__name__}")
    if len(texts) < 2:
        raise DatasetError(f"{where(request, index)}: a multiple-choice question needs at "
                           f"least 2 choices, it has {len(texts)}")
    out = tuple(text_of(t, "choice", request, index) for t in texts)
    if labels is not None and len(labels) != len(out):
        raise DatasetError(f"{where(request, index)}: {len(labels)} labels for {len(out)} choices")
    return out, None if labels is None else tuple(labels)


def answer_index(value: Any, choices: tuple[str, ...], labels: tuple[str, ...] | None,
                 request: DatasetRequest, index: int) -> int:
    """Index of the correct choice from an index, a label/letter, or the choice's text."""
    n = len(choices)
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"{where(request, index)}: the answer is missing")
    if isinstance(value, int):
        if 0 <= value < n:
            return value
        raise DatasetError(f"{where(request, index)}: answer index {value} is not in 0..{n - 1}")
    text = str(value).strip()
    if labels is not None and text in labels:
        return labels.index(text)
    if len(text) == 1 and text.upper() in LETTERS[:n] and labels is None:
        return LETTERS.index(text.upper())
    if text.isdigit() and labels is None and 0 <= int(text) < n:
        return int(text)
    if text in choices:
        return choices.index(text)
    raise DatasetError(f"{where(request, index)}: answer {text!r} is neither an index, a "
                       f"label ({', '.join(labels or LETTERS[:n])}) nor one of the choices")


def image_of(value: Any, request: DatasetRequest, index: int) -> Any:
    """An image reference: a path (resolved against ``images``; must exist) or an image."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = request.image_dir() / path
        if not path.is_file():
            raise DatasetError(f"{where(request, index)}: image {value!r} not found at {path}; "
                               "set images: to the folder the paths are relative to")
        return str(path)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and not value.get("bytes"):
        return image_of(value["path"], request, index)
    return value  # a decoded image (hub datasets) or encoded bytes; evaluators open it


def sample_id(record: dict[str, Any], request: DatasetRequest, index: int) -> str:
    value = field_value(record, request, index, "id", None, False)
    if value is None:
        for key in ("id", "question_id", "qid"):
            if record.get(key) is not None:
                return str(record[key])
        return str(index)
    return str(value)
