"""``sweep report SWEEP``: one Markdown file per sweep, from the database only.

What the researchers wrote by hand per experiment: the spec, where it ran, the
leaderboard, the paper-vs-reproduction table, the plots, the failures and why, and the
evidence that every variant differs from its base. The report is written to a temporary
file next to its destination and renamed into place, so a failed report never leaves a
half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from orchestrator.db.models import Sweep, Trial

# Where a failure's message is cut in the failures table (the full text: `sweep show`).
MESSAGE_CHARS = 160


@dataclass
class Report:
    """A written report: its Markdown file and the images it embeds."""

    path: Path
    images: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)


def _md_text(value: Any) -> str:
    """A value as the text of a Markdown table cell (pipes escaped, one line)."""
    from orchestrator.cli.render import cell

    return " ".join(cell(value).replace("|", "\\|").split())


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
             headers: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table, or a line saying there is nothing to show."""
    from orchestrator.cli.render import Format, render

    if not rows:
        return "_none_"
    return render(list(rows), list(columns), Format.markdown, headers=headers or {}) or ""


def _sweep(session: Session, name: str) -> Sweep:
    from orchestrator.queries import _sweeps

    return _sweeps(session, name)[0]


def _trials(session: Session, sweep: Sweep) -> list[Trial]:
    return list(session.scalars(
        select(Trial).where(Trial.sweep_id == sweep.id)
        .options(selectinload(Trial.evidence), selectinload(Trial.environment))
        .order_by(Trial.position, Trial.id)
    ))


def _label(trial: Trial) -> str:
    rate = "" if trial.rate is None else f" @ {trial.rate:g}"
    return f"{trial.method}{rate}"


def environments_section(trials: list[Trial]) -> str:
    """Each distinct environment the sweep's trials ran in, with how many ran there."""
    seen: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    for trial in trials:
        if trial.environment is not None:
            seen[trial.environment.fingerprint] = trial.environment
            counts[trial.environment.fingerprint] += 1
    if not seen:
        return "_no trial has finished yet_"
    parts = []
    for fingerprint, env in seen.items():
        hardware = ", ".join(f"{k} {v}" for k, v in sorted(env.hardware.items()))
        packages = ", ".join(f"{k} {v}" for k, v in sorted(env.packages.items()))
        parts.append(
            f"- **{counts[fingerprint]} trial(s)**, hardware `{env.hardware_fingerprint[:12]}`"
            f": {hardware}\n  - packages: {packages}\n  - git: `{env.git_sha or 'unknown'}`")
    if len({env.hardware_fingerprint for env in seen.values()}) > 1:
        parts.append("\nTrials ran on more than one kind of hardware: speed figures (and "
                     "SpeedNorm) are compared only within one hardware fingerprint.")
    return "\n".join(parts)


def describe_costs(costs: dict[str, Any]) -> str:
    """One line on what a sweep read from disk and where its trials' time went."""
    if not costs["trials"]:
        return "no finished trial yet"
    line = (f"{costs['model_loads']} model load(s) in {costs['worker_processes']} worker "
            f"process(es) (at most {costs['max_loads_per_model_process']} per model per "
            f"process), {costs['calibrations']} calibration(s) computed for "
            f"{costs['calibrating_trials']} calibrating trial(s); trial time "
            f"{costs['trial_seconds']:.1f} s: evaluators {costs['evaluation_seconds']:.1f} s, "
            f"methods {costs['method_seconds']:.1f} s, model loading "
            f"{costs['model_load_seconds']:.1f} s")
    if costs["trials_without_figures"]:
        line += f" ({costs['trials_without_figures']} older trial(s) without these figures)"
    return line


def failures_section(trials: list[Trial]) -> str:
    """The failed and timed-out trials, with their reason and the first line of the error."""
    rows = []
    for trial in trials:
        if trial.status not in ("failed", "timed_out"):
            continue
        message = (trial.error_message or "").strip().splitlines()
        first = message[0] if message else ""
        if len(first) > MESSAGE_CHARS:
            first = first[:MESSAGE_CHARS - 1] + "…"
        rows.append({"trial": _label(trial), "model": trial.model, "dataset": trial.dataset,
                     "status": trial.status, "reason": trial.failure_reason,
                     "error": trial.error_type, "message": first, "attempts": trial.attempts,
                     "trial_key": trial.trial_key[:12]})
    if not rows:
        return "No trial failed."
    reasons = Counter(r["reason"] or r["status"] for r in rows)
    summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return (f"{len(rows)} trial(s) did not produce a result ({summary}). Full tracebacks: "
            "`sweep show TRIAL_KEY`.\n\n"
            + md_table(rows, ["trial", "model", "dataset", "status", "reason", "error",
                              "message", "attempts", "trial_key"]))


def _yes_no(flag: Any) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def evidence_section(trials: list[Trial]) -> str:
    """Per finished trial: the evidence that its variant differs from the base."""
    rows = []
    for trial in trials:
        evidence = trial.evidence
        if trial.status != "done" or evidence is None:
            continue
        details = evidence.details or {}
        before, after = evidence.params_before, evidence.params_after
        rows.append({
            "trial": _label(trial) + (" (baseline)" if trial.is_baseline else ""),
            "model": trial.model, "dataset": trial.dataset,
            "params_before": before, "params_after": after,
            "params_kept": None if not before or after is None else after / before,
            "changed_fraction": evidence.changed_fraction,
            "max_abs_dlogits": evidence.max_abs_dlogits,
            "causality": details.get("causality_max_abs_dlogits"),
            "calibration_reused": _yes_no(details.get("calibration_reused")),
            "recovered": _yes_no(details.get("recovered_from_result_file")),
            "trial_key": trial.trial_key[:12],
        })
    if not rows:
        return "_no finished trial_"
    return (
        "Every compressed variant must differ from its base: `max |Δlogits|` is measured on "
        "a probe batch against the base model (0 for the baseline), `changed fraction` is "
        "the fraction of weights changed (an upper bound for structural methods), and "
        "`causality` the largest change of earlier positions' logits when later tokens "
        "change (0 for a causal model).\n\n"
        + md_table(rows, ["trial", "model", "dataset", "params_before", "params_after",
                          "params_kept", "changed_fraction", "max_abs_dlogits", "causality",
                          "calibration_reused", "recovered", "trial_key"],
                   {"params_kept": "params kept", "changed_fraction": "changed fraction",
                    "max_abs_dlogits": "max \\|Δlogits\\|", "calibration_reused":
                    "calibration reused", "recovered": "recovered from file"}))


def leaderboard_section(session: Session, sweep: Sweep) -> str:
    """The sweep's leaderboard by score, every trial listed (failed ones unranked)."""
    from orchestrator import queries
    from orchestrator.cli.render import Format
    from orchestrator.cli.results import leaderboard_table

    rows = queries.leaderboard(session, metric="score", sweep=sweep.name, include_failed=True)
    if not rows:
        return "_no finished trial_"
    flat, columns, headers = leaderboard_table(rows, "score", include_failed=True,
                                               fmt=Format.markdown)
    quality, weight = queries._score_settings(sweep.spec)
    return (f"Ranked by score = max({weight:g}·PerfNorm + {1 - weight:g}·SpeedNorm, 0), "
            f"PerfNorm from `{quality}`, SpeedNorm from `{queries.SPEED_METRIC}` against the "
            "baseline on the same hardware. `± speed_norm` is the spread of SpeedNorm that "
            "the trial's own timing noise (IQR of the timed repeats) explains, a lower "
            "bound: trials timed at different moments drift further apart, so score "
            "differences of about this size or less are noise.\n\n"
            + md_table(flat, columns, headers))


def compare_section(session: Session, sweep: Sweep, references: Sequence[Path] | None,
                    trials: list[Trial]) -> str | None:
    """Paper vs reproduction for the references about this sweep's models and datasets,
    or None when no reference is about them."""
    from orchestrator.compare import compare, compare_table_markdown, model_matches
    from orchestrator.references import load_references

    loaded = load_references(references)
    pairs = {(t.model, t.dataset) for t in trials}
    relevant = [entry for entry in loaded
                if any(model_matches(model, entry.model) and dataset == entry.dataset
                       for model, dataset in pairs)]
    if not relevant:
        return None
    rows = compare(session, relevant, sweep=sweep.name)
    return compare_table_markdown(rows)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_report(session: Session, sweep_name: str, out: Path, *,
                 references: Sequence[Path] | None = None, plots: bool = True,
                 image_format: str = "png") -> Report:
    """Write the report of ``sweep_name`` to ``out`` (a ``.md`` file); plots go to
    ``<out's directory>/<sweep>-plots/`` and are linked relatively.

    ``references``: reference files or directories for the paper-vs-reproduction table
    (None: ``sweeps/references`` if it exists; the section is left out when no reference
    is about this sweep's models and datasets).
    """
    import yaml

    from orchestrator import queries

    sweep = _sweep(session, sweep_name)
    trials = _trials(session, sweep)
    status = queries.sweep_status(session, sweep.name)[0]
    report = Report(path=out)
    counts = ", ".join(f"{n} {name}" for name, n in status["counts"].items() if n)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Generated {now} by `sweep report` from the results database. "
             f"{status['total']} trial(s): {counts or 'none'}.", ""]

    def section(title: str, body: str) -> None:
        report.sections.append(title)
        lines.extend([f"## {title}", "", body.rstrip(), ""])

    spec_text = yaml.safe_dump(sweep.spec, sort_keys=False, allow_unicode=True).rstrip()
    where = f"Launched from `{sweep.spec_path}`.\n\n" if sweep.spec_path else ""
    section("Spec", f"{where}```yaml\n{spec_text}\n```")
    section("Environment", environments_section(trials) + "\n\n**Cost of the finished "
            "trials:** " + describe_costs(queries.sweep_costs(session, sweep.name)) + ".")
    section("Leaderboard", leaderboard_section(session, sweep))

    default_references = Path("sweeps/references")
    if references is None and default_references.is_dir():
        references = [default_references]
    if references:
        table = compare_section(session, sweep, references, trials)
        if table is not None:
            section("Paper vs reproduction", table)

    if plots and any(t.status == "done" for t in trials):
        from orchestrator.plots import plot_sweep

        plot_dir = out.parent / f"{_slug(sweep.name)}-plots"
        files = plot_sweep(session, sweep.name, plot_dir, formats=(image_format,))
        body = []
        for plot in files:
            relative = os.path.relpath(plot.path, out.parent)
            title = f"{plot.y} vs {plot.x} — {plot.model}, {plot.dataset}"
            body.append(f"### {title}\n\n![{title}]({Path(relative).as_posix()})\n")
            report.images.append(Path(plot.path))
        section("Plots", "\n".join(body) or "_nothing to plot_")

    section("Failures", failures_section(trials))
    section("Evidence", evidence_section(trials))
    _write_atomically(out, "\n".join(lines).rstrip() + "\n")
    return report


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "sweep"
