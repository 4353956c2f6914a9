"""What the question evaluators share: prompt templates and the checks of what they score."""

from __future__ import annotations

from typing import Any

from workers.data import Dataset, Sample

PLACEHOLDERS = ("question", "context", "prompt")


def fill_template(sample: Sample, template: str, setting: str) -> str:
    """``template`` with ``{question}``, ``{context}`` and ``{prompt}`` (context and question
    on two lines) of ``sample``; ``setting`` names the spec setting in errors."""
    try:
        return template.format(question=sample.question or "", context=sample.context or "",
                               prompt=sample.prompt())
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{setting}: unknown placeholder {exc}; use "
                         + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)) from None


def check_questions(data: Dataset, evaluator: str, kind: str, what: str,
                    processor: Any) -> None:
    """Refuse data of another kind, and image questions without a vision-language model."""
    if data.kind != kind:
        raise ValueError(f"{evaluator} scores {what} datasets; {data.name} holds {data.kind} "
                         "samples")
    if data.has_images and processor is None:
        raise ValueError(f"{data.name} has image questions: they need a vision-language model "
                         "and its processor, which this evaluation does not have")
