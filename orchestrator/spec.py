"""The sweep spec: pydantic models, loading with YAML-path errors, and grid expansion.

A spec is data: it is read with ``yaml.safe_load`` semantics and nothing in it is
imported or evaluated. ``load`` reports every problem at once, each with its YAML path
(and line), so a researcher fixes a spec in one pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import SpecError, did_you_mean

MAX_TRIALS = 10_000
MAX_SPEC_BYTES = 1_000_000
# YAML aliases share nodes; a spec whose aliases expand past this many values is refused
# before anything walks it (a 1 KB "billion laughs" would otherwise take minutes and GBs).
MAX_SPEC_NODES = 100_000
BASELINE_METHOD = "none"


class _Strict(BaseModel):
    # strict: a rate written as "0.5" or true is a mistake to report, not a value to coerce
    # (coercion would also hide it from the range and duplicate checks).
    model_config = ConfigDict(extra="forbid", strict=True)
    # The fields of the first release: always part of trial keys. A field added later is in
    # a key only when set to something other than its default, so adding a field never
    # changes the keys of stored trials (None: every field is always in the key).
    _first_key_fields: ClassVar[frozenset[str] | None] = None


def key_dict(entry: _Strict) -> dict[str, Any]:
    """The part of ``entry`` that identifies what a trial measures (see ``_Strict``)."""
    out: dict[str, Any] = {}
    first = entry._first_key_fields
    dumped = entry.model_dump(mode="json", by_alias=True)
    for name, info in type(entry).model_fields.items():
        value = getattr(entry, name)
        key = info.alias or name
        rendered = key_dict(value) if isinstance(value, _Strict) else dumped[key]
        if first is not None and name not in first:
            default = info.get_default(call_default_factory=True)
            if value == default:
                continue
        out[key] = rendered
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys may be overridden by explicit ones
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}); a later one "
                    "would silently replace it", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as exc:  # e.g. more digits than Python converts
            raise yaml.constructor.ConstructorError(
                None, None, f"integer {node.value[:20]}… cannot be read: "
                f"{str(exc).split(':')[0].lower()}", node.start_mark) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


class ModelEntry(_Strict):
    """One base model: a built-in name, a ``llama2c:`` checkpoint, a local directory or a hub id."""

    _first_key_fields = frozenset({"id", "source", "dtype", "trust_remote_code"})

    id: str = Field(min_length=1)
    source: Literal["builtin", "llama2c", "local", "hub"] | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    trust_remote_code: bool = False
    # Hub branch, tag or commit.
    revision: str | None = Field(default=None, min_length=1)
    # transformers' attention kernel (eager, sdpa, flash_attention_2, …); its default if unset.
    attn_implementation: str | None = Field(default=None, min_length=1)
    # auto: the trial's GPU when it has one, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # config.model_type, for a model whose config cannot be read here (a hub id not in the
    # local cache): lets validation check method and evaluator support; checked at load.
    model_type: str | None = Field(default=None, min_length=1)


class MethodEntry(_Strict):
    """One compression method with the rates to sweep and its parameters (a method
    without a rate, such as a dtype cast, takes no ``rates`` and gives one trial)."""

    name: str = Field(min_length=1)
    rates: list[float] | None = Field(default=None, min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class DatasetEntry(_Strict):
    """One evaluation dataset: where its records are, what they mean, which subset."""

    _first_key_fields = frozenset({"name", "split", "limit"})

    name: str = Field(min_length=1)
    source: Literal["builtin", "local", "hub"] | None = None
    format: str | None = Field(default=None, min_length=1)
    split: str | None = None
    config: str | None = None
    limit: int | None = Field(default=None, gt=0)
    # Seed of the subset ``limit`` draws from a question dataset; the sweep's seed if unset.
    seed: int | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    images: str | None = None
    # Evaluators for this dataset instead of ``evaluation.metrics``.
    metrics: list[str] | None = Field(default=None, min_length=1)


class SpeedSettings(_Strict):
    """How the speed evaluator measures: warm-up runs, timed repeats (median), shapes."""

    _first_key_fields = frozenset({"warmup", "repeats", "prompt_length", "new_tokens",
                                   "batch_size"})

    warmup: int = Field(default=2, ge=0)
    repeats: int = Field(default=5, ge=1)
    prompt_length: int = Field(default=64, ge=1)
    new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=1, ge=1)
    # Real prompts: the first ``prompts`` samples of the dataset at their own length (cut to
    # ``prompt_length``), each generating ``new_tokens``: latency percentiles, samples/s and
    # tokens/s. 0 measures only the fixed-shape protocol above.
    prompts: int = Field(default=16, ge=0)


def _check_template(template: str) -> str:
    """A prompt template may only name the placeholders the evaluators fill."""
    import string

    from workers.evaluators._questions import PLACEHOLDERS

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
                         ) from None
    for name in names:
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}}; use "
                             + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
    return template


class _PromptSettings(_Strict):
    """Settings of an evaluator that asks questions through a prompt template."""

    template: str = Field(default="{prompt}", min_length=1)

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, template: str) -> str:
        return _check_template(template)


class MultipleChoiceSettings(_PromptSettings):
    """How the multiple_choice evaluator builds its requests (see its module docstring)."""

    delimiter: str = " "
    # Longest input; the model's position limit when unset.
    max_length: int | None = Field(default=None, ge=2)


class GenerationSettings(_PromptSettings):
    """How the generation evaluator prompts and stops (see its module docstring)."""

    max_new_tokens: int = Field(default=16, ge=1, le=4096)
    max_prompt_tokens: int = Field(default=512, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])


class ModalityDominanceSettings(_PromptSettings):
    """How modality_dominance measures (see its module docstring)."""

    new_tokens: int = Field(default=8, ge=1, le=1024)
    # Where the early/middle/late bands meet, as fractions of the depth.
    bands: list[float] = Field(default_factory=lambda: [1 / 3, 2 / 3], min_length=2,
                               max_length=2)

    @field_validator("bands")
    @classmethod
    def _two_increasing_fractions(cls, bands: list[float]) -> list[float]:
        if not 0 < bands[0] < bands[1] < 1:
            raise ValueError("bands must be two increasing fractions in (0, 1), e.g. [0.33, 0.67]")
        return bands


class EvaluationSettings(_Strict):
    """What every trial measures and how."""

    _first_key_fields = frozenset({"metrics", "batch_size", "max_length", "stride",
                                   "probe_length", "speed"})

    metrics: list[str] = Field(default_factory=lambda: ["perplexity", "speed"], min_length=1)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=128, ge=2)
    stride: int | None = Field(default=None, ge=1)
    probe_length: int = Field(default=32, ge=2)
    speed: SpeedSettings = Field(default_factory=SpeedSettings)
    multiple_choice: MultipleChoiceSettings = Field(default_factory=MultipleChoiceSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    modality_dominance: ModalityDominanceSettings = Field(
        default_factory=ModalityDominanceSettings)
    # A limit, not a setting of the measurement: it is left out of the trial key.
    timeout_s: float | None = Field(default=None, gt=0)


class Resources(_Strict):
    """Per-trial resources; ``gpus_per_trial`` defaults to 1 on a cluster with GPUs, else 0.

    A whole number of GPUs is the trial's alone; a fraction below 1 shares one GPU with
    other trials at the same time, without isolation (see ``orchestrator.placement``).
    """

    gpus_per_trial: float | None = Field(default=None, ge=0)
    cpus_per_trial: float = Field(default=1, gt=0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_above_one(cls, value: float | None) -> float | None:
        # Ray hands out whole GPUs above one; a fraction below one shares a GPU.
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"{value:g} GPUs cannot be given to one trial: use a whole "
                             "number (1, 2, …), or a fraction below 1 to share a GPU")
        if value is not None and 0 < value < 1 and round(value, 4) != value:
            raise ValueError(f"{value!r} has more than 4 decimals, Ray's resolution for "
                             "GPU fractions; round it (e.g. 0.25, 0.3333)")
        return value


class ScoreSettings(_Strict):
    """Score = max(w·PerfNorm + (1−w)·SpeedNorm, 0) with PerfNorm from ``quality_metric``."""

    quality_metric: str = "perplexity"
    weight: float = Field(default=0.5, ge=0, le=1)


class SweepSpec(_Strict):
    """A whole sweep: models × methods × rates × datasets, plus one baseline per model × dataset."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    models: list[ModelEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(default_factory=list)
    datasets: list[DatasetEntry] = Field(min_length=1)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    # Attempts per trial within one launch: a failed or timed-out trial is retried until
    # it has had this many (failures that would repeat, like "no effect", are not retried).
    max_attempts: int = Field(default=1, ge=1, le=20)
    trial_timeout_s: float | None = Field(default=None, gt=0)
    seed: int = 0
    score: ScoreSettings = Field(default_factory=ScoreSettings)


@dataclass(frozen=True)
class TrialSpec:
    """One trial of the grid; ``config`` is the plain dict a worker receives."""

    trial_key: str
    position: int
    model: str
    method: str
    rate: float | None
    dataset: str
    params: dict[str, Any]
    is_baseline: bool
    config: dict[str, Any]

    def row(self) -> dict[str, Any]:
        """The fields the database stores for this trial."""
        return {
            "trial_key": self.trial_key, "position": self.position, "model": self.model,
            "method": self.method, "rate": self.rate, "dataset": self.dataset,
            "params": self.params, "config": self.config, "is_baseline": self.is_baseline,
        }


# --------------------------------------------------------------------------- loading


def load(path: str | Path, check_sources: bool = True) -> SweepSpec:
    """Read and validate a spec file; raise :class:`SpecError` listing every problem."""
    path = Path(path)
    try:
        if not path.is_file():
            if not path.exists():
                raise SpecError([f"spec file not found: {path}"])
            raise SpecError(["not a regular file; give the path of a YAML spec"],
                            source=str(path))
        size = path.stat().st_size
        with path.open("rb") as handle:  # never more than the limit, whatever stat said
            raw_bytes = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"cannot read spec file {path}: {exc.strerror}"]) from None
    if len(raw_bytes) > MAX_SPEC_BYTES:
        raise SpecError([f"spec is {max(size, len(raw_bytes)):,} bytes; a sweep spec must be "
                         f"under {MAX_SPEC_BYTES:,} bytes"], source=str(path))
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(["spec is not UTF-8 text"], source=str(path)) from None
    return loads(text, source=str(path), check_sources=check_sources)


def read_yaml(text: str, source: str = "<spec>") -> tuple[Any, dict[tuple, int]]:
    """``(data, line of every YAML path)`` of a YAML document, read safely: duplicate keys
    refused, depth and alias expansion bounded. Raises :class:`SpecError` (one line per
    problem, with its line) for anything else. Spec and reference files are read by it."""
    try:
        _check_depth(text)
        # Composed once: the node graph gives the lines, its size check, and the data.
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            _check_size(node)
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc, text)], source=source) from None
    except SpecError as exc:
        raise SpecError(exc.problems, source=source) from None
    except RecursionError:  # pragma: no cover - _check_depth refuses deep specs first
        raise SpecError(["invalid YAML: the spec nests too deeply"], source=source) from None
    return data, _line_index(node)


def loads(text: str, source: str = "<spec>", check_sources: bool = True) -> SweepSpec:
    """Validate spec text; ``check_sources`` also checks that models and datasets exist."""
    data, lines = read_yaml(text, source)
    if not isinstance(data, dict):
        raise SpecError(["the spec must be a YAML mapping with name, models, methods, "
                         "datasets"], source=source)
    problems: list[tuple[tuple, str]] = []
    spec: SweepSpec | None = None
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append((tuple(err["loc"]), _pydantic_message(err, SweepSpec)))
    problems.extend(_semantic_problems(data, check_sources))
    if problems:
        raise SpecError(_format(problems, lines), source=source)
    assert spec is not None
    total = grid_size(spec)
    if total > MAX_TRIALS:
        raise SpecError([f"the grid has {total:,} trials; at most {MAX_TRIALS:,} per sweep — "
                         "split it into several specs"], source=source)
    return spec


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One located line for a YAML error (reader errors carry a position, not a mark)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(exc, "position", None), int):
        line = text.count("\n", 0, exc.position) + 1  # type: ignore[attr-defined]
    else:
        line = None
    if isinstance(exc, yaml.reader.ReaderError):
        problem = f"character {exc.character!r} is not allowed in YAML"
    else:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {line}: invalid YAML: {problem}" if line else f"invalid YAML: {problem}"


MAX_SPEC_DEPTH = 64


def _check_depth(text: str) -> None:
    """Refuse deeply nested YAML before composing it (composing recurses per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # an event stream: no recursion
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_SPEC_DEPTH:
                raise SpecError([f"line {event.start_mark.line + 1}: invalid YAML: nested more "
                                 f"than {MAX_SPEC_DEPTH} levels deep"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_size(node: yaml.Node | None) -> None:
    """Refuse self-referencing aliases and specs whose aliases expand past MAX_SPEC_NODES."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise SpecError([f"line {n.start_mark.line + 1}: invalid YAML: an alias refers to "
                             "the value that contains it"])
        visiting.add(key)
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(item) for item in n.value)
        visiting.discard(key)
        sizes[key] = min(total, MAX_SPEC_NODES + 1)
        if total > MAX_SPEC_NODES:
            raise SpecError([f"line {n.start_mark.line + 1}: invalid YAML: the spec expands to "
                             f"more than {MAX_SPEC_NODES:,} values (YAML aliases?)"])
        return sizes[key]

    if node is not None:
        size(node)


def _pydantic_message(err: dict[str, Any], model: type[BaseModel] | None = None) -> str:
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, tuple(err["loc"][:-1])) if model is not None else []
        name = str(err["loc"][-1])
        hint = did_you_mean(name, allowed)
        return f"unknown field{hint}" + (f"; allowed: {', '.join(allowed)}" if allowed
                                          and not hint else "")
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "value_error" and "error" in (err.get("ctx") or {}):
        return str(err["ctx"]["error"])  # a validator's own sentence, without pydantic's prefix
    return err["msg"]


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names (aliases) of the pydantic model found at ``loc`` below ``model``."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        # Unwrap list[X] / X | None to the model inside.
        for _ in range(3):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            if isinstance(current, type) and issubclass(current, BaseModel) or not args:
                break
            current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _line_index(node: yaml.Node | None) -> dict[tuple, int]:
    """Map every YAML path to its 1-based line, to point at the problem in the file."""
    out: dict[tuple, int] = {}

    def walk(n: yaml.Node, path: tuple) -> None:
        out[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                k = key.value
                out[(*path, k)] = key.start_mark.line + 1
                walk(value, (*path, k))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return out


def format_path(loc: tuple) -> str:
    """``('methods', 0, 'name')`` → ``methods[0].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<spec>"


def _format(problems: list[tuple[tuple, str]], lines: dict[tuple, int]) -> list[str]:
    out = []
    seen = set()
    for loc, message in sorted(problems, key=lambda p: (_line_of(p[0], lines), p[0].__repr__())):
        line = _line_of(loc, lines)
        text = f"line {line}: {format_path(loc)}: {message}" if line else \
            f"{format_path(loc)}: {message}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int:
    # An unknown or missing key has no line of its own: use its nearest parent's.
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 0


def _semantic_problems(data: dict[str, Any], check_sources: bool) -> list[tuple[tuple, str]]:
    """Checks pydantic cannot do alone: registry names, method params, rates, duplicates."""
    from workers.evaluators import evaluators, metric_directions
    from workers.methods import methods

    known_methods = {n: m for n, m in methods().items() if n != BASELINE_METHOD}
    problems: list[tuple[tuple, str]] = []

    method_entries = data.get("methods")
    if isinstance(method_entries, list):
        seen_methods: dict[str, int] = {}
        for i, entry in enumerate(method_entries):
            if not isinstance(entry, dict):
                continue
            name = entry.get("name")
            if isinstance(name, str) and name:
                if name not in known_methods:
                    problems.append(((("methods", i, "name")), f"unknown method {name!r}"
                                     + did_you_mean(name, known_methods)
                                     + f"; known: {', '.join(sorted(known_methods))}"))
                else:
                    params = entry.get("params", {})
                    if isinstance(params, dict):
                        try:
                            known_methods[name].config.model_validate(params)
                        except ValidationError as exc:
                            config_cls = known_methods[name].config
                            for err in exc.errors():
                                problems.append((("methods", i, "params", *err["loc"]),
                                                 _pydantic_message(err, config_cls)))
                key = _stable_json([name, entry.get("params", {})])
                if key in seen_methods:
                    problems.append((("methods", i), f"duplicate of methods[{seen_methods[key]}]"
                                     " (same name and params): merge their rates"))
                else:
                    seen_methods[key] = i
            rates = entry.get("rates")
            info = known_methods.get(name) if isinstance(name, str) else None
            if info is not None and info.uses_rate and rates is None:
                problems.append((("methods", i, "rates"), f"required: the rates to sweep, each "
                                 f"in (0, 1) ({info.rate_meaning})"))
            elif info is not None and not info.uses_rate and rates is not None:
                problems.append((("methods", i, "rates"), f"method {name} takes no rate; remove "
                                 "rates (it gives one trial per model and dataset)"))
            if isinstance(rates, list):
                seen_rates: set[float] = set()
                for j, rate in enumerate(rates):
                    if isinstance(rate, bool) or not isinstance(rate, int | float):
                        continue
                    if not 0 < rate < 1:
                        problems.append((("methods", i, "rates", j),
                                         f"rate {rate} is outside (0, 1): a rate is the fraction "
                                         "removed (0 is the baseline, which every sweep has)"))
                    elif rate in seen_rates:
                        problems.append((("methods", i, "rates", j), f"duplicate rate {rate}"))
                    seen_rates.add(rate)

    evaluation = data.get("evaluation")
    known_evaluators = evaluators()
    if isinstance(evaluation, dict):
        names = evaluation.get("metrics")
        if isinstance(names, list):
            seen_names: set[str] = set()
            for i, name in enumerate(names):
                if not isinstance(name, str):
                    continue
                if name not in known_evaluators:
                    problems.append((("evaluation", "metrics", i), f"unknown evaluator {name!r}"
                                     + did_you_mean(name, known_evaluators)
                                     + f"; known: {', '.join(sorted(known_evaluators))}"))
                elif name in seen_names:
                    problems.append((("evaluation", "metrics", i), f"duplicate evaluator {name!r}"))
                seen_names.add(name)
        max_length, stride = evaluation.get("max_length", 128), evaluation.get("stride")
        if isinstance(max_length, int) and isinstance(stride, int) and stride >= max_length:
            problems.append((("evaluation", "stride"), f"stride {stride} must be smaller than "
                             f"max_length {max_length}: a window's first token has no context "
                             "in that window, so windows must overlap"))

    score = data.get("score")
    if isinstance(score, dict) and isinstance(score.get("quality_metric"), str):
        quality = score["quality_metric"]
        directions = metric_directions()
        if quality not in directions or directions[quality] is None:
            choices = [m for m, d in directions.items() if d is not None]
            problems.append((("score", "quality_metric"), f"unknown quality metric {quality!r}"
                             + did_you_mean(quality, choices)))

    resources = data.get("resources") if isinstance(data.get("resources"), dict) else {}
    if resources.get("gpus_per_trial") == 0:
        for i, entry in enumerate(data.get("models") or []):
            if isinstance(entry, dict) and entry.get("device") == "cuda":
                problems.append((("models", i, "device"), "device cuda needs a GPU per trial, "
                                 "but resources.gpus_per_trial is 0; use device: auto or cpu"))
    problems.extend(_dataset_problems(data, known_evaluators))
    problems.extend(_model_problems(data))
    problems.extend(_duplicate_problems(data, "models", "id"))
    problems.extend(_duplicate_problems(data, "datasets", "name"))
    if check_sources:
        problems.extend(_source_problems(data))
    return problems


def _dataset_problems(data: dict[str, Any], known_evaluators: dict[str, Any]
                      ) -> list[tuple[tuple, str]]:
    """Formats and their fields exist, and each dataset's evaluators can score its kind."""
    from workers.data import DatasetError, formats, resolve

    entries = data.get("datasets")
    if not isinstance(entries, list):
        return []
    known_formats = formats()
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    default_metrics = evaluation.get("metrics", EvaluationSettings().metrics)
    out: list[tuple[tuple, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        fmt = entry.get("format")
        if isinstance(fmt, str) and fmt not in known_formats:
            out.append((("datasets", i, "format"), f"unknown dataset format {fmt!r}"
                        + did_you_mean(fmt, known_formats)
                        + f"; formats: {', '.join(sorted(known_formats))}"))
            continue
        fields = entry.get("fields")
        if isinstance(fmt, str) and isinstance(fields, dict):
            allowed = known_formats[fmt].fields
            for key in fields:
                if key not in allowed:
                    hint = (f"format {fmt} maps {', '.join(sorted(allowed))}" if allowed
                            else f"format {fmt} has a fixed layout and takes no fields")
                    out.append((("datasets", i, "fields", key), f"unknown key {key!r}"
                                + did_you_mean(str(key), allowed) + f"; {hint}"))
        own = entry.get("metrics")
        if isinstance(own, list):
            seen: set[str] = set()
            for j, name in enumerate(own):
                if isinstance(name, str) and name not in known_evaluators:
                    out.append((("datasets", i, "metrics", j), f"unknown evaluator {name!r}"
                                + did_you_mean(name, known_evaluators)
                                + f"; known: {', '.join(sorted(known_evaluators))}"))
                elif name in seen:
                    out.append((("datasets", i, "metrics", j), f"duplicate evaluator {name!r}"))
                seen.add(name)
        try:
            DatasetEntry.model_validate(entry)
            kind = known_formats[resolve(entry).format].kind
        except (ValidationError, DatasetError):
            continue  # reported by the structural pass or the source check
        metrics = own if isinstance(own, list) else default_metrics
        if not isinstance(metrics, list):
            continue
        for j, name in enumerate(metrics):
            info = known_evaluators.get(name) if isinstance(name, str) else None
            if info is None or kind in info.kinds:
                continue
            able = sorted(n for n, e in known_evaluators.items() if kind in e.kinds)
            where = ("datasets", i, "metrics", j) if isinstance(own, list) else ("datasets", i)
            out.append((where, f"evaluator {name} cannot score {kind} samples (it scores "
                        f"{', '.join(info.kinds)}); "
                        + ("use one of " if isinstance(own, list) else
                           "set this dataset's metrics to evaluators that can: ")
                        + ", ".join(able)))
    return out


def _stable_json(obj: Any) -> str:
    """Canonical JSON of YAML data whose mapping keys may be of mixed types."""
    def keys_as_text(value: Any) -> Any:
        if isinstance(value, dict):
            return {repr(k) if not isinstance(k, str) else k: keys_as_text(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [keys_as_text(v) for v in value]
        return value

    return json.dumps(keys_as_text(obj), sort_keys=True, default=str)


def _duplicate_problems(data: dict[str, Any], section: str, field: str) -> list[tuple[tuple, str]]:
    entries = data.get(section)
    if not isinstance(entries, list):
        return []
    entry_model = {"models": ModelEntry, "datasets": DatasetEntry}[section]
    seen: dict[str, int] = {}
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get(field), str):
            try:
                # Compared with defaults filled in: spelling a default out is the same entry.
                key = _stable_json(entry_model.model_validate(entry).model_dump(mode="json"))
            except ValidationError:
                key = _stable_json(entry)
            if key in seen:
                out.append(((section, i), f"duplicate of {section}[{seen[key]}]"))
            seen[key] = i
    return out


def model_families(data: dict[str, Any],
                   types: dict[int, tuple[str | None, str | None]] | None = None
                   ) -> dict[int, Any]:
    """Model index → family adapter, for the models whose type is known on the driver:
    read from the checkpoint's config (local, built-in, llama2c, the hub cache) or, when
    that cannot be read here, as the entry declares it (``model_type``)."""
    from workers.models import family_for_model_type

    out: dict[int, Any] = {}
    for i, (found, declared) in (_model_types(data) if types is None else types).items():
        try:
            if found or declared:
                out[i] = family_for_model_type(found or declared)
        except ValueError:
            continue  # reported by _model_problems
    return out


def _model_types(data: dict[str, Any]) -> dict[int, tuple[str | None, str | None]]:
    """Model index → (model type read from its config here or None, declared model_type)."""
    from workers.models import model_type_of

    out: dict[int, tuple[str | None, str | None]] = {}
    for i, entry in enumerate(data.get("models") or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]):
            continue
        source = entry.get("source") if isinstance(entry.get("source"), str) else None
        revision = entry.get("revision") if isinstance(entry.get("revision"), str) else None
        declared = entry.get("model_type") if isinstance(entry.get("model_type"), str) else None
        try:
            out[i] = (model_type_of(entry["id"], source, revision), declared)
        except ValueError:
            continue  # an unknown source: reported by the structural pass
    return out


def _model_problems(data: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Model types are supported (and as declared), and every method can handle every
    model family (before anything reads a model)."""
    from workers.methods import family_lacks, methods
    from workers.models import family_for_model_type, model_config_of

    out: list[tuple[tuple, str]] = []
    types = _model_types(data)
    for i, (found, declared) in types.items():
        if found and declared and found != declared:
            out.append((("models", i, "model_type"), f"declared {declared!r} but the model's "
                        f"config says {found!r}; remove model_type or correct it"))
            continue
        model_type = found or declared
        if model_type is None:
            continue
        try:
            family_for_model_type(model_type)
        except ValueError as exc:
            where = ("models", i, "id") if found else ("models", i, "model_type")
            out.append((where, str(exc)))
    families = model_families(data, types)
    model_configs = {i: model_config_of(entry["id"], entry.get("source"), entry.get("revision"))
                     for i, entry in enumerate(data.get("models") or []) if i in families}
    registry = methods()
    for j, method in enumerate(data.get("methods") or []):
        info = registry.get(method.get("name")) if isinstance(method, dict) else None
        if info is None:
            continue
        try:
            config = info.config.model_validate(method.get("params", {}))
        except (ValidationError, TypeError):
            config = None  # reported by the structural pass
        for i, family in families.items():
            lacks = family_lacks(family, info.requires)
            if lacks:
                out.append((("methods", j, "name"), f"method {info.name} needs {lacks}, which "
                            f"models[{i}] ({family.name}) does not have"))
                continue
            problem = (config.family_problem(family, model_configs.get(i))
                       if config is not None else None)
            if problem:
                out.append((("methods", j, "params"), f"models[{i}] ({family.name}): {problem}"))
    return out


def _source_problems(data: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Models and datasets must exist, and each evaluator must be able to score each
    model × dataset pair, before anything is scheduled."""
    from workers.data import check_dataset
    from workers.evaluators import evaluators
    from workers.methods import methods
    from workers.models import check_model_id

    out = []
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            source = entry.get("source") if isinstance(entry.get("source"), str) else None
            revision = entry.get("revision") if isinstance(entry.get("revision"), str) else None
            try:
                check = check_model_id(entry["id"], source, revision)
            except ValueError:
                continue  # an unknown source is already reported by the structural pass
            if not check.ok:
                out.append((("models", i, "id"), check.message))
    registry = methods()
    for i, entry in enumerate(data.get("methods") or []):
        info = registry.get(entry.get("name")) if isinstance(entry, dict) else None
        if info is None or not isinstance(entry.get("params", {}), dict):
            continue
        try:
            params = info.config.model_validate(entry.get("params", {}))
        except ValidationError:
            continue  # reported by the structural pass
        for name, dataset_entry in params.dataset_entries().items():
            check = check_dataset(dataset_entry)
            if not check.ok:
                out.append((("methods", i, "params", name, "name"), check.message))
    families = model_families(data)
    known = evaluators()
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    default_metrics = evaluation.get("metrics", EvaluationSettings().metrics)
    for i, entry in enumerate(data.get("datasets") or []):
        if not isinstance(entry, dict):
            continue
        try:
            DatasetEntry.model_validate(entry)
        except ValidationError:
            continue  # the structural pass reports it; a malformed entry cannot be read
        check = check_dataset(entry)
        if not check.ok:
            out.append((("datasets", i, "name"), check.message))
            continue
        images = check.has_images  # None for hub datasets: not read on the driver
        metrics = entry.get("metrics") or default_metrics
        for name in metrics if isinstance(metrics, list) else []:
            info = known.get(name) if isinstance(name, str) else None
            if info is None or info.images == "ignored":
                continue
            if info.images == "required" and images is False:
                out.append((("datasets", i), f"evaluator {name} needs image questions and this "
                            "dataset has none"))
                continue
            if info.images == "optional" and not images:
                continue
            for m, family in families.items():
                if not family.is_vision_language:
                    why = ("needs a vision-language model" if info.images == "required" else
                           "asks the image questions of this dataset with their images, which "
                           "needs a vision-language model")
                    out.append((("datasets", i), f"evaluator {name} {why}; models[{m}] is a "
                                f"{family.name} model (families with vision: llava, "
                                "qwen2_5_vl)"))
    return out


# --------------------------------------------------------------------------- expansion


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace; the basis of trial keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def trial_key(model: dict, method: str, params: dict, rate: float | None, dataset: dict,
              evaluation: dict, seed: int) -> str:
    """sha256 of the canonical JSON of everything that determines a trial's result."""
    payload = {"model": model, "method": method, "params": params, "rate": rate,
               "dataset": dataset, "evaluation": evaluation, "seed": seed}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def grid_size(spec: SweepSpec) -> int:
    """Number of trials ``expand`` would produce, without building them."""
    per_pair = 1 + sum(len(method.rates) if method.rates else 1 for method in spec.methods)
    return len(spec.models) * len(spec.datasets) * per_pair


def expand(spec: SweepSpec) -> list[TrialSpec]:
    """The grid, model-major (so a worker keeps its loaded model), baseline first per pair."""
    from workers.methods import methods

    registry = methods()
    # Limits are not part of what is measured: changing them must not change trial keys.
    evaluation = spec.evaluation.model_dump(mode="json", exclude={"timeout_s"})
    evaluation_key = key_dict(spec.evaluation)
    evaluation_key.pop("timeout_s", None)
    limits = {"trial_timeout_s": spec.trial_timeout_s,
              "evaluation_timeout_s": spec.evaluation.timeout_s}
    trials: list[TrialSpec] = []
    for model in spec.models:
        model_dict, model_key = model.model_dump(mode="json"), key_dict(model)
        for dataset in spec.datasets:
            dataset_dict, dataset_key = dataset.model_dump(mode="json"), key_dict(dataset)
            grid: list[tuple[str, dict, float | None]] = [(BASELINE_METHOD, {}, None)]
            for method in spec.methods:
                # Defaults are filled in so that spelling a default out does not change the key.
                params = registry[method.name].config.model_validate(method.params).model_dump(
                    mode="json", by_alias=True)
                if method.rates is None:
                    grid.append((method.name, params, None))  # a method without a rate
                else:
                    grid.extend((method.name, params, float(rate)) for rate in method.rates)
            for method_name, params, rate in grid:
                key = trial_key(model_key, method_name, params, rate, dataset_key,
                                evaluation_key, spec.seed)
                config = {
                    "trial_key": key, "sweep": spec.name, "model": model_dict,
                    "method": {"name": method_name, "params": params, "rate": rate},
                    "dataset": dataset_dict, "evaluation": evaluation, "seed": spec.seed,
                    "is_baseline": method_name == BASELINE_METHOD, "limits": limits,
                }
                trials.append(TrialSpec(
                    trial_key=key, position=len(trials), model=model.id, method=method_name,
                    rate=rate, dataset=dataset.name, params=params,
                    is_baseline=method_name == BASELINE_METHOD, config=config))
    return trials
