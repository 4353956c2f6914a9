"""The built-in dataset ``builtin:pydoc``: the Python language reference as plain text.

Corpus
    ``pydoc_data.topics.topics``, the dict of help topics (``"assignment"``,
    ``"for"``, ``"numeric-types"``, …) that ships with every CPython installation and
    backs ``help("for")``. It is real English technical prose with code, needs no
    download, and is identical on every machine with the same Python release (the
    text can change between patch releases, when the docs are fixed).

Documents
    Topics are taken in name order. Each topic's text is split at blank lines into
    paragraphs; reStructuredText underlines (``*****``, ``=====``) are removed, runs of
    whitespace are collapsed to one space, and paragraphs shorter than
    :data:`MIN_DOCUMENT_CHARS` characters (headings, lone grammar fragments) are
    dropped. A document is therefore one line of text.

Splits
    Many topics quote each other: ``compound`` contains ``for``, ``while``, ``try`` …
    verbatim, ``specialnames`` contains ``numeric-types``, and a fifth of all
    paragraphs occur in more than one topic. So the unit of assignment is a *topic
    group*: topics that share at least one paragraph (transitively) are one group, and
    a whole group goes to one split; within a split every paragraph is kept once. No
    held-out paragraph is therefore also a training paragraph.

    Groups are ranked by the sha256 of their alphabetically first topic name. Walking
    that ranking, each group goes to the emptier (by characters; ``test`` on a tie) of
    ``test`` and ``validation`` among those still below :data:`HELD_OUT_FRACTION` of
    the corpus characters, unless the group alone exceeds that budget; everything
    else goes to ``train``. A plain hash threshold would do for thousands of topics,
    but with ~55 groups of very unequal length it leaves a held-out split a few
    kilobytes long; the character budget guarantees each held-out split tens of
    thousands of characters (Python 3.11.7, see :func:`split_summary`).

The built-in model ``builtin:tiny-llama`` is trained on the ``train`` split only.
Nothing is cached: building the splits takes milliseconds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

SPLITS = ("train", "validation", "test")
# Shorter paragraphs are headings or grammar fragments: noise for perplexity.
MIN_DOCUMENT_CHARS = 40
# Share of the (deduplicated) corpus characters each held-out split receives, at least.
HELD_OUT_FRACTION = 0.1

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'`#+.])\1{2,}\s*$")
_BLANK_LINES = re.compile(r"\n\s*\n")


def topic_documents(text: str) -> list[str]:
    """Split one topic's text into whitespace-normalised paragraph documents."""
    documents = []
    for paragraph in _BLANK_LINES.split(text):
        lines = [line for line in paragraph.splitlines() if not _UNDERLINE.match(line)]
        document = " ".join(" ".join(lines).split())
        if len(document) >= MIN_DOCUMENT_CHARS:
            documents.append(document)
    return documents


def topic_groups() -> list[list[str]]:
    """Topics linked by shared paragraphs, each group name-sorted, groups by first name."""
    from pydoc_data.topics import topics

    parent = {name: name for name in topics}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_topic: dict[str, str] = {}
    for name in sorted(topics):
        for document in topic_documents(topics[name]):
            other = first_topic.setdefault(document, name)
            if other != name:
                a, b = sorted((root(other), root(name)))
                parent[b] = a
    groups: dict[str, list[str]] = {}
    for name in sorted(topics):
        if topic_documents(topics[name]):
            groups.setdefault(root(name), []).append(name)
    return sorted(groups.values())


def topic_splits() -> dict[str, list[str]]:
    """The topic names of each split (see the module docstring for the rule), name-sorted."""
    from pydoc_data.topics import topics

    groups = topic_groups()
    sizes = [len(_unique_text(topics[name] for name in group)) for group in groups]
    budget = HELD_OUT_FRACTION * sum(sizes)
    ranked = sorted(range(len(groups)),
                    key=lambda i: hashlib.sha256(groups[i][0].encode()).hexdigest())
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    filled = {"test": 0, "validation": 0}
    for index in ranked:
        # The emptier held-out split takes the next group, so both get several topics
        # (variety) instead of one split swallowing a run of small ones.
        open_splits = [s for s in ("test", "validation") if filled[s] < budget]
        target = "train"
        if open_splits and sizes[index] <= budget:
            target = min(open_splits, key=lambda s: filled[s])
            filled[target] += sizes[index]
        splits[target].extend(groups[index])
    return {split: sorted(names) for split, names in splits.items()}


def pydoc_documents(split: str) -> list[str]:
    """The documents of one split of ``builtin:pydoc``: topics in name order, no repeats.

    ``split`` is ``"train"``, ``"validation"`` or ``"test"``; anything else raises
    ``ValueError``.
    """
    if split not in SPLITS:
        raise ValueError(f"builtin:pydoc has no split {split!r}; splits: {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    return _unique_documents(topics[name] for name in topic_splits()[split])


def split_summary() -> dict[str, dict[str, int]]:
    """Topics, documents and characters per split (for docs and reports)."""
    names = topic_splits()
    summary = {}
    for split in SPLITS:
        documents = pydoc_documents(split)
        summary[split] = {"topics": len(names[split]), "documents": len(documents),
                          "characters": sum(len(d) for d in documents)}
    return summary


def _unique_documents(texts: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in texts:
        for document in topic_documents(text):
            if document not in seen:
                seen.add(document)
                out.append(document)
    return out


def _unique_text(texts: Iterable[str]) -> str:
    return "".join(_unique_documents(texts))
