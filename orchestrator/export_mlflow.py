"""``sweep export --mlflow``: every finished trial of the results database as an MLflow run.

The researchers kept their experiments in MLflow before this tool existed; exporting lets
them keep its UI and run comparisons without logging anything by hand.

Layout of a run (one per trial, in one experiment per sweep unless one is named):

- name ``<model>/<method>@<rate>/<dataset>`` (``@<rate>`` only when the method has one);
- params: ``model``, ``method``, ``rate``, ``dataset``, ``is_baseline``, ``seed``,
  ``trial_key``, the method's parameters as ``method.<name>`` (nested ones dotted), the
  evaluation settings the trial's evaluators read as ``evaluation.<path>`` (each evaluator
  declares them; sections of evaluators the trial did not run are left out, since they
  did not shape its numbers), ``evaluation.metrics`` (the evaluators it ran),
  ``evaluation.probe_length`` (the evidence probe) and the dataset's subset settings as
  ``dataset.<name>``. Lists are JSON, None values are left out, values longer than MLflow's
  limit are cut with a visible ``…[truncated]`` suffix;
- metrics: every stored finite metric, ``score`` / ``perf_norm`` / ``speed_norm`` as the
  leaderboard computes them, and the evidence as ``evidence.params_before``,
  ``evidence.params_after``, ``evidence.changed_fraction``, ``evidence.max_abs_dlogits``:
  metrics rather than tags because they are numbers to sort, chart and compare across
  runs (changed fraction against rate, say), which MLflow does for metrics only;
- tags: ``sweep``, ``trial_key``, ``status``, ``attempts``, ``failure_reason``,
  ``error_type``, ``error_message``, ``host``, ``hardware_fingerprint``, ``git_sha``,
  ``compress_sweep.version`` and ``stale_metrics`` (see below); absent values are not set;
- status FINISHED for ``done``, FAILED for ``failed`` / ``timed_out``; start and end time
  from the trial's ``started_at`` / ``finished_at``.

Re-exporting is idempotent. A run is found again by its ``sweep`` and ``trial_key`` tags
and brought up to date: missing params are logged, changed metrics get a new point
(stamped with the export's time, so it becomes the value MLflow shows even when only a
baseline re-ran and the trial's own finish time did not move), tags, status and end time
are corrected. A run deleted in MLflow is created again. Params never need to change: the
trial key is a hash of everything they hold, so a trial whose params differ is another
trial with another run.
(MLflow refuses to change a logged param; should a later version of this exporter flatten
a param differently, the old value stays and a note says so.) MLflow can neither delete a
metric nor change a run's start time: a metric a re-run no longer produces keeps its last
value and is named in the ``stale_metrics`` tag, and a re-run trial keeps the start time
of the attempt first exported (``attempts`` counts them; the end time is the latest).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from orchestrator.db.models import Sweep, Trial
from orchestrator.errors import BadInput, SweepError

INSTALL_HINT = "pip install 'compress-sweep[mlflow]'"
# MLflow's own limits (mlflow.utils.validation), restated so a value is cut here, visibly,
# rather than refused or silently cut by the tracking server.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
TRUNCATED = "…[truncated]"
# Where the run is pages of search results; MLflow's stores all accept this page size.
SEARCH_PAGE = 1000

EXPORTED_STATUSES = ("done", "failed", "timed_out")
RUN_STATUS = {"done": "FINISHED", "failed": "FAILED", "timed_out": "FAILED"}
EVIDENCE_FIELDS = ("params_before", "params_after", "changed_fraction", "max_abs_dlogits")
# Tags this exporter owns: set when the trial has a value, deleted from the run otherwise.
MANAGED_TAGS = (
    "sweep", "trial_key", "status", "attempts", "failure_reason", "error_type",
    "error_message", "host", "hardware_fingerprint", "git_sha", "compress_sweep.version",
    "stale_metrics",
)
# MLflow's rule for param, metric and tag names (letters, digits, _ - . space / :).
_VALID_NAME = re.compile(r"[/\w.\- :]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ExportSummary:
    """What an export did: counts of runs, trials it left out, and notes for the user."""

    uri: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    # Trials left out, by status: pending/running always, failed/timed_out with done_only.
    skipped: dict[str, int] = field(default_factory=dict)
    # MLflow experiment name → id, of every experiment written to.
    experiments: dict[str, str] = field(default_factory=dict)
    # One entry per exported trial: sweep, trial_key, run_id, action (created/updated/…).
    runs: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (what happened, to which key) → how many trials: one note each, not one per trial.
    _per_key: dict[tuple[str, str], int] = field(default_factory=dict, init=False,
                                                 repr=False)

    def note_key(self, problem: str, key: str) -> None:
        """Count a problem with one param or metric name, noted once with its count."""
        self._per_key[(problem, key)] = self._per_key.get((problem, key), 0) + 1

    def _add_key_notes(self) -> None:
        for (problem, key), n in self._per_key.items():
            self.notes.append(f"{key}: {problem} ({_trials(n)})")
        self._per_key.clear()

    def counts(self) -> str:
        """``N created, M updated, K unchanged``."""
        return f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged"

    def lines(self) -> list[str]:
        """The report ``sweep export`` prints: counts, then what was skipped and why."""
        names = ", ".join(self.experiments)
        where = (f"experiment {names}" if len(self.experiments) == 1
                 else f"experiments {names}" if self.experiments else "nothing to export")
        out = [f"MLflow {self.uri} ({where}): {self.counts()}"]
        unfinished = {s: n for s, n in self.skipped.items() if s in ("pending", "running") and n}
        if unfinished:
            out.append(f"skipped {_trials(sum(unfinished.values()))} not finished yet "
                       f"({_listing(unfinished)})")
        failed = {s: n for s, n in self.skipped.items() if s in ("failed", "timed_out") and n}
        if failed:
            out.append(f"skipped {_trials(sum(failed.values()))} that did not finish "
                       f"({_listing(failed)}; --done-only)")
        return out


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


@dataclass
class _RunRecord:
    """Everything one trial's run should hold, read from the database."""

    sweep: str
    trial_key: str
    experiment: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str
    start_ms: int
    end_ms: int


# --------------------------------------------------------------------------- entry point


def export_to_mlflow(
    session: Session,
    uri: str,
    sweeps: list[str] | None = None,
    experiment: str | None = None,
    include_failed: bool = True,
) -> ExportSummary:
    """Create or update one MLflow run per finished trial of ``sweeps`` (default: all).

    ``uri`` is an MLflow tracking URI (``http(s)://…``, ``sqlite:///mlflow.db``, a
    ``file:`` URI or directory for MLflow's file store, …). Runs go to the experiment named
    ``experiment``, or, by default, to one experiment per sweep named after it; missing
    experiments are created. Failed and timed-out trials are exported as FAILED runs unless
    ``include_failed`` is false; pending and running trials never are (``skipped`` counts
    them). Everything goes through an ``MlflowClient`` of its own, so the caller's global
    MLflow state (active run, tracking URI) is left alone.

    Raises :class:`BadInput` when MLflow is not installed, for an unknown sweep, an empty
    URI, an experiment deleted in MLflow or a URI MLflow cannot use, and
    :class:`SweepError` when the tracking store cannot be opened (a server not reachable).
    """
    if not uri or not uri.strip():
        raise BadInput("--mlflow: empty tracking URI; give one such as sqlite:///mlflow.db")
    require_mlflow()
    summary = ExportSummary(uri=redact_uri(uri))
    records = _records(session, sweeps, experiment, include_failed, summary)
    with _mlflow_environment(uri, summary):
        client = _client(uri)
        by_experiment: dict[str, list[_RunRecord]] = defaultdict(list)
        for record in records:
            by_experiment[record.experiment].append(record)
        for name, group in by_experiment.items():
            experiment_id = _experiment_id(client, name)
            summary.experiments[name] = experiment_id
            existing = _existing_runs(client, experiment_id, {r.sweep for r in group}, summary)
            for record in group:
                run = existing.get((record.sweep, record.trial_key))
                if run is None:
                    run_id, action = _create(client, experiment_id, record), "created"
                else:
                    run_id = run.info.run_id
                    action = "updated" if _update(client, run, record, summary) else "unchanged"
                setattr(summary, action, getattr(summary, action) + 1)
                summary.runs.append({"sweep": record.sweep, "trial_key": record.trial_key,
                                     "run_id": run_id, "action": action})
    summary._add_key_notes()
    return summary


# --------------------------------------------------------------------------- MLflow set-up


def require_mlflow() -> Any:
    """The ``mlflow`` module, or :class:`BadInput` naming the extra that installs it."""
    try:
        import mlflow
        from mlflow import MlflowClient  # noqa: F401 - absent from broken installs
    except ImportError as exc:
        detail = "" if exc.name == "mlflow" else f" (importing it failed: {exc})"
        raise BadInput(f"--mlflow needs MLflow, which is not installed{detail}; "
                       f"install it with {INSTALL_HINT}") from None
    return mlflow


def is_file_store(uri: str) -> bool:
    """Whether MLflow would keep ``uri``'s runs in its file store (a directory)."""
    scheme = urlsplit(uri).scheme
    # A one-letter scheme is a Windows drive (C:\\mlruns), not a URI scheme.
    return scheme in ("", "file") or len(scheme) == 1


def redact_uri(uri: str) -> str:
    """``uri`` with its password (if any) replaced by ``***``, for printing."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def _mlflow_environment(uri: str, summary: ExportSummary) -> Iterator[None]:
    """Environment MLflow reads while the export runs, restored afterwards.

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true. A user who
    passes a directory or ``file:`` URI asked for that store, so it is allowed for this call
    only (an explicit ``MLFLOW_ALLOW_FILE_STORE`` of the user's is respected). MLflow also
    prints a "View run" link per run to stdout for a tracking server; with hundreds of
    trials that buries the summary, so it is silenced unless the user set the variable.
    """
    wanted = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    if is_file_store(uri):
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
        summary.notes.append("MLflow keeps its file store in maintenance mode; "
                             "sqlite:///mlflow.db is the backend it recommends")
    added = [name for name in wanted if name not in os.environ]
    for name in added:
        os.environ[name] = wanted[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``; a URI MLflow cannot use becomes one clear line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    shown = redact_uri(uri)
    try:
        return MlflowClient(tracking_uri=uri)
    except ImportError as exc:
        # A database URI needs the database store's dependencies (SQLAlchemy and Alembic,
        # which compress-sweep brings, plus the URI's driver); mlflow-skinny has none.
        raise BadInput(
            f"--mlflow {shown}: this tracking store needs a module that is not installed "
            f"({exc.name or exc}); install the full MLflow package (pip install mlflow) "
            "or the database driver the URI names"
        ) from None
    except MlflowException as exc:
        raise BadInput(f"--mlflow {shown}: MLflow cannot use this tracking URI: "
                       f"{_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a database server that cannot be reached
        raise SweepError(f"--mlflow {shown}: cannot open the tracking store: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _experiment_id(client: Any, name: str) -> str:
    """Id of the active experiment ``name``, created when missing."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(client.create_experiment(name))
    if found.lifecycle_stage != "active":
        raise BadInput(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {found.experiment_id}) or pass --experiment with another name"
        )
    return str(found.experiment_id)


def _existing_runs(
    client: Any, experiment_id: str, sweeps: set[str], summary: ExportSummary
) -> dict[tuple[str, str], Any]:
    """``{(sweep, trial_key): run}`` of the active runs this exporter made in the experiment.

    Deleted runs are not looked at: a run deleted in MLflow is created again. Should two
    runs carry the same tags (two exports racing), the oldest is kept up to date.
    """
    found: dict[tuple[str, str], Any] = {}
    duplicates = 0
    for sweep in sorted(sweeps):
        # MLflow's filter grammar has no escape for a quote inside a double-quoted value;
        # such a name (impossible in a spec, possible in a hand-made database) is matched
        # here instead of in the query.
        query = f'tags.sweep = "{sweep}"' if '"' not in sweep else ""
        token = None
        while True:
            page = client.search_runs([experiment_id], filter_string=query,
                                      max_results=SEARCH_PAGE, order_by=["start_time ASC"],
                                      page_token=token)
            for run in page:
                tags = run.data.tags
                key = tags.get("trial_key")
                if tags.get("sweep") != sweep or not key:
                    continue
                if (sweep, key) in found:
                    duplicates += 1
                    continue
                found[(sweep, key)] = run
            token = page.token
            if not token:
                break
    if duplicates:
        summary.notes.append(
            f"{duplicates} duplicate MLflow run(s) share a sweep and trial key with another "
            "run; only the oldest of each is updated")
    return found


# --------------------------------------------------------------------------- reading the DB


def _records(
    session: Session, sweeps: list[str] | None, experiment: str | None,
    include_failed: bool, summary: ExportSummary,
) -> list[_RunRecord]:
    """The run of every exported trial, in sweep and grid order; counts what is skipped."""
    from orchestrator import queries

    if sweeps:
        names = list(dict.fromkeys(sweeps))
        for name in names:
            queries.sweep_status(session, name)  # BadInput with a suggestion when unknown
    else:
        names = list(session.scalars(select(Sweep.name).order_by(Sweep.created_at, Sweep.name)))
    if experiment is not None and not experiment.strip():
        raise BadInput("--experiment: empty name; give an MLflow experiment name or leave it "
                       "out for one experiment per sweep")
    exported = EXPORTED_STATUSES if include_failed else ("done",)
    version = _version()
    settings_of = _evaluator_settings()
    records: list[_RunRecord] = []
    skipped: dict[str, int] = defaultdict(int)
    for name in names:
        sweep = session.scalars(select(Sweep).where(Sweep.name == name)).one()
        for status, n in session.execute(
            select(Trial.status, func.count())
            .where(Trial.sweep_id == sweep.id, Trial.status.not_in(exported))
            .group_by(Trial.status)
        ).all():
            skipped[status] += int(n)
        # The computed columns come from the leaderboard: one formula, in one place.
        computed = {row["trial_key"]: row for row in
                    queries.leaderboard(session, sweep=name, include_failed=True)}
        trials = session.scalars(
            select(Trial)
            .where(Trial.sweep_id == sweep.id, Trial.status.in_(exported))
            .options(selectinload(Trial.metrics), selectinload(Trial.evidence),
                     selectinload(Trial.environment))
            .order_by(Trial.position, Trial.id)
        ).all()
        for trial in trials:
            records.append(_record(trial, name, experiment or name,
                                   computed.get(trial.trial_key), version, settings_of,
                                   summary))
    order = ("pending", "running", "failed", "timed_out")
    summary.skipped = {s: skipped[s] for s in order if skipped.get(s)}
    return records


def _record(
    trial: Trial, sweep: str, experiment: str, row: Mapping[str, Any] | None, version: str,
    settings_of: Mapping[str, tuple[str, ...]], summary: ExportSummary,
) -> _RunRecord:
    config = trial.config or {}

    params: dict[str, Any] = {
        "model": trial.model, "method": trial.method, "rate": trial.rate,
        "dataset": trial.dataset, "is_baseline": bool(trial.is_baseline),
        "seed": config.get("seed"), "trial_key": trial.trial_key,
    }
    params.update(_flatten(trial.params or {}, "method"))
    params.update(_evaluation_params(config, settings_of))
    dataset = config.get("dataset")
    if isinstance(dataset, Mapping):
        subset = {k: v for k, v in dataset.items() if k not in ("name", "metrics")}
        params.update(_flatten(subset, "dataset"))
    clean_params: dict[str, str] = {}
    for key, value in params.items():
        if value is None or not _valid_key(key, summary, "param"):
            continue
        text = _text(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
            summary.note_key(f"param longer than MLflow's {MAX_PARAM_VALUE} characters, "
                             "exported truncated", key)
        clean_params[key] = text

    metrics: dict[str, float] = {m.name: m.value for m in trial.metrics if m.value is not None}
    if row is not None:
        metrics.update({name: row.get(name) for name in ("score", "perf_norm", "speed_norm")})
    if trial.evidence is not None:
        metrics.update({f"evidence.{name}": getattr(trial.evidence, name)
                        for name in EVIDENCE_FIELDS})
    clean_metrics = {
        name: float(value) for name, value in metrics.items()
        if value is not None and math.isfinite(float(value))
        and _valid_key(name, summary, "metric")
    }

    environment = trial.environment
    tags = {
        "sweep": sweep, "trial_key": trial.trial_key, "status": trial.status,
        "attempts": trial.attempts, "failure_reason": trial.failure_reason,
        "error_type": trial.error_type, "error_message": trial.error_message,
        "host": trial.host,
        "hardware_fingerprint": None if environment is None else environment.hardware_fingerprint,
        "git_sha": None if environment is None else environment.git_sha,
        "compress_sweep.version": version,
    }
    clean_tags = {k: _cut(_text(v), MAX_TAG_VALUE) for k, v in tags.items() if v is not None}

    finished = trial.finished_at or trial.started_at or trial.created_at
    started = trial.started_at or finished
    rate = "" if trial.rate is None else f"@{_text(trial.rate)}"
    return _RunRecord(
        sweep=sweep, trial_key=trial.trial_key, experiment=experiment,
        name=f"{trial.model}/{trial.method}{rate}/{trial.dataset}",
        params=clean_params, metrics=clean_metrics, tags=clean_tags,
        status=RUN_STATUS[trial.status], start_ms=epoch_ms(started), end_ms=epoch_ms(finished),
    )


def _evaluator_settings() -> dict[str, tuple[str, ...]]:
    """Evaluator name → the evaluation settings it reads (as the evaluator declares them)."""
    from workers.evaluators import evaluators

    return {name: info.settings for name, info in evaluators().items()}


def _evaluation_params(
    config: Mapping[str, Any], settings_of: Mapping[str, tuple[str, ...]]
) -> dict[str, Any]:
    """``evaluation.*`` params: only the settings that shaped this trial's numbers."""
    evaluation = config.get("evaluation")
    if not isinstance(evaluation, Mapping):
        return {}
    dataset = config.get("dataset") if isinstance(config.get("dataset"), Mapping) else {}
    ran = dataset.get("metrics") or evaluation.get("metrics") or []
    if any(name not in settings_of for name in ran):
        # An evaluator this version no longer knows: its settings cannot be told apart.
        return _flatten(evaluation, "evaluation")
    out: dict[str, Any] = {"evaluation.metrics": list(ran)}
    if "probe_length" in evaluation:  # the evidence probe, whatever the evaluators
        out["evaluation.probe_length"] = evaluation["probe_length"]
    for name in ran:
        for setting in settings_of[name]:
            if setting in evaluation:
                value = evaluation[setting]
                if isinstance(value, Mapping):
                    out.update(_flatten(value, f"evaluation.{setting}"))
                else:
                    out[f"evaluation.{setting}"] = value
    return out


def _flatten(value: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"prefix.a.b": 1}``; lists stay values (JSON later)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}"
        if isinstance(item, Mapping):
            out.update(_flatten(item, name))  # an empty section adds nothing
        else:
            out[name] = item
    return out


def _text(value: Any) -> str:
    """A param or tag value as MLflow shows it: lists and dicts as JSON, the rest ``str``."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


def _valid_key(key: str, summary: ExportSummary, kind: str) -> bool:
    """Whether MLflow accepts ``key`` as a name; a note names the ones it would refuse."""
    if (len(key) <= MAX_KEY and _VALID_NAME.fullmatch(key)
            and posixpath.normpath(key) == key and not key.startswith(("/", ".."))):
        return True
    summary.note_key(f"not a {kind} name MLflow accepts, not exported", key)
    return False


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, in integer arithmetic (floats lose the last digit)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compress-sweep")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- writing runs


def _now_ms() -> int:
    return epoch_ms(datetime.now(UTC))


def _create(client: Any, experiment_id: str, record: _RunRecord) -> str:
    """A new run holding ``record``; returns its id."""
    from mlflow.entities import Metric, Param, RunTag

    # The identifying tags are set with the run itself: a crash before the end leaves a
    # run the next export finds and completes, never a second one.
    run = client.create_run(experiment_id, start_time=record.start_ms, run_name=record.name,
                            tags={k: record.tags[k] for k in ("sweep", "trial_key")})
    run_id = run.info.run_id
    _log(client, run_id,
         [Metric(k, v, record.end_ms, 0) for k, v in record.metrics.items()],
         [Param(k, v) for k, v in record.params.items()],
         [RunTag(k, v) for k, v in record.tags.items()])
    client.set_terminated(run_id, status=record.status, end_time=record.end_ms)
    return run_id


def _update(client: Any, run: Any, record: _RunRecord, summary: ExportSummary) -> bool:
    """Bring ``run`` up to ``record``; whether anything had to change."""
    from mlflow.entities import Metric, Param, RunTag

    data, info = run.data, run.info
    where = f"{record.sweep}/{record.trial_key[:12]}"
    params = []
    for key, value in record.params.items():
        if key not in data.params:
            params.append(Param(key, value))
        elif data.params[key] != value:
            summary.notes.append(
                f"{where}: MLflow param {key} stays {_cut(repr(data.params[key]), 80)} "
                f"(MLflow params cannot change); the database now gives "
                f"{_cut(repr(value), 80)}")
    # A new point must become the run's latest value: MLflow takes the latest by step, then
    # timestamp, so it is stamped no earlier than now (after every earlier export's points).
    stamp = max(record.end_ms, _now_ms())
    metrics = [Metric(k, v, stamp, 0) for k, v in record.metrics.items()
               if data.metrics.get(k) != v]
    tags = dict(record.tags)
    stale = sorted(set(data.metrics) - set(record.metrics))
    if stale:
        tags["stale_metrics"] = _cut(",".join(stale), MAX_TAG_VALUE)
    changed_tags = [RunTag(k, v) for k, v in tags.items() if data.tags.get(k) != v]
    removed = [k for k in MANAGED_TAGS if k in data.tags and k not in tags]
    _log(client, info.run_id, metrics, params, changed_tags)
    for key in removed:
        client.delete_tag(info.run_id, key)
    terminate = info.status != record.status or info.end_time != record.end_ms
    if terminate:
        client.set_terminated(info.run_id, status=record.status, end_time=record.end_ms)
    return bool(params or metrics or changed_tags or removed or terminate)


def _log(client: Any, run_id: str, metrics: list, params: list, tags: list) -> None:
    """``log_batch`` in as few calls as MLflow's per-request limits allow."""
    while metrics or params or tags:
        p, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
        t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
        room = MAX_ENTITIES_PER_BATCH - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)


__all__ = ["ExportSummary", "epoch_ms", "export_to_mlflow", "is_file_store", "redact_uri",
           "require_mlflow"]
