"""Paper vs reproduction: each published number next to our matching trial's value.

A pure read of the results database (``queries.py`` is where DESIGN.md puts reads; this
module is separate so the two can change independently). One row per reference entry
(see :mod:`orchestrator.references`), in the order given.

Matching rules (a trial is *matching* when all hold):

- status: the trial finished (``done``); failed, timed-out, invalid and pending trials
  never match.
- model: the trial's model id equals the entry's, or their last path components are equal
  ignoring case, so a local copy ``/models/Llama-2-7b-hf`` matches
  ``meta-llama/Llama-2-7b-hf``.
- method: the same name, and every parameter the entry gives equals the trial's (the
  trial's stored method params, defaults filled in; parameters the entry leaves out may be
  anything). Method ``none`` matches the baseline trials.
- rate: equal within a relative 1e-6, or both null.
- dataset: the same name (the spec's ``datasets[].name``).
- sweep: with ``sweep`` given, only that sweep's trials.

Of several matching trials (several sweeps, re-runs), the most recently finished one is
compared and ``n_matched`` says how many matched. Its value is the stored metric of that
name, or for ``score`` / ``perf_norm`` / ``speed_norm`` the value ``sweep leaderboard``
computes (taken from :func:`orchestrator.queries.leaderboard`, so the score formula lives
in one place).

Judgement: ``delta = ours − paper``, ``delta_pct = 100·delta / |paper|``; *within* when
``|delta| ≤ tolerance`` (absolute, or the percentage of ``|paper|``), boundary included.
Status ``✓`` within, ``✗`` outside, ``not run`` when no trial matches, ``no value`` when
the matching trial lacks the metric (not evaluated, non-finite, or a speed metric that
cannot be computed across hardware).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from orchestrator.errors import SweepError
from orchestrator.references import BASELINE_METHOD, ReferenceEntry

WITHIN = "✓"
OUTSIDE = "✗"
NOT_RUN = "not run"
NO_VALUE = "no value"
RATE_RTOL = 1e-6


class OutsideTolerance(SweepError):
    """Matched entries outside their tolerance, with ``--fail-outside`` (exit code 1)."""

    exit_code = 1

# Columns of a compare table (for `sweep compare` and `sweep report`), all keys of the rows.
COMPARE_COLUMNS: list[str] = ["source", "table", "model", "method", "rate", "dataset", "metric",
                              "paper", "ours", "delta", "delta_pct", "tolerance", "status",
                              "n_matched", "trial"]
COMPARE_HEADERS: dict[str, str] = {"delta": "Δ", "delta_pct": "Δ %", "tolerance": "± tolerance",
                                   "status": "result", "n_matched": "runs"}


def _last_component(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1].lower()


def model_matches(trial_model: str, entry_model: str) -> bool:
    """Whether a trial's model id is the entry's: equal, or the same last path component
    ignoring case (``/models/Llama-2-7b-hf`` is ``meta-llama/Llama-2-7b-hf``)."""
    if trial_model == entry_model:
        return True
    last = _last_component(entry_model)
    return bool(last) and _last_component(trial_model) == last


def _same(expected: Any, actual: Any) -> bool:
    """Equal as parameter values: numbers by value (1 == 1.0, floats within rounding),
    booleans only to booleans, mappings and lists item by item."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return math.isclose(expected, actual, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            _same(value, actual[key]) for key, value in expected.items())
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        return len(expected) == len(actual) and all(
            _same(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual)


def params_match(entry_params: dict[str, Any], trial_params: dict[str, Any] | None) -> bool:
    """Whether every parameter the entry gives has the same value in the trial's params."""
    trial_params = trial_params or {}
    return all(name in trial_params and _same(value, trial_params[name])
               for name, value in entry_params.items())


def rate_matches(entry_rate: float | None, trial_rate: float | None) -> bool:
    """Both null, or equal within a relative ``RATE_RTOL`` (0.0667 is not 2/30)."""
    if entry_rate is None or trial_rate is None:
        return entry_rate is None and trial_rate is None
    return math.isclose(entry_rate, trial_rate, rel_tol=RATE_RTOL, abs_tol=0.0)


def trial_matches(entry: ReferenceEntry, trial: Any) -> bool:
    """Whether a finished trial (anything with ``model``, ``method``, ``params``, ``rate``,
    ``dataset``, ``is_baseline``) is what ``entry`` reports on."""
    if entry.method == BASELINE_METHOD:
        method_ok = bool(trial.is_baseline)
    else:
        method_ok = not trial.is_baseline and trial.method == entry.method and params_match(
            entry.params, trial.params)
    return (method_ok and trial.dataset == entry.dataset and rate_matches(entry.rate, trial.rate)
            and model_matches(trial.model, entry.model))


def judge(entry: ReferenceEntry, ours: float | None
          ) -> tuple[float | None, float | None, bool | None]:
    """``(delta, delta_pct, within)`` of our value against the entry's; Nones without ours."""
    if ours is None or not math.isfinite(ours):
        return None, None, None
    delta = ours - entry.value
    delta_pct = 100.0 * delta / abs(entry.value) if entry.value != 0 else None
    # The boundary counts as within: 5.17 vs 5.12 ± 0.05 must not fail on float rounding.
    slack = 1e-9 * max(abs(entry.value), abs(ours), 1e-300)
    return delta, delta_pct, abs(delta) <= entry.tolerance_abs + slack


def compare(session: Session, references: Sequence[ReferenceEntry],
            sweep: str | None = None) -> list[dict[str, Any]]:
    """One row per entry of ``references``, in their order: the paper's value, ours from
    the most recently finished matching trial (see the module docstring), and the verdict.

    Row keys: ``source`` (short citation), ``table``, ``model`` (the entry's),
    ``method`` (name with the entry's params, for display), ``method_name``, ``params``,
    ``rate``, ``dataset``, ``metric``, ``paper``, ``ours`` (None when not run), ``delta``
    (ours − paper), ``delta_pct``, ``tolerance`` (as written: ``0.05`` or ``2%``),
    ``tolerance_abs`` (in metric units), ``within`` (True/False/None), ``status`` (``✓``,
    ``✗``, ``not run``, ``no value``), ``sweep``, ``trial_key`` and ``trial`` (its first
    12 characters) and ``trial_model`` of the matched trial, ``n_matched``, ``notes``,
    ``file`` and ``entry`` (the entry's index in its file), ``known_method`` (False for
    methods this project does not implement). An unknown ``sweep`` raises ``BadInput``.
    """
    from orchestrator import queries
    from orchestrator.db.models import Metric, Sweep, Trial

    if sweep is not None:
        queries.sweep_status(session, sweep)  # BadInput, with suggestions, if unknown
    if not references:
        return []
    datasets = sorted({e.dataset for e in references})
    methods = sorted({e.method for e in references if e.method != BASELINE_METHOD})
    query = (
        select(Trial.id, Sweep.name.label("sweep"), Trial.trial_key, Trial.model, Trial.method,
               Trial.params, Trial.rate, Trial.dataset, Trial.is_baseline, Trial.finished_at)
        .join(Sweep, Trial.sweep_id == Sweep.id)
        .where(Trial.status == "done", Trial.dataset.in_(datasets),
               or_(Trial.method.in_(methods), Trial.is_baseline))
    )
    if sweep is not None:
        query = query.where(Sweep.name == sweep)
    # Newest first; the id breaks ties of equal (or missing) finishing times.
    oldest = datetime.min.replace(tzinfo=UTC)
    candidates = sorted(session.execute(query).all(),
                        key=lambda t: (t.finished_at or oldest, t.id), reverse=True)

    chosen: list[tuple[Any, int]] = []  # (newest matching trial or None, number matching)
    for entry in references:
        matching = [t for t in candidates if trial_matches(entry, t)]
        chosen.append((matching[0] if matching else None, len(matching)))

    stored = {(e.metric, t.id) for e, (t, _) in zip(references, chosen, strict=True)
              if t is not None and e.metric not in queries.COMPUTED_METRICS}
    values: dict[tuple[str, int], float | None] = {}
    ids = sorted({trial_id for _, trial_id in stored})
    names = sorted({name for name, _ in stored})
    for start in range(0, len(ids), 500):  # stay below bound-parameter limits
        rows = session.execute(
            select(Metric.trial_id, Metric.name, Metric.value)
            .where(Metric.trial_id.in_(ids[start:start + 500]), Metric.name.in_(names))
        ).all()
        values.update({(name, trial_id): value for trial_id, name, value in rows})

    boards: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = {}

    def computed(trial: Any, metric: str) -> float | None:
        group = (trial.sweep, trial.model, trial.dataset, trial.method)
        if group not in boards:
            rows = queries.leaderboard(session, "score", sweep=trial.sweep, model=trial.model,
                                       dataset=trial.dataset, method=trial.method)
            boards[group] = {row["trial_key"]: row for row in rows}
        row = boards[group].get(trial.trial_key)
        return None if row is None else row.get(metric)

    out = []
    for entry, (trial, n_matched) in zip(references, chosen, strict=True):
        ours = None
        if trial is not None:
            ours = (computed(trial, entry.metric) if entry.metric in queries.COMPUTED_METRICS
                    else values.get((entry.metric, trial.id)))
        delta, delta_pct, within = judge(entry, ours)
        if trial is None:
            status = NOT_RUN
        elif within is None:
            status = NO_VALUE
        else:
            status = WITHIN if within else OUTSIDE
        out.append({
            "source": entry.source.cite(), "table": entry.table, "model": entry.model,
            "method": entry.method_label, "method_name": entry.method,
            "params": dict(entry.params), "rate": entry.rate, "dataset": entry.dataset,
            "metric": entry.metric, "paper": entry.value, "ours": ours, "delta": delta,
            "delta_pct": delta_pct, "tolerance": entry.tolerance_text,
            "tolerance_abs": entry.tolerance_abs, "within": within, "status": status,
            "sweep": None if trial is None else trial.sweep,
            "trial_key": None if trial is None else trial.trial_key,
            "trial": None if trial is None else trial.trial_key[:12],
            "trial_model": None if trial is None else trial.model,
            "n_matched": n_matched, "notes": entry.notes, "file": entry.file,
            "entry": entry.index, "known_method": entry.known_method,
        })
    return out


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts of rows per outcome: ``within``, ``outside``, ``not_run``, ``no_value``."""
    statuses = [row["status"] for row in rows]
    return {"within": statuses.count(WITHIN), "outside": statuses.count(OUTSIDE),
            "not_run": statuses.count(NOT_RUN), "no_value": statuses.count(NO_VALUE)}


def summary_line(rows: Sequence[dict[str, Any]]) -> str:
    """``N within tolerance, M outside, K not run`` (and how many lack a value, if any)."""
    counts = summary(rows)
    line = (f"{counts['within']} within tolerance, {counts['outside']} outside, "
            f"{counts['not_run']} not run")
    if counts["no_value"]:
        line += f", {counts['no_value']} without a value"
    return line


def compare_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one GitHub Markdown table (``COMPARE_COLUMNS``, readable headings) with
    the summary line under it; for ``sweep report``."""
    from orchestrator.cli.render import Format, render

    if not rows:
        return "_no reference entry_"
    table = render(list(rows), COMPARE_COLUMNS, Format.markdown, headers=COMPARE_HEADERS)
    return f"{table}\n\n{summary_line(rows)}"
