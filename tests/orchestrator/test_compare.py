"""Matching and judging rules of `sweep compare` (orchestrator/compare.py), and its CLI's
input errors, which need no database."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.cli.main import main
from orchestrator.compare import (
    judge,
    model_matches,
    params_match,
    rate_matches,
    summary_line,
    trial_matches,
)
from orchestrator.references import parse_references

REFERENCE = """\
source: {title: "A paper", arxiv: "2306.11695"}
entries:
  - model: meta-llama/Llama-2-7b-hf
    method: {name: reduce_hidden, params: {basis: pca}}
    rate: 0.25
    dataset: wikitext
    metric: perplexity
    value: 10.0
    tolerance: %s
"""


def _entry(tolerance: str = "0.5", **changes: Any):
    (entry,) = parse_references(REFERENCE % tolerance)
    if changes:
        from dataclasses import replace

        entry = replace(entry, **changes)
    return entry


def _trial(**fields: Any) -> SimpleNamespace:
    base = {"model": "meta-llama/Llama-2-7b-hf", "method": "reduce_hidden",
            "params": {"basis": "pca", "multiple_of": 8}, "rate": 0.25, "dataset": "wikitext",
            "is_baseline": False}
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize(("trial_model", "entry_model", "expected"), [
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", True),
    ("/models/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", True),
    ("/models/llama-2-7b-HF/", "meta-llama/Llama-2-7b-hf", True),
    ("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", True),
    ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf", False),
    ("/models/Llama-2-13b-hf", "meta-llama/Llama-2-7b-hf", False),
    ("builtin:tiny-llama", "builtin:tiny-llama", True),
])
def test_model_matching(trial_model: str, entry_model: str, expected: bool) -> None:
    assert model_matches(trial_model, entry_model) is expected


def test_params_the_entry_gives_must_equal_the_trials() -> None:
    trial = {"basis": "pca", "multiple_of": 8, "calibration": {"name": "x", "limit": 4},
             "scale": True, "gamma": 0.4}
    assert params_match({}, trial)
    assert params_match({"basis": "pca", "gamma": 0.4}, trial)
    assert params_match({"multiple_of": 8.0}, trial)  # YAML 8.0 and JSON 8 are one value
    assert params_match({"calibration": {"name": "x", "limit": 4}}, trial)
    assert not params_match({"calibration": {"name": "x"}}, trial)  # a mapping is whole
    assert not params_match({"basis": "channels"}, trial)
    assert not params_match({"scale": 1}, trial)  # a boolean is not a number
    assert not params_match({"missing": None}, trial)
    assert not params_match({"basis": "pca"}, None)


def test_rates_match_within_a_relative_millionth() -> None:
    assert rate_matches(None, None)
    assert rate_matches(0.1333, 0.1333 * (1 + 5e-7))
    assert not rate_matches(0.0667, 2 / 30)  # 0.0667 is not 2/30: write what the spec has
    assert not rate_matches(None, 0.5) and not rate_matches(0.5, None)
    assert not rate_matches(0.25, 0.3)


def test_trial_matching_combines_every_rule() -> None:
    entry = _entry()
    assert trial_matches(entry, _trial())
    assert trial_matches(entry, _trial(model="/models/Llama-2-7b-hf"))
    assert not trial_matches(entry, _trial(params={"basis": "channels"}))
    assert not trial_matches(entry, _trial(rate=0.3))
    assert not trial_matches(entry, _trial(dataset="Salesforce/wikitext"))
    assert not trial_matches(entry, _trial(method="drop_layers"))
    baseline = _entry(method="none", params={}, rate=None)
    assert trial_matches(baseline, _trial(method="none", params={}, rate=None,
                                          is_baseline=True))
    assert not trial_matches(baseline, _trial(rate=None))


def test_judging_absolute_and_relative_tolerances_boundary_included() -> None:
    assert judge(_entry("0.5"), 10.4) == (pytest.approx(0.4), pytest.approx(4.0), True)
    assert judge(_entry("0.5"), 10.5)[2] is True       # on the boundary
    assert judge(_entry("0.5"), 9.49)[2] is False
    assert judge(_entry('"2%"'), 10.2)[2] is True       # 2 % of 10 = 0.2
    assert judge(_entry('"2%"'), 9.7) == (pytest.approx(-0.3), pytest.approx(-3.0), False)
    # 1.1 − 1.0 is 0.10000000000000009 in floats: still on the boundary, so within.
    assert judge(_entry("0.1", value=1.0), 1.1)[2] is True
    assert judge(_entry("0.5"), None) == (None, None, None)
    assert judge(_entry("0.1", value=0.0), 0.05) == (0.05, None, True)


def test_summary_line() -> None:
    rows = [{"status": s} for s in ("✓", "✓", "✗", "not run", "no value")]
    assert summary_line(rows) == "2 within tolerance, 1 outside, 1 not run, 1 without a value"
    assert summary_line(rows[:4]) == "2 within tolerance, 1 outside, 1 not run"


# --------------------------------------------------------------------------- CLI input errors


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code), out, err


def test_bad_reference_file_exits_2_with_one_line_naming_file_entry_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "paper.yaml"
    bad.write_text((REFERENCE % "0.5").replace('"A paper", arxiv: "2306.11695"', '"A paper"'))
    code, out, err = _run(capsys, "--db", f"sqlite:///{tmp_path / 'none.db'}", "compare",
                          "--references", str(bad))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {bad}: line 1: entries[0].source: arxiv or venue")
    assert "Traceback" not in err
    assert not (tmp_path / "none.db").exists()  # references are checked before the database


def test_missing_references_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no sweeps/references here
    code, _, err = _run(capsys, "compare")
    assert code == 2 and "--references" in err and "sweeps/references" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "compare", "--references", "missing.yaml")
    assert code == 2 and "missing.yaml does not exist" in err
