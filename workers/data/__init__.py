"""Datasets for evaluation and calibration.

A dataset name in a spec is resolved by its form:

- ``builtin:pydoc`` — the held-out split of the Python language reference text that
  ships with every Python installation (the built-in model's training corpus is the
  ``train`` split of the same text);
- a path to a ``.txt`` file — plain text, one document per non-empty line.

``load_documents`` returns plain strings; evaluators tokenize them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_DATASETS = {"pydoc": ("train", "validation", "test")}
DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class DatasetCheck:
    ok: bool
    message: str = ""


def check_dataset(name: str, split: str | None) -> DatasetCheck:
    """Cheap driver-side check that a dataset can be read."""
    if name.startswith("builtin:"):
        short = name.removeprefix("builtin:")
        if short not in BUILTIN_DATASETS:
            return DatasetCheck(False, f"unknown built-in dataset {short!r}; built-ins: "
                                       + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
        splits = BUILTIN_DATASETS[short]
        if split is not None and split not in splits:
            return DatasetCheck(False,
                                f"{name} has no split {split!r}; splits: {', '.join(splits)}")
        return DatasetCheck(True)
    path = Path(name).expanduser()
    if path.suffix == ".txt" or path.exists():
        if path.is_dir():
            return DatasetCheck(False, f"dataset {name} is a directory; give the path of a "
                                       ".txt file")
        if not path.is_file():
            return DatasetCheck(False, f"dataset file {name} does not exist")
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            return DatasetCheck(False, f"dataset file {name} is not readable: {exc.strerror}")
        return DatasetCheck(True)
    return DatasetCheck(False,
                        f"unknown dataset {name!r}: use builtin:pydoc or a path to a .txt file")


def load_documents(name: str, split: str | None = None, limit: int | None = None,
                   seed: int = 0) -> list[str]:
    """The documents of a dataset split, in order; ``limit`` keeps the first ``limit``.

    ``seed`` is accepted for subset sampling by loaders that shuffle; text order is
    kept because perplexity over running text depends on it.
    """
    del seed  # text datasets keep their order
    if name.startswith("builtin:"):
        from workers.data.builtin import pydoc_documents

        docs = pydoc_documents(split or DEFAULT_SPLIT)
    else:
        text = Path(name).expanduser().read_text(encoding="utf-8")
        docs = [line for line in text.splitlines() if line.strip()]
    if limit is not None:
        docs = docs[:limit]
    return docs


def token_stream(tokenizer: Any, documents: list[str], max_tokens: int | None = None) -> list[int]:
    """Token ids of the documents, each preceded by BOS (when the tokenizer has one).

    With ``max_tokens``, tokenizing stops once that many ids are collected (the result
    may be longer; callers slice), so a consumer of a prefix never tokenizes a whole corpus.
    """
    ids: list[int] = []
    for doc in documents:
        if tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
        ids.extend(tokenizer.encode(doc))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids
