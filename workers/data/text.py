"""Running-text formats: ``text`` (generic) and ``wikitext`` (articles of WikiText)."""

from __future__ import annotations

import re

from workers.data import DatasetRequest, Records, Sample, register_format
from workers.data._convert import field_value, text_of


def _split_lines(text: str) -> list[str]:
    # Line breaks only: str.splitlines() also splits at U+2028, U+0085, form feeds...
    return re.split(r"\r\n|[\r\n]", text)


def lines(text: str) -> list[str]:
    """One document per non-empty line."""
    return [line for line in _split_lines(text) if line.strip()]


@register_format("text", kind="text", fields={"text": "text", "id": None},
                 description="Running text: a .txt file (one document per non-empty line) or "
                             "records with a text field.",
                 text_documents=lines)
def text_samples(records: Records, request: DatasetRequest) -> list[Sample]:
    out = []
    for i, record in enumerate(records):
        value = field_value(record, request, i, "text", "text", True)
        text = text_of(value, "text", request, i)
        if text.strip():
            out.append(Sample(id=str(i), text=text))
    return out


# A top-level WikiText heading: " = Title = " (subsections have "= =" and more).
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def articles(text: str) -> list[str]:
    """WikiText split into articles at its top-level headings, each with its heading.

    The lines of an article are kept as they are (tokenized WikiText, ``@-@`` and ``<unk>``
    included), joined with newlines; blank lines at an article's ends are dropped.
    """
    out: list[list[str]] = []
    for line in _split_lines(text):
        if _ARTICLE_HEADING.match(line) or not out:
            out.append([])
        out[-1].append(line)
    documents = []
    for article in out:
        while article and not article[-1].strip():
            article.pop()
        while article and not article[0].strip():
            article.pop(0)
        if article:
            documents.append("\n".join(article))
    return documents


@register_format("wikitext", kind="text", fields={},
                 description="WikiText-2/103: one document per article (split at the top-level "
                             "' = Title = ' headings); a .txt file or the hub's line records.",
                 text_documents=articles)
def wikitext_samples(records: Records, request: DatasetRequest) -> list[Sample]:
    # The hub's wikitext has one record per line, with its newline.
    text = "".join(text_of(field_value(r, request, i, "text", "text", True), "text", request, i)
                   for i, r in enumerate(records))
    return [Sample(id=str(i), text=t) for i, t in enumerate(articles(text))]
