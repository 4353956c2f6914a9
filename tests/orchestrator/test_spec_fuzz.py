"""Malformed specs, generated: every one is refused with located one-line problems, nothing else."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import spec
from orchestrator.errors import SpecError

GOOD = {
    "name": "fuzz",
    "models": [{"id": "builtin:tiny-llama"}],
    "methods": [{"name": "drop_layers", "rates": [0.25, 0.5], "params": {"from": "top"}},
                {"name": "head_mask", "rates": [0.5]}],
    "datasets": [{"name": "builtin:pydoc", "split": "test", "limit": 10}],
    "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 64, "stride": 32},
    "score": {"quality_metric": "perplexity", "weight": 0.5},
}

# Each breaks the spec for sure; (path to the container, key, bad value).
BREAKS = [
    ((), "name", ""), ((), "name", 42), ((), "name", "has space"), ((), "models", []),
    ((), "models", "builtin:tiny-llama"), ((), "datasets", None), ((), "seed", "x"),
    ((), "max_concurrent_trials", 0), ((), "extra_key", 1), ((), "methods", {"a": 1}),
    (("models", 0), "id", "builtin:tiny-lama"), (("models", 0), "dtype", "float8"),
    (("models", 0), "trust_remote_code", "maybe"), (("models", 0), "idd", "x"),
    (("methods", 0), "name", "drop_layer"), (("methods", 0), "rates", []),
    (("methods", 0), "rates", [1.5]), (("methods", 0), "rates", [-0.1]),
    (("methods", 0), "rates", [0.0]), (("methods", 0), "rates", ["half"]),
    (("methods", 0), "rates", [0.25, 0.25]), (("methods", 0), "params", {"from": "middle"}),
    (("methods", 0), "params", {"form": "top"}), (("methods", 1), "params", {"scope": 3}),
    (("datasets", 0), "name", "builtin:pydocs"), (("datasets", 0), "split", "dev"),
    (("datasets", 0), "limit", 0), (("datasets", 0), "limt", 3),
    (("datasets", 0), "name", "/no/such/file.txt"),
    (("evaluation",), "metrics", ["perplexty"]), (("evaluation",), "metrics", []),
    (("evaluation",), "stride", 64), (("evaluation",), "batch_size", "many"),
    (("evaluation",), "speed", {"repeats": 0}), (("score",), "weight", 2),
    (("score",), "quality_metric", "accuracy"), (("resources",), "cpus_per_trial", 0),
]
LOCATED = re.compile(r"^(line \d+: )?[A-Za-z_<][\w\[\].<>-]*: .+")


def assert_refused(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec.loads(text)
    assert info.value.exit_code == 2
    problems = info.value.problems
    assert problems
    for problem in problems:
        assert "\n" not in problem and "Traceback" not in problem
        assert LOCATED.match(problem) or problem.startswith("line "), problem
    return problems


def apply(data: dict, where: tuple, key: str, value) -> dict:
    out = copy.deepcopy(data)
    node = out
    for part in where:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[key] = value
    return out


def section(index: int) -> str:
    where, key, _ = BREAKS[index]
    return where[0] if where else key


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(BREAKS) - 1), min_size=1, max_size=4, unique_by=section))
def test_broken_specs_report_every_problem_with_its_location(chosen):
    data = GOOD
    for index in chosen:
        data = apply(data, *BREAKS[index])
    problems = assert_refused(yaml.safe_dump(data, sort_keys=False))
    # Breaks in different sections are all reported at once, each at its own place.
    for index in chosen:
        name = section(index)
        assert any(re.search(rf"(^|: ){re.escape(name)}(\[|\.|:)", p) for p in problems), (
            name, problems)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_binary_garbage_is_refused_cleanly(blob):
    text = blob.decode("utf-8", errors="replace")
    try:
        spec.loads(text)
    except SpecError as exc:
        assert exc.exit_code == 2 and exc.problems
    else:  # pragma: no cover - garbage that is a valid spec would be a miracle
        pytest.fail("garbage accepted as a spec")


def test_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"name: x\n" + b"# padding\n" * 1_100_000)
    with pytest.raises(SpecError, match="bytes"):
        spec.load(path)
