"""Published numbers to reproduce: ``sweeps/references/*.yaml``, one file per source.

A reference file cites its source once and lists the numbers it reports::

    source:
      title: "SliceGPT: Compress Large Language Models by Deleting Rows and Columns"
      short: SliceGPT                 # optional: the name the table shows
      arxiv: "2401.15024"             # a paper needs arxiv or venue (or both)
      venue: ICLR 2024
    entries:
      - table: Table 1
        model: meta-llama/Llama-2-7b-hf
        method: {name: reduce_hidden, params: {basis: pca}}   # or just a name, e.g. none
        rate: 0.25                    # our rate units (a fraction); null: baseline/rateless
        dataset: Salesforce/wikitext  # the spec's datasets[].name
        metric: perplexity            # a stored metric, or score / perf_norm / speed_norm
        value: 7.24
        tolerance: 5%                 # absolute in metric units (0.05) or relative ("5%")

Unpublished sources (lab notes, a competition team's results table) are cited as what
they are — ``kind: lab_notes`` with a ``location`` saying where they are kept — instead of
an invented arXiv id. Every entry must end up with a cited source (its own ``source``,
which replaces the file's, or the file's): a title, plus arxiv or venue for a paper, or a
location for lab notes.

Files are read as data only (safe YAML, duplicate keys refused, with the spec's loader and
size limits), and every problem is reported at once, one line each, naming the file, the
line, the entry and the field. Method names unknown to our registry are allowed (published
methods we do not implement, such as SparseGPT); such entries never match a trial.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import BadInput, SpecError, did_you_mean

DEFAULT_REFERENCES = Path("sweeps") / "references"
REFERENCE_SUFFIXES = (".yaml", ".yml")
BASELINE_METHOD = "none"
# arXiv identifiers: new style (2306.11695, optionally v2) and old style (hep-th/9901001).
_ARXIV = re.compile(r"^(\d{4}\.\d{4,5}|[a-z\-]+(\.[A-Z]{2})?/\d{7})(v\d+)?$")
_PERCENT = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*%\s*$")


class BadReference(BadInput):
    """One or more problems in reference files; each line names file, line, entry, field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    # strict: a value written as "5.12" (text) is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class Source(_Strict):
    """Who published the numbers, cited well enough for a reader to find them."""

    title: str = Field(min_length=1)
    short: str | None = Field(default=None, min_length=1)
    """A short name for tables (``Wanda``); the title when unset."""
    kind: Literal["paper", "lab_notes"] = "paper"
    arxiv: str | None = None
    venue: str | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, min_length=1)
    location: str | None = Field(default=None, min_length=1)
    """Where unpublished lab notes are kept (a path, a wiki page, a notebook)."""

    @field_validator("arxiv", mode="before")
    @classmethod
    def _arxiv_as_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Unquoted, YAML reads 2306.11690 as the number 2306.1169: the id is lost.
            raise ValueError(f"quote the arXiv id (arxiv: \"2306.11695\"): unquoted, YAML read "
                             f"it as the number {value!r}, which loses trailing zeros")
        return value

    @field_validator("arxiv")
    @classmethod
    def _arxiv_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().removeprefix("arXiv:").removeprefix("arxiv:")
        if not _ARXIV.match(value):
            raise ValueError(f"{value!r} is not an arXiv id such as \"2306.11695\"")
        return value

    @model_validator(mode="after")
    def _cited(self) -> Source:
        if self.kind == "paper" and not (self.arxiv or self.venue):
            raise ValueError("arxiv or venue is required for a paper (e.g. arxiv: "
                             "\"2306.11695\" or venue: ICLR 2024); for unpublished notes set "
                             "kind: lab_notes and location")
        if self.kind == "lab_notes" and not (self.location or self.url):
            raise ValueError("location (or url) is required for lab notes: say where they are "
                             "kept")
        return self

    def cite(self) -> str:
        """A short citation for tables: ``SliceGPT (ICLR 2024, arXiv 2401.15024)``."""
        where = [w for w in (self.venue, self.arxiv and f"arXiv {self.arxiv}") if w]
        if self.kind == "lab_notes":
            where.insert(0, "lab notes")
        name = self.short or self.title
        return f"{name} ({', '.join(where)})" if where else name


class MethodRef(_Strict):
    """A method with the parameters a matching trial must have."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


def _method_form(value: Any) -> str:
    return "method-name" if isinstance(value, str) else "method-ref"


# A name or a mapping; the discriminator reports a mistake in one form only, not in both.
_MethodField = Annotated[
    Annotated[str, Field(min_length=1), Tag("method-name")]
    | Annotated[MethodRef, Tag("method-ref")],
    Discriminator(_method_form),
]
_UNION_TAGS = ("method-name", "method-ref")


class _Entry(_Strict):
    """One published number, as written in the file."""

    table: str | None = Field(default=None, min_length=1)
    model: str = Field(min_length=1)
    method: _MethodField
    rate: float | None = None
    dataset: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    value: float
    tolerance: float | str
    notes: str | None = None
    source: dict[str, Any] | None = None  # validated as the entry's effective Source

    @field_validator("rate")
    @classmethod
    def _fraction(cls, rate: float | None) -> float | None:
        if rate is not None and not 0 <= rate <= 1:
            hint = f" ({rate:g} % is {rate / 100:g})" if 1 < rate <= 100 else ""
            raise ValueError(f"rate is a fraction in [0, 1], in our methods' units{hint}")
        return rate

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value

    @field_validator("tolerance", mode="before")
    @classmethod
    def _number_or_text(cls, tolerance: Any) -> Any:
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float | str):
            raise ValueError("give a number (absolute, in the metric's units) or a "
                             "percentage of the paper's value such as \"2%\"")
        return tolerance

    @field_validator("tolerance")
    @classmethod
    def _tolerance(cls, tolerance: float | str) -> float | str:
        if isinstance(tolerance, str):
            if not _PERCENT.match(tolerance):
                raise ValueError(f"tolerance {tolerance!r}: give a number (absolute, in the "
                                 "metric's units) or a percentage of the paper's value such "
                                 "as \"2%\"")
            return tolerance.strip()
        if not math.isfinite(tolerance) or tolerance < 0:
            raise ValueError("tolerance must be a finite number ≥ 0")
        return tolerance


class _File(_Strict):
    source: dict[str, Any] | None = None  # validated per entry: the effective source counts
    entries: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class ReferenceEntry:
    """One published number with everything needed to find and judge our reproduction.

    ``tolerance`` is absolute (metric units) or None when ``tolerance_pct`` (percent of
    ``value``) is set instead.
    """

    file: str
    index: int
    line: int
    source: Source
    table: str | None
    model: str
    method: str
    params: dict[str, Any]
    rate: float | None
    dataset: str
    metric: str
    value: float
    tolerance: float | None
    tolerance_pct: float | None
    notes: str | None = None
    known_method: bool = field(default=True, compare=False)

    @property
    def tolerance_abs(self) -> float:
        """The tolerance in metric units (a percentage applies to the paper's value)."""
        if self.tolerance is not None:
            return self.tolerance
        assert self.tolerance_pct is not None
        return abs(self.value) * self.tolerance_pct / 100.0

    @property
    def tolerance_text(self) -> str:
        """The tolerance as written: ``0.05`` or ``2%``."""
        if self.tolerance is not None:
            return f"{self.tolerance:g}"
        return f"{self.tolerance_pct:g}%"

    @property
    def method_label(self) -> str:
        """``reduce_hidden (basis=pca)``: the method with the params a trial must have."""
        if not self.params:
            return self.method
        shown = ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.params.items()))
        return f"{self.method} ({shown})"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- loading


def reference_files(paths: Iterable[str | Path]) -> list[Path]:
    """The reference files ``paths`` names: files as given, directories' ``*.yaml`` /
    ``*.yml`` (not recursive, sorted by name); each file once, in order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir()
                            if p.suffix in REFERENCE_SUFFIXES and p.is_file())
            if not inside:
                raise BadInput(f"references: no reference file (*.yaml) in directory {path}")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise BadInput(f"references: {path} is neither a file nor a directory")
        else:
            raise BadInput(f"references: {path} does not exist; give a reference file or a "
                           "directory of them (see sweeps/references/)")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_references(paths: Sequence[str | Path] | None = None) -> list[ReferenceEntry]:
    """Every entry of the reference files ``paths`` names (default: ``sweeps/references``
    under the current directory), in file order.

    Raises :class:`BadReference` listing every problem of every file (one line each), or
    :class:`BadInput` for a path that does not exist.
    """
    files = reference_files([DEFAULT_REFERENCES] if paths is None else paths)
    entries: list[ReferenceEntry] = []
    problems: list[str] = []
    for path in files:
        try:
            entries.extend(load_reference_file(path))
        except BadReference as exc:
            problems.extend(exc.problems)
    if problems:
        raise BadReference(problems)
    return entries


def load_reference_file(path: str | Path) -> list[ReferenceEntry]:
    """The entries of one reference file; :class:`BadReference` lists its problems."""
    from orchestrator.spec import MAX_SPEC_BYTES

    path = Path(path)
    try:
        with path.open("rb") as handle:  # never more than the limit, whatever its size
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise BadReference([f"{path}: cannot read reference file: {exc.strerror}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise BadReference([f"{path}: a reference file must be under {MAX_SPEC_BYTES:,} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadReference([f"{path}: not UTF-8 text"]) from None
    return parse_references(text, str(path))


def _read_yaml(text: str, file: str) -> tuple[Any, dict[tuple, int]]:
    """(data, line of every YAML path), read as a spec is read (``spec.read_yaml``)."""
    from orchestrator.spec import read_yaml

    try:
        return read_yaml(text, file)
    except SpecError as exc:
        raise BadReference([f"{file}: {p}" for p in exc.problems]) from None


@dataclass(frozen=True)
class _Problem:
    """A problem at YAML path ``loc``; its line is that of ``line_at`` (default ``loc``)."""

    loc: tuple
    message: str
    line_at: tuple | None = None


def parse_references(text: str, file: str = "<references>") -> list[ReferenceEntry]:
    """The entries of reference-file text ``text`` (``file`` names it in errors)."""
    data, lines = _read_yaml(text, file)
    if not isinstance(data, dict):
        raise BadReference([f"{file}: a reference file is a YAML mapping with source and "
                            "entries"])
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise BadReference(_located(file, [_Problem(tuple(e["loc"]), _message(e, _File))
                                           for e in exc.errors()], lines)) from None

    file_source: Source | None = None
    file_source_problems: list[_Problem] = []
    if parsed.source is not None:
        try:
            file_source = Source.model_validate(parsed.source)
        except ValidationError as exc:
            file_source_problems = [_Problem(("source", *e["loc"]), _message(e, Source))
                                    for e in exc.errors()]

    problems: list[_Problem] = []
    entries: list[ReferenceEntry] = []
    users_of_file_source: list[int] = []
    for index, raw in enumerate(parsed.entries):
        at = ("entries", index)
        if not isinstance(raw, dict):
            problems.append(_Problem(at, "an entry is a mapping (table, model, method, rate, "
                                         "dataset, metric, value, tolerance)"))
            continue
        count = len(problems)
        entry: _Entry | None = None
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_Problem((*at, *e["loc"]), _message(e, _Entry))
                            for e in exc.errors())
        problems.extend(_registry_problems(raw, at))
        source = file_source
        if isinstance(raw.get("source"), dict):
            try:
                source = Source.model_validate(raw["source"])
            except ValidationError as exc:
                problems.extend(_Problem((*at, "source", *e["loc"]), _message(e, Source))
                                for e in exc.errors())
        elif "source" not in raw and parsed.source is None:
            problems.append(_Problem((*at, "source"), "no source: give the file a source "
                                                      "(title, arxiv or venue) or this entry "
                                                      "its own"))
        elif "source" not in raw and file_source is None:
            users_of_file_source.append(index)
        if len(problems) == count and entry is not None and source is not None:
            entries.append(_entry(entry, source, file, index, lines.get(at, 0)))

    if users_of_file_source:
        # One line per problem of the shared source, naming the first entry relying on it.
        first, others = users_of_file_source[0], len(users_of_file_source) - 1
        also = f" (and {others} more entr{'y' if others == 1 else 'ies'})" if others else ""
        for problem in file_source_problems:
            problems.append(_Problem(
                ("entries", first, *problem.loc),
                f"{problem.message} — in the file's source, which this entry uses{also}",
                line_at=problem.loc))
    if problems:
        raise BadReference(_located(file, problems, lines))
    return entries


def _registry_problems(raw: dict[str, Any], at: tuple) -> list[_Problem]:
    """What pydantic cannot check alone: the method's rate and parameter names against
    our registry (unknown methods are allowed), and the metric's name."""
    from orchestrator.queries import COMPUTED_METRICS
    from workers.evaluators import metric_directions
    from workers.methods import methods

    problems: list[_Problem] = []
    method_raw = raw.get("method")
    if isinstance(method_raw, str):
        method, params = method_raw, {}
    elif isinstance(method_raw, dict) and isinstance(method_raw.get("name"), str):
        method = method_raw["name"]
        params = method_raw.get("params") if isinstance(method_raw.get("params"), dict) else {}
    else:
        method, params = None, {}
    rate = raw.get("rate")
    info = methods().get(method) if method is not None else None
    if method == BASELINE_METHOD:
        if rate is not None:
            problems.append(_Problem((*at, "rate"), "the baseline (method none) has no rate: "
                                                    "write rate: null or leave it out"))
        if params:
            problems.append(_Problem((*at, "method", "params"),
                                     "the baseline (method none) takes no params"))
    elif info is not None:
        allowed = [f.alias or n for n, f in info.config.model_fields.items()]
        for name in params:
            if name not in allowed:
                problems.append(_Problem(
                    (*at, "method", "params", name),
                    f"not a parameter of method {method}{did_you_mean(str(name), allowed)}; "
                    f"its parameters: {', '.join(allowed) or 'none'}"))
        if info.uses_rate and rate is None:
            problems.append(_Problem((*at, "rate"), f"method {method} needs a rate "
                                                    f"({info.rate_meaning})"))
        if not info.uses_rate and rate is not None:
            problems.append(_Problem((*at, "rate"), f"method {method} has no rate: write "
                                                    "rate: null or leave it out"))
    metric = raw.get("metric")
    known_metrics = set(metric_directions()) | set(COMPUTED_METRICS)
    if isinstance(metric, str) and metric and metric not in known_metrics:
        problems.append(_Problem((*at, "metric"), f"unknown metric {metric!r}"
                                                  f"{did_you_mean(metric, known_metrics)}; "
                                                  "give a metric our evaluators store, or "
                                                  "score, perf_norm, speed_norm"))
    return problems


def _entry(entry: _Entry, source: Source, file: str, index: int, line: int) -> ReferenceEntry:
    """The loaded form of a valid entry."""
    from workers.methods import methods

    method, params = ((entry.method, {}) if isinstance(entry.method, str)
                      else (entry.method.name, dict(entry.method.params)))
    tolerance_pct = None
    tolerance: float | None
    if isinstance(entry.tolerance, str):
        tolerance, tolerance_pct = None, float(entry.tolerance.rstrip().rstrip("%"))
    else:
        tolerance = float(entry.tolerance)
    return ReferenceEntry(
        file=file, index=index, line=line, source=source, table=entry.table,
        model=entry.model, method=method, params=params, rate=entry.rate,
        dataset=entry.dataset, metric=entry.metric, value=float(entry.value),
        tolerance=tolerance, tolerance_pct=tolerance_pct, notes=entry.notes,
        known_method=method == BASELINE_METHOD or method in methods(),
    )


def _message(err: Any, model: type[BaseModel]) -> str:
    from orchestrator.spec import _pydantic_message

    loc = tuple(err["loc"])
    if err["type"] == "missing" and loc and loc[-1] == "tolerance":
        return ("required field is missing: how far ours may be from the paper, absolute "
                "(0.05) or relative (\"2%\")")
    if loc == ("method", "method-ref") and err["type"] == "model_type":
        return "give a method name, or {name: ..., params: {...}}"
    if loc[:2] == ("method", "method-ref"):
        return _pydantic_message({**err, "loc": loc[2:]}, MethodRef)
    return _pydantic_message(err, model)


def _located(file: str, problems: list[_Problem], lines: dict[tuple, int]) -> list[str]:
    """``file: line N: entries[2].tolerance: message``, in line order, each once."""
    from orchestrator.spec import format_path

    def line_of(loc: tuple) -> int:
        for cut in range(len(loc), -1, -1):  # a missing key: its nearest parent's line
            if loc[:cut] in lines:
                return lines[loc[:cut]]
        return 0

    located: list[tuple[int, str]] = []
    for problem in problems:
        loc = tuple(p for p in problem.loc if p not in _UNION_TAGS)
        line = line_of(problem.line_at if problem.line_at is not None else problem.loc)
        text = f"{file}: " + (f"line {line}: " if line else "") + \
            f"{format_path(loc)}: {problem.message}"
        if all(text != seen for _, seen in located):
            located.append((line, text))
    return [text for _, text in sorted(located, key=lambda item: item[0])]
