"""Datasets for evaluation and calibration: samples of one of three kinds, from many formats.

A dataset entry of a spec (plain dict: ``name``, ``source``, ``format``, ``split``,
``config``, ``limit``, ``seed``, ``fields``, ``images``) is resolved in two steps:

1. *Where the records come from* (``source``, inferred from ``name`` when absent):
   ``builtin:NAME`` (``builtin:pydoc``, text shipped with Python), a local file
   (``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.parquet``), or a dataset on the
   Hugging Face hub by id with ``config`` and ``split`` (read through ``datasets``;
   ``HF_HUB_OFFLINE=1`` is honoured).
2. *What a record means* (``format``, registered with :func:`register_format`, inferred
   as ``text`` for ``builtin:`` and ``.txt`` names): a format turns records into
   :class:`Sample` objects of one *kind*:

   - ``text``: running text (``Sample.text``), for perplexity;
   - ``multiple_choice``: ``question``, ``choices``, ``answer`` (index of the correct
     choice), optional ``context`` and ``image``;
   - ``question``: open questions with reference ``answers`` (VQAv2: the ten human
     answers), optional ``context`` and ``image``.

   Generic formats (``text``, ``multiple_choice``, ``question``) read fields named by
   the entry's ``fields`` mapping (dotted paths reach nested values); named formats
   (``wikitext``, ``arc``, ``openbookqa``, ``truthfulqa_mc``, ``scienceqa``, ``vqav2``,
   ``mmmu_pro``) know their layout.

``limit`` keeps a subset: the first ``limit`` documents of a text dataset (running text
is read in order), a uniform sample of ``limit`` samples drawn with ``seed`` (kept in
file order) for the other kinds. Images are file paths (resolved against ``images``,
default: the data file's directory) or, from the hub, decoded images; they are opened
by the evaluators that use them.

Nothing here imports torch; the driver validates entries with :func:`check_dataset`.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("text", "multiple_choice", "question")
SOURCES = ("builtin", "local", "hub")
BUILTIN_DATASETS = {"pydoc": ("train", "validation", "test")}
DEFAULT_SPLIT = "test"
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class DatasetError(ValueError):
    """A dataset that cannot be read as its entry says; the message names what to fix."""


@dataclass(frozen=True)
class Sample:
    """One evaluation item. Which fields are set depends on the dataset's kind."""

    id: str
    text: str | None = None
    question: str | None = None
    choices: tuple[str, ...] | None = None
    answer: int | None = None
    answers: tuple[str, ...] | None = None
    context: str | None = None
    image: Any = None  # a file path (str) or an already decoded image

    def prompt(self) -> str:
        """The text a model is given before its answer: context, then the question."""
        parts = [p for p in (self.context, self.question) if p]
        return "\n".join(parts) if parts else (self.text or "")


@dataclass(frozen=True)
class Dataset:
    """The samples of one dataset entry, in file order."""

    name: str
    kind: str
    format: str
    samples: tuple[Sample, ...]

    @classmethod
    def of_texts(cls, texts: list[str], name: str = "texts") -> Dataset:
        """A text dataset of the given documents (tests, calibration text)."""
        return cls(name=name, kind="text", format="text",
                   samples=tuple(Sample(id=str(i), text=t) for i, t in enumerate(texts)))

    def documents(self) -> list[str]:
        """Plain text of every sample: the text itself, or the prompt of a question."""
        if self.kind == "text":
            return [s.text or "" for s in self.samples]
        return [s.prompt() for s in self.samples]

    @property
    def has_images(self) -> bool:
        return any(s.image is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class DatasetRequest:
    """A dataset entry of a spec, with its source and format resolved."""

    name: str
    source: str
    format: str
    split: str | None = None
    config: str | None = None
    limit: int | None = None
    seed: int = 0
    fields: Mapping[str, str] = field(default_factory=dict)
    images: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.name.removeprefix("local:")).expanduser()

    def image_dir(self) -> Path:
        return Path(self.images).expanduser() if self.images else self.path.parent


Records = list[dict[str, Any]]


@dataclass(frozen=True)
class DatasetFormat:
    """A registered format: how records become samples of one kind."""

    name: str
    kind: str
    description: str
    to_samples: Callable[[Records, DatasetRequest], list[Sample]]
    # Keys a spec may set in ``fields`` (generic formats), with their defaults.
    fields: Mapping[str, str | None] = field(default_factory=dict)
    required_fields: tuple[str, ...] = ()
    # How a .txt file is read: one document per non-empty line, or the whole file.
    text_documents: Callable[[str], list[str]] | None = None


_FORMATS: dict[str, DatasetFormat] = {}


def register_format(name: str, *, kind: str, description: str,
                    fields: Mapping[str, str | None] | None = None,
                    required_fields: tuple[str, ...] = (),
                    text_documents: Callable[[str], list[str]] | None = None):
    """Register ``to_samples(records, request) -> list[Sample]`` as format ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")

    def wrap(to_samples: Callable[[Records, DatasetRequest], list[Sample]]):
        if name in _FORMATS:
            raise ValueError(f"dataset format {name!r} registered twice")
        _FORMATS[name] = DatasetFormat(name, kind, description, to_samples, dict(fields or {}),
                                       required_fields, text_documents)
        return to_samples

    return wrap


def formats() -> dict[str, DatasetFormat]:
    """Every registered format by name."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in ("builtin", "records"):
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(_FORMATS)


# --------------------------------------------------------------------------- resolution


def resolve(entry: Mapping[str, Any], seed: int = 0) -> DatasetRequest:
    """The request for a spec entry; DatasetError when source or format cannot be told."""
    name = str(entry["name"])
    source = entry.get("source")
    if source is None:
        if name.startswith("builtin:"):
            source = "builtin"
        elif name.startswith("hub:"):
            source = "hub"
        elif (name.startswith(("local:", ".", "/", "~"))
              or Path(name).suffix.lower() in FILE_SUFFIXES or Path(name).expanduser().exists()):
            source = "local"
        else:
            raise DatasetError(
                f"cannot tell where dataset {name!r} comes from: use builtin:pydoc, the path of "
                f"a {'/'.join(FILE_SUFFIXES)} file, or set source: hub for a hub dataset id")
    if source not in SOURCES:
        raise DatasetError(f"unknown dataset source {source!r}; sources: {', '.join(SOURCES)}")
    name = name.removeprefix(f"{source}:")
    fmt = entry.get("format")
    known = formats()
    if fmt is None:
        if source == "builtin" or (source == "local" and Path(name).suffix.lower() == ".txt"):
            fmt = "text"
        else:
            raise DatasetError(
                f"dataset {name!r}: set format, one of {', '.join(sorted(known))} (for a generic "
                "format, fields maps its parts to the record's keys)")
    if fmt not in known:
        raise DatasetError(f"unknown dataset format {fmt!r}; formats: {', '.join(sorted(known))}")
    fields = dict(entry.get("fields") or {})
    allowed = known[fmt].fields
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        hint = (f"format {fmt} maps {', '.join(sorted(allowed))}" if allowed
                else f"format {fmt} has a fixed layout and takes no fields")
        raise DatasetError(f"fields: unknown key {unknown[0]!r}; {hint}")
    entry_seed = entry.get("seed")
    return DatasetRequest(
        name=name, source=source, format=fmt, split=entry.get("split"),
        config=entry.get("config"), limit=entry.get("limit"),
        seed=seed if entry_seed is None else int(entry_seed), fields=fields,
        images=entry.get("images"))


def dataset_kind(entry: Mapping[str, Any]) -> str:
    """The kind of samples an entry yields (no file is read)."""
    return formats()[resolve(entry).format].kind


@dataclass(frozen=True)
class DatasetCheck:
    ok: bool
    message: str = ""
    # Whether the samples have images, when the check read them (local files); else None.
    has_images: bool | None = None


def check_dataset(entry: Mapping[str, Any] | str, split: str | None = None) -> DatasetCheck:
    """Driver-side check that an entry can be read: source, format, fields, the records.

    Local files are read and converted in full (they are small; a broken record is then a
    validation error rather than a failed trial); hub datasets are checked for presence in
    the local cache when ``HF_HUB_OFFLINE=1``.
    """
    if isinstance(entry, str):
        entry = {"name": entry, "split": split}
    has_images: bool | None = None
    try:
        request = resolve(entry)
        if request.source == "builtin":
            _check_builtin(request)
            has_images = False
        elif request.source == "local":
            from workers.data.records import check_local_file

            check_local_file(request)
            has_images = load_dataset(entry).has_images
        else:
            from workers.data.records import check_hub_dataset

            check_hub_dataset(request)
    except DatasetError as exc:
        return DatasetCheck(False, str(exc))
    return DatasetCheck(True, has_images=has_images)


def _check_builtin(request: DatasetRequest) -> None:
    if request.name not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown built-in dataset {request.name!r}; built-ins: "
                           + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
    splits = BUILTIN_DATASETS[request.name]
    if request.split is not None and request.split not in splits:
        raise DatasetError(f"builtin:{request.name} has no split {request.split!r}; splits: "
                           f"{', '.join(splits)}")


# --------------------------------------------------------------------------- loading


def load_dataset(entry: Mapping[str, Any], seed: int = 0) -> Dataset:
    """The samples of a spec entry (``seed``: the sweep's, unless the entry sets one)."""
    from workers.data import records as records_module

    request = resolve(entry, seed)
    fmt = formats()[request.format]
    if request.source == "builtin":
        _check_builtin(request)
        from workers.data.builtin import pydoc_documents

        samples = [Sample(id=str(i), text=t)
                   for i, t in enumerate(pydoc_documents(request.split or DEFAULT_SPLIT))]
    elif request.source == "local" and request.path.suffix.lower() == ".txt":
        if fmt.text_documents is None:
            raise DatasetError(f"format {fmt.name} reads records, not a .txt file; use "
                               "format: text (or wikitext), or a .jsonl/.csv/.parquet file")
        text = records_module.read_text(request.path)
        samples = [Sample(id=str(i), text=t) for i, t in enumerate(fmt.text_documents(text))]
    else:
        records = (records_module.read_local(request) if request.source == "local"
                   else records_module.read_hub(request))
        samples = fmt.to_samples(records, request)
    samples = _subset(samples, fmt.kind, request.limit, request.seed)
    if not samples:
        raise DatasetError(f"dataset {request.name!r} has no samples")
    return Dataset(name=str(entry["name"]), kind=fmt.kind, format=fmt.name,
                   samples=tuple(samples))


def _subset(samples: list[Sample], kind: str, limit: int | None, seed: int) -> list[Sample]:
    if limit is None or limit >= len(samples):
        return samples
    if kind == "text":
        return samples[:limit]  # running text: perplexity depends on the order
    chosen = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in chosen]


def load_documents(name: str, split: str | None = None, limit: int | None = None,
                   seed: int = 0) -> list[str]:
    """The text documents of a text dataset named like a spec's ``name`` (calibration)."""
    data = load_dataset({"name": name, "split": split, "limit": limit}, seed)
    return data.documents()


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
