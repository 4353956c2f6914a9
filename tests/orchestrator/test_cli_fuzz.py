"""Bad specs through the real ``sweep launch`` entry point: exit 2, located lines, nothing else.

``test_spec_fuzz.py`` proves the validator finds every problem; this file proves the user sees
them: each generated spec goes through ``orchestrator.cli.main.main`` (what the ``sweep``
console script calls, so the real one-line error handling runs), and a handful go through a
real ``python -m orchestrator.cli.main`` process. Every refusal must be exit code 2, exactly
one ``error:`` line per problem (``line N: path: …`` when the problem has a place in the
file), no traceback, nothing on stdout, no database rows and no Ray.

At the end: specs the validator once accepted or crashed on (found by this file), each
with what went wrong, so they stay refused.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import resource
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_fuzz import BREAKS, GOOD, apply  # same directory: pytest puts it on sys.path

from orchestrator import spec
from orchestrator.cli.main import main
from orchestrator.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]

# More ways to break a spec than test_spec_fuzz's BREAKS: duplicates, empty grids, unknown
# names and wrong container types. Each one is refused whatever else the spec holds.
EXTRA_BREAKS: list[tuple[tuple, str, Any]] = [
    ((), "models", [{"id": "builtin:tiny-llama"}, {"id": "builtin:tiny-llama"}]),
    ((), "models", [["builtin:tiny-llama"]]),
    ((), "datasets", []),
    ((), "datasets", [{"name": "builtin:pydoc"}, {"name": "builtin:pydoc"}]),
    ((), "methods", [{"name": "head_mask", "rates": [0.5]}, {"name": "head_mask", "rates": [0.2]}]),
    ((), "methods", [{"name": "no_such_method", "rates": [0.5]}]),
    ((), "evaluation", "fast"), ((), "resources", []), ((), "name", ["a"]),
    (("models", 0), "id", "builtin:no-such-model"), (("models", 0), "source", "ftp"),
    (("models", 0), "id", "/no/such/checkpoint"),
    (("methods", 0), "rates", 0.5), (("methods", 0), "rates", [0.5, 1.0]),
    (("methods", 0), "rates", [2, 3]), (("methods", 0), "rates", None),
    (("methods", 1), "name", "headmask"), (("methods", 1), "params", [1, 2]),
    (("datasets", 0), "limit", -5), (("datasets", 0), "name", "no-such-dataset"),
    (("evaluation",), "metrics", ["perplexity", "perplexity"]),
    (("evaluation",), "metrics", ["accuracy@k"]), (("evaluation",), "max_length", 1),
    (("score",), "weight", -0.1),
]
ALL_BREAKS = BREAKS + EXTRA_BREAKS

# A problem with a place in the file: "line N: <yaml path>: message" (or, when the YAML does
# not parse, "line N: invalid YAML: message").
LOCATED = re.compile(r"^line [1-9]\d*: (invalid YAML: .+|[^\s:][^:]*: .+)$")
# Problems about the file as a whole have no line; these are the ones the validator knows.
WHOLE_FILE = re.compile(
    r"^(spec is not UTF-8 text|the spec must be a YAML mapping with .+|spec is [\d,]+ bytes; .+"
    r"|the grid has [\d,]+ trials; .+)$"
)


def section(break_: tuple[tuple, str, Any]) -> str:
    """The top-level key a break lands in; two breaks of one section could mask each other."""
    where, key, _ = break_
    return where[0] if where else key


@dataclass
class Run:
    """What one ``sweep launch`` did."""

    code: int
    stdout: str
    stderr: str
    spec_path: Path
    db_path: Path


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    # One fresh directory per hypothesis example (tmp_path is per test, not per example), so a
    # database file left by one example cannot hide or fake a write by another.
    with tempfile.TemporaryDirectory(prefix="cli-fuzz-") as name:
        yield Path(name)


def write_spec(directory: Path, content: bytes) -> Path:
    """``content`` as ``<directory>/spec.yaml``."""
    path = directory / "spec.yaml"
    path.write_bytes(content)
    return path


def launch_in_process(spec_path: Path, *extra: str) -> Run:
    """``sweep --db sqlite:///<dir>/r.db launch <dir>/spec.yaml`` through the console entry."""
    db_path = spec_path.parent / "r.db"
    out, err = io.StringIO(), io.StringIO()
    code: Any = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["--db", f"sqlite:///{db_path}", "launch", str(spec_path), *extra])
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int), f"main() ended without an exit code: {code!r}"
    return Run(code, out.getvalue(), err.getvalue(), spec_path, db_path)


def expected_problems(spec_path: Path) -> list[str]:
    """The validator's own verdict on the spec (fails the test if it accepts the spec).

    Asked before the CLI runs so that a spec the validator would accept is never launched:
    in this process that would start Ray and run trials.
    """
    try:
        spec.load(spec_path)
    except SpecError as exc:
        return exc.problems
    pytest.fail(f"generated spec was accepted by the validator:\n{spec_path.read_bytes()[:500]!r}")


def rows_written(db_path: Path) -> int:
    """Rows in ``sweeps`` and ``trials`` of a SQLite file (0 when it or the tables are absent)."""
    if not db_path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in ("sweeps", "trials") if t in tables)


def assert_refused(run: Run, problems: list[str]) -> list[str]:
    """Exit 2, exactly one ``error: <spec>: <problem>`` line per problem, nothing else."""
    assert run.code == 2, (run.code, run.stderr)
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    prefix = f"error: {run.spec_path}: "
    lines = run.stderr.splitlines()
    assert lines and all(line.strip() for line in lines), run.stderr
    assert all(line.startswith(prefix) for line in lines), run.stderr
    shown = [line.removeprefix(prefix) for line in lines]
    # Same problems, same order, none merged or split over lines.
    assert shown == problems, run.stderr
    assert rows_written(run.db_path) == 0
    assert not run.db_path.exists(), "a refused spec must not even create the database"
    return shown


# --------------------------------------------------------------------------- generated specs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ALL_BREAKS), min_size=1, max_size=5, unique_by=section))
def test_broken_specs_are_refused_one_located_line_per_problem(chosen: list) -> None:
    data = copy.deepcopy(GOOD)
    for where, key, value in chosen:
        data = apply(data, where, key, value)
    content = yaml.safe_dump(data, sort_keys=False).encode()
    with scratch() as directory:
        spec_path = write_spec(directory, content)
        problems = expected_problems(spec_path)  # first: never launch a valid spec
        shown = assert_refused(launch_in_process(spec_path), problems)
    for problem in shown:
        assert LOCATED.match(problem), problem
    # Every broken section is reported (all at once, not one per run).
    for break_ in chosen:
        name = re.escape(section(break_))
        assert any(re.match(rf"line \d+: {name}(\[|\.|:)", p) for p in shown), (name, shown)


_GOOD_LINES = yaml.safe_dump(GOOD, sort_keys=False).splitlines()
# Each is a YAML syntax error wherever it is put at the start of a line (the dump above is all
# block style and has no quotes, so nothing later can close the bracket or the quote).
_SYNTAX_ERRORS = ["x: [1, 2", "x: {a: 1", "a: b: c", "\tname: x", "@reserved: 1",
                  "x: *undefined_alias", 'x: "unclosed', "x: 'unclosed", "`tick: 1"]


@st.composite
def yaml_syntax_errors(draw: st.DrawFn) -> bytes:
    """The good spec with a syntax error on one line, indented like its neighbour or not."""
    at = draw(st.integers(0, len(_GOOD_LINES)))
    neighbour = _GOOD_LINES[min(at, len(_GOOD_LINES) - 1)]
    indent = draw(st.sampled_from(["", " " * (len(neighbour) - len(neighbour.lstrip()))]))
    bad = indent + draw(st.sampled_from(_SYNTAX_ERRORS))
    return "\n".join([*_GOOD_LINES[:at], bad, *_GOOD_LINES[at:]]).encode() + b"\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_syntax_errors())
def test_yaml_syntax_errors_are_one_line_with_the_line_number(content: bytes) -> None:
    with scratch() as directory:
        spec_path = write_spec(directory, content)
        problems = expected_problems(spec_path)
        [shown] = assert_refused(launch_in_process(spec_path), problems)
    match = re.match(r"line (\d+): invalid YAML: \S", shown)
    assert match, shown
    assert 1 <= int(match.group(1)) <= len(_GOOD_LINES) + 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=2000))
def test_binary_garbage_is_refused_cleanly(blob: bytes) -> None:
    with scratch() as directory:
        spec_path = write_spec(directory, blob)
        problems = expected_problems(spec_path)  # first: never launch a valid spec
        shown = assert_refused(launch_in_process(spec_path), problems)
    for problem in shown:
        assert LOCATED.match(problem) or WHOLE_FILE.match(problem), problem


# --------------------------------------------------------------------------- a real process


def cli(*args: str, env_extra: dict[str, str] | None = None,
        timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator.cli.main ARGS`` as a user would run it."""
    env = dict(os.environ, COLUMNS="200", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          **kwargs)


def assert_one_line_refusal(out: subprocess.CompletedProcess[str], spec_path: Path,
                            db_path: Path) -> str:
    """Exit 2, one ``error: <spec>: …`` line, no traceback, no database; returns the problem."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    prefix = f"error: {spec_path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert not db_path.exists()
    return lines[0].removeprefix(prefix)


def _big_grid() -> bytes:
    # 10 datasets × (baseline + 9,999 rates) = 100,000 trials: ten times spec.MAX_TRIALS.
    rates = [round((i + 1) / 10_000, 4) for i in range(9_999)]
    data = {"name": "huge", "models": [{"id": "builtin:tiny-llama"}],
            "methods": [{"name": "drop_layers", "rates": rates}],
            "datasets": [{"name": "builtin:pydoc", "limit": n} for n in range(1, 11)]}
    return yaml.safe_dump(data).encode()


CONSOLE_CASES = {
    "yaml_syntax_error": (
        b"name: x\nmodels: [{id: builtin:tiny-llama}\ndatasets: [{name: builtin:pydoc}]\n",
        r"line \d+: invalid YAML: .+"),
    "unknown_method_did_you_mean": (
        b"name: x\nmodels: [{id: builtin:tiny-llama}]\nmethods:\n  - name: drop_layer\n"
        b"    rates: [0.5]\ndatasets: [{name: builtin:pydoc}]\n",
        r"line 4: methods\[0\]\.name: unknown method 'drop_layer' "
        r"\(did you mean 'drop_layers'\?\); known: .+"),
    "ten_megabytes": (b"name: x\n" + b"# padding\n" * 1_048_576,
                      r"spec is 10,485,768 bytes; a sweep spec must be under [\d,]+ bytes"),
    "grid_of_100000_trials": (None, r"the grid has 100,000 trials; at most 10,000 per sweep .+"),
    "not_utf8": (b"name: \xff\xfe\x00bad\n", r"spec is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(CONSOLE_CASES))
def test_console_refuses_with_one_line(case: str, tmp_path: Path) -> None:
    content, expected = CONSOLE_CASES[case]
    if content is None:
        content = _big_grid()
        assert spec.MAX_TRIALS < 100_000  # otherwise this case tests nothing
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_bytes(content)
    db_path = tmp_path / "r.db"
    out = cli("--db", f"sqlite:///{db_path}", "launch", str(spec_path))
    problem = assert_one_line_refusal(out, spec_path, db_path)
    assert re.fullmatch(expected, problem), problem


def _missing_model(tmp_path: Path) -> tuple[str, str]:
    return "models: [{id: /no/such/dir, source: local}]\ndatasets: [{name: builtin:pydoc}]\n", \
        "models[0].id"


def _unreadable_file(tmp_path: Path) -> tuple[str, str]:
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    data.chmod(0)
    if os.access(data, os.R_OK):  # root reads any file whatever its mode
        pytest.skip("running as a user who can read a mode-000 file (root); the directory "
                    "case covers an unreadable dataset here")
    return f"models: [{{id: builtin:tiny-llama}}]\ndatasets: [{{name: '{data}'}}]\n", \
        "datasets[0].name"


def _directory_as_dataset(tmp_path: Path) -> tuple[str, str]:
    data = tmp_path / "data.txt"
    data.mkdir()
    return f"models: [{{id: builtin:tiny-llama}}]\ndatasets: [{{name: '{data}'}}]\n", \
        "datasets[0].name"


@pytest.mark.parametrize("make", [_missing_model, _unreadable_file, _directory_as_dataset],
                         ids=["missing_model_dir", "mode_000_dataset", "directory_dataset"])
def test_missing_sources_fail_before_ray_starts(make: Any, tmp_path: Path) -> None:
    body, field = make(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: sources\n" + body)
    db_path = tmp_path / "r.db"
    # Short (Ray's unix sockets live under it) and fresh: anything in it means Ray started.
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    try:
        out = cli("--db", f"sqlite:///{db_path}", "launch", str(spec_path), "--no-dashboard",
                  env_extra={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})
        problem = assert_one_line_refusal(out, spec_path, db_path)
        assert re.match(rf"line \d+: {re.escape(field)}: \S", problem), problem
        assert list(ray_tmp.iterdir()) == [], "Ray was started for a spec that cannot run"
    finally:
        for path in tmp_path.iterdir():  # let pytest clean a mode-000 file up
            path.chmod(stat.S_IRWXU)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------- past bugs

BASE = "name: bug\nmodels: [{id: builtin:tiny-llama}]\ndatasets: [{name: builtin:pydoc}]\n"
_LAX = ("pydantic coerces the value (lax mode) but spec._semantic_problems checks the raw YAML "
        "value and skips what is not already a number, so the range/duplicate/stride check "
        "never sees it")
_NORMALISED = ("duplicates are compared as raw YAML dicts; entries equal once defaults are "
               "filled in give the same trial key twice, so one trial runs twice")
_CRASH = "crashes with a generic exception (exit 1) instead of a located SpecError (exit 2)"

# (spec text, regex the single located problem must match, what used to go wrong)
BUG_CASES: dict[str, tuple[str, str, str]] = {
    "rate_true": (BASE + "methods: [{name: drop_layers, rates: [true]}]\n",
                  r"line 4: methods\[0\]\.rates\[0\]: .+", _LAX + " (true becomes rate 1.0)"),
    "rate_string_above_one": (BASE + "methods: [{name: drop_layers, rates: ['1.5']}]\n",
                              r"line 4: methods\[0\]\.rates\[0\]: .+", _LAX),
    "rate_string_nan": (BASE + "methods: [{name: drop_layers, rates: ['nan']}]\n",
                        r"line 4: methods\[0\]\.rates\[0\]: .+", _LAX),
    "rate_duplicate_as_string": (BASE + "methods: [{name: drop_layers, rates: ['0.5', 0.5]}]\n",
                                 r"line 4: methods\[0\]\.rates\[\d\]: .+", _LAX),
    "stride_not_below_string_max_length": (
        BASE + "evaluation: {max_length: '64', stride: 64}\n",
        r"line 4: evaluation\.(max_length|stride): .+",
        _LAX),
    "duplicate_model_with_default_spelled_out": (
        "name: bug\nmodels:\n  - {id: builtin:tiny-llama}\n"
        "  - {id: builtin:tiny-llama, trust_remote_code: false}\n"
        "datasets: [{name: builtin:pydoc}]\n",
        r"line 4: models\[1\]: duplicate of models\[0\]", _NORMALISED),
    "duplicate_dataset_with_default_spelled_out": (
        "name: bug\nmodels: [{id: builtin:tiny-llama}]\ndatasets:\n  - {name: builtin:pydoc}\n"
        "  - {name: builtin:pydoc, split: null}\n",
        r"line 5: datasets\[1\]: duplicate of datasets\[0\]", _NORMALISED),
    "duplicate_top_level_key": (
        "name: bug\nmodels: [{id: builtin:tiny-llama}]\nmethods: [{name: nope, rates: [5]}]\n"
        "methods: []\ndatasets: [{name: builtin:pydoc}]\n",
        r"line 4: (methods|invalid YAML): .*duplicate.*'methods'.*",
        "PyYAML keeps the last of two equal keys silently: the first `methods` (with two "
        "mistakes) vanishes and the spec is accepted"),
    "recursive_alias": ("name: bug\nmodels: &m [*m]\ndatasets: [{name: builtin:pydoc}]\n",
                        r"line 2: (models|invalid YAML: an alias).*",
                        "spec._line_index walks the cyclic node graph: RecursionError, " + _CRASH),
    "deep_nesting": ("name: bug\nx: " + "[" * 500 + "]" * 500 + "\n", r"line 2: .+",
                     "RecursionError in yaml.compose/_line_index, " + _CRASH),
    "integer_of_5000_digits": (BASE + "seed: 1" + "0" * 5000 + "\n", r"line 4: .+",
                               "yaml raises ValueError (int max str digits), not YAMLError; "
                               + _CRASH),
    "integer_key_in_model_entry": (
        "name: bug\nmodels: [{id: builtin:tiny-llama, 1: x}]\ndatasets: [{name: builtin:pydoc}]\n",
        r"line 2: models\[0\].*", "json.dumps(sort_keys=True) in _duplicate_problems compares "
        "int and str keys: TypeError, " + _CRASH),
    "integer_key_in_params": (
        BASE + "methods: [{name: drop_layers, rates: [0.5], params: {from: top, 1: 2}}]\n",
        r"line 4: methods\[0\]\.params.*", "json.dumps(sort_keys=True) of the method key in "
        "_semantic_problems: TypeError, " + _CRASH),
    "control_character_has_a_line": (
        BASE + "seed: 1\x07\n", r"line 4: invalid YAML: .+",
        "yaml.reader.ReaderError has no problem_mark, so the message has no line (its "
        "`position` would give one)"),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, id=name) for name in BUG_CASES
])
def test_known_bad_spec_is_refused_with_a_located_line(case: str) -> None:
    text, expected, _ = BUG_CASES[case]
    with scratch() as directory:
        # --dry-run: a spec wrongly accepted must not start Ray inside pytest.
        run = launch_in_process(write_spec(directory, text.encode()), "--dry-run")
        assert run.code == 2, (run.code, run.stderr, run.stdout[:300])
        assert "Traceback" not in run.stderr and run.stdout == ""
        lines = run.stderr.splitlines()
        prefix = f"error: {run.spec_path}: "
        assert lines and all(line.startswith(prefix) for line in lines), run.stderr
        assert any(re.fullmatch(expected, line.removeprefix(prefix)) for line in lines), lines


def _memory_cap() -> None:
    # Both cases below once grew memory without bound; 1 GiB of address space keeps a
    # regression from taking the machine down (refusing a spec, the CLI needs under 100 MiB).
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _alias_bomb() -> str:
    # Under 1 KB, yet its aliases expand to 9**9 (387 million) values.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return BASE + "\n".join(lines) + "\n"


@pytest.mark.parametrize("which", ["alias_bomb", "dev_zero"])
def test_hostile_spec_is_refused_quickly(which: str, tmp_path: Path) -> None:
    if which == "alias_bomb":
        spec_path = tmp_path / "bomb.yaml"
        spec_path.write_text(_alias_bomb())
    else:
        spec_path = Path("/dev/zero")
    db_path = tmp_path / "r.db"
    try:
        out = cli("--db", f"sqlite:///{db_path}", "launch", str(spec_path), timeout=10,
                  preexec_fn=_memory_cap)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sweep launch {spec_path}` still running after 10 s")
    assert out.returncode == 2, (out.returncode, out.stderr[-500:])
    assert "Traceback" not in out.stderr
    assert all(line.startswith(f"error: {spec_path}: ") for line in out.stderr.splitlines())
    assert not db_path.exists()
