"""Reads of the results database for `sweep status | leaderboard | …`: plain dict rows.

Nothing here writes. The score is computed at read time from the stored metrics and the
sweep's stored spec, so changing the weight in a spec and relaunching re-scores old trials
without re-running them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Row, Select, and_, case, func, literal, or_, select, union_all
from sqlalchemy.orm import Session, aliased

from orchestrator.db.models import TRIAL_STATUSES, Environment, Metric, Sweep, Trial
from orchestrator.errors import BadInput, did_you_mean

SPEED_METRIC = "decode_ms_per_token"
# Its interquartile range over the timed repeats: the timing noise of SPEED_METRIC.
SPEED_NOISE_METRIC = "decode_ms_per_token_iqr"
DEFAULT_QUALITY_METRIC = "perplexity"
DEFAULT_WEIGHT = 0.5
# Columns the leaderboard computes; all are higher-is-better.
COMPUTED_METRICS: tuple[str, ...] = ("score", "perf_norm", "speed_norm")


def _sweeps(session: Session, sweep: str | None) -> list[Sweep]:
    if sweep is None:
        return list(session.scalars(select(Sweep).order_by(Sweep.created_at, Sweep.name)))
    found = session.scalars(select(Sweep).where(Sweep.name == sweep)).one_or_none()
    if found is None:
        names = list(session.scalars(select(Sweep.name)))
        known = f"; known sweeps: {', '.join(sorted(names))}" if names else "; no sweeps yet"
        raise BadInput(f"unknown sweep {sweep!r}{did_you_mean(sweep, names)}{known}")
    return [found]


def _last_activity(session: Session, sweeps: list[Sweep]) -> dict[int, datetime]:
    # A sweep row changes only at launch; the trials say when anything last happened.
    latest = {s.id: s.updated_at for s in sweeps}
    rows = session.execute(
        select(Trial.sweep_id, func.max(Trial.started_at), func.max(Trial.finished_at))
        .where(Trial.sweep_id.in_(latest))
        .group_by(Trial.sweep_id)
    ).all()
    for sweep_id, started, finished in rows:
        for moment in (started, finished):
            if moment is not None and moment > latest[sweep_id]:
                latest[sweep_id] = moment
    return latest


def _status_counts(session: Session, sweep_ids: list[int]) -> dict[int, dict[str, int]]:
    counts = {sweep_id: dict.fromkeys(TRIAL_STATUSES, 0) for sweep_id in sweep_ids}
    rows = session.execute(
        select(Trial.sweep_id, Trial.status, func.count())
        .where(Trial.sweep_id.in_(sweep_ids))
        .group_by(Trial.sweep_id, Trial.status)
    ).all()
    for sweep_id, status, n in rows:
        counts[sweep_id][status] = int(n)
    return counts


def list_sweeps(session: Session) -> list[dict[str, Any]]:
    """Every sweep, oldest first.

    Row keys: ``name``, ``spec_path``, ``created_at``, ``updated_at`` (last activity of the
    sweep or any of its trials), ``trials`` and its alias ``total`` (the trial count),
    ``counts`` ({status: n} with every status),
    ``models`` and ``methods`` (sorted distinct names).
    """
    sweeps = _sweeps(session, None)
    ids = [s.id for s in sweeps]
    counts = _status_counts(session, ids)
    activity = _last_activity(session, sweeps)
    models: dict[int, set[str]] = defaultdict(set)
    methods: dict[int, set[str]] = defaultdict(set)
    pairs = session.execute(
        select(Trial.sweep_id, Trial.model, Trial.method)
        .where(Trial.sweep_id.in_(ids))
        .distinct()
    ).all()
    for sweep_id, model, method in pairs:
        models[sweep_id].add(model)
        methods[sweep_id].add(method)
    return [
        {
            "name": s.name,
            "spec_path": s.spec_path,
            "created_at": s.created_at,
            "updated_at": activity[s.id],
            "trials": sum(counts[s.id].values()),
            "total": sum(counts[s.id].values()),
            "counts": counts[s.id],
            "models": sorted(models[s.id]),
            "methods": sorted(methods[s.id]),
        }
        for s in sweeps
    ]


def sweep_status(session: Session, sweep: str | None = None) -> list[dict[str, Any]]:
    """Trial counts per status of one sweep (or of every sweep when ``sweep`` is None).

    Rows: ``{"name", "counts": {"pending", "running", "done", "failed", "timed_out"},
    "total", "updated_at"}``; every status is always present. An unknown sweep name raises
    :class:`BadInput` with a suggestion.
    """
    sweeps = _sweeps(session, sweep)
    counts = _status_counts(session, [s.id for s in sweeps])
    activity = _last_activity(session, sweeps)
    return [
        {
            "name": s.name,
            "counts": counts[s.id],
            "total": sum(counts[s.id].values()),
            "updated_at": activity[s.id],
        }
        for s in sweeps
    ]


def hardware_dependent_metrics() -> frozenset[str]:
    """Metrics whose values depend on the hardware: those of the ``speed`` evaluator."""
    from workers.evaluators import evaluators

    return frozenset(evaluators()["speed"].metrics)


def _score_settings(spec: dict[str, Any] | None) -> tuple[str, float]:
    score = (spec or {}).get("score") or {}
    quality = score.get("quality_metric") or DEFAULT_QUALITY_METRIC
    weight = score.get("weight")
    return str(quality), float(DEFAULT_WEIGHT if weight is None else weight)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def perf_norm(
    quality: float | None, quality_base: float | None, direction: str | None
) -> float | None:
    """Quality relative to the baseline, 1.0 = as good as the base, higher is better."""
    if direction == "higher":
        return _ratio(quality, quality_base)
    if direction == "lower":
        return _ratio(quality_base, quality)
    return None


def speed_norm(tpt: float | None, tpt_base: float | None) -> float | None:
    """1 − time per token / the baseline's: 0 for the base, 0.5 for twice as fast."""
    ratio = _ratio(tpt, tpt_base)
    return None if ratio is None else 1.0 - ratio


def score(perf: float | None, speed: float | None, weight: float) -> float | None:
    """max(w·PerfNorm + (1−w)·SpeedNorm, 0); None when either part is missing."""
    if perf is None or speed is None:
        return None
    return max(weight * perf + (1.0 - weight) * speed, 0.0)


def leaderboard(
    session: Session,
    metric: str = "score",
    sweep: str | None = None,
    include_failed: bool = False,
    limit: int | None = None,
    *,
    model: str | None = None,
    method: str | None = None,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """One row per finished trial (failed ones only with ``include_failed``), best first.

    ``metric`` is ``score`` (default), ``perf_norm``, ``speed_norm`` or any stored metric
    name. Only finished (``done``) trials rank: finished rows lacking the metric follow
    them, then, with ``include_failed``, the failed and timed-out trials (including those
    whose evaluation was invalid), each group in grid order (sweep, position). Ties keep
    the grid order too. Stored metrics sort by the direction most of the finished rows
    store for them (higher if none is stored). ``limit`` keeps only the first ``limit``
    rows of that order; they are ranked in the database and only they are built, so
    ``--top 20`` stays fast over many results.

    ``model``, ``dataset`` and ``method`` keep only the trials with that model id, dataset
    name or method name; the baselines of the kept models and datasets stay with a method
    filter, as the reference the other rows are measured against.

    Row keys: ``sweep``, ``model``, ``method``, ``rate``, ``dataset``,
    ``params``, ``position``, ``trial_key``, ``status``, ``failure_reason``,
    ``is_baseline``, ``error_type``, ``score``, ``perf_norm``, ``speed_norm``,
    ``speed_norm_noise`` (the spread of ``speed_norm`` its own timing noise explains:
    ``decode_ms_per_token_iqr`` over the baseline's time per token), ``metrics`` ({name:
    value}), ``directions`` ({name: direction}), ``quality_metric`` (the sweep's), and the
    change against the baseline: ``delta_metric`` (``metric`` when it is stored, else the
    quality metric), ``baseline_value``, ``delta`` (value − baseline value) and
    ``delta_pct`` (``100·delta/|baseline value|``). A hardware-dependent metric (one of
    the ``speed`` evaluator's) has no delta against a baseline measured on other hardware.

    A trial's baseline is the finished ``is_baseline`` trial of the same sweep, model and
    dataset. PerfNorm uses the sweep spec's ``score.quality_metric`` (default perplexity)
    and SpeedNorm ``decode_ms_per_token``, the latter only when both ran on the same
    hardware fingerprint. Failed trials never get a score. An unknown ``metric`` raises
    :class:`BadInput` listing the available names.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, not {limit!r}")
    sweeps = _sweeps(session, sweep)
    by_id = {s.id: s for s in sweeps}
    sweep_ids = list(by_id)
    shown = ("done", "failed", "timed_out") if include_failed else ("done",)
    if metric not in COMPUTED_METRICS:
        _check_metric(session, metric, sweep_ids)
    if not sweeps:
        return []
    chosen = _Filters(model, method, dataset)
    baselines = _baselines(session, sweep_ids)
    if metric in COMPUTED_METRICS:
        order = _rank_computed(session, metric, sweeps, baselines, limit, chosen)
    else:
        higher = _higher_is_better(session, metric, sweep_ids, ("done",))
        order = _rank_stored(session, metric, sweep_ids, higher, limit, chosen)
    if limit is None or len(order) < limit:
        missing = None if limit is None else limit - len(order)
        order += _unranked(session, sweep_ids, shown, set(order), missing, chosen)
    return _rows(session, by_id, shown, baselines, order, metric)


@dataclass(frozen=True)
class _Filters:
    """The ``model`` / ``method`` / ``dataset`` filters of a leaderboard."""

    model: str | None = None
    method: str | None = None
    dataset: str | None = None

    def on(self, trial: Any) -> list[Any]:
        """SQL conditions on ``trial`` (the Trial class or an alias of it)."""
        conditions = []
        if self.model is not None:
            conditions.append(trial.model == self.model)
        if self.dataset is not None:
            conditions.append(trial.dataset == self.dataset)
        if self.method is not None:
            conditions.append(or_(trial.method == self.method, trial.is_baseline))
        return conditions


# The leaderboard ranks in SQL and builds rows only for the trials it returns: loading every
# trial and metric into Python took seconds over 100,000 results. Ties, and the rows lacking
# the metric, keep the grid order (sweep id, position, trial id) in every query.
_GRID_ORDER = (Trial.sweep_id, Trial.position, Trial.id)
# Up to this many rows are built from id lists; more (no limit) are read sweep by sweep.
_BY_ID_ROWS = 500


def _check_metric(session: Session, metric: str, sweep_ids: list[int]) -> None:
    known = session.scalar(
        select(Metric.id)
        .join(Trial, Metric.trial_id == Trial.id)
        .where(Metric.name == metric, Trial.sweep_id.in_(sweep_ids))
        .limit(1)
    )
    if known is not None:
        return
    names = session.scalars(
        select(Metric.name)
        .join(Trial, Metric.trial_id == Trial.id)
        .where(Trial.sweep_id.in_(sweep_ids))
        .distinct()
    )
    available = set(COMPUTED_METRICS) | set(names)
    raise BadInput(
        f"unknown metric {metric!r}{did_you_mean(metric, available)}; "
        f"available: {', '.join(sorted(available))}"
    )


def _baselines(session: Session, sweep_ids: list[int]) -> dict[tuple[int, str, str], Row]:
    """The baseline of each (sweep, model, dataset): ``id`` and ``hardware_fingerprint``."""
    rows = session.execute(
        select(Trial.id, Trial.sweep_id, Trial.model, Trial.dataset,
               Environment.hardware_fingerprint)
        .outerjoin(Environment, Trial.environment_id == Environment.id)
        .where(Trial.sweep_id.in_(sweep_ids), Trial.status == "done", Trial.is_baseline)
        .order_by(*_GRID_ORDER)
    ).all()
    found: dict[tuple[int, str, str], Row] = {}
    for row in rows:
        # The first baseline of a pair in grid order wins should there be several.
        found.setdefault((row.sweep_id, row.model, row.dataset), row)
    return found


def _higher_is_better(
    session: Session, metric: str, sweep_ids: list[int], shown: tuple[str, ...]
) -> bool:
    """The direction most listed rows store for ``metric``; on a tie, the first row's.

    A metric's direction comes from its evaluator, so the stored directions nearly always
    agree: one look at the index settles it, and only mixed directions need the count.
    """
    stored = set(session.scalars(
        select(Metric.direction)
        .where(Metric.name == metric, Metric.direction.is_not(None))
        .distinct()
    ))
    if "lower" not in stored:  # higher or nothing stored: higher either way
        return True
    listed = (
        select(Metric.direction)
        .join(Trial, Metric.trial_id == Trial.id)
        .where(Metric.name == metric, Metric.direction.is_not(None),
               Trial.sweep_id.in_(sweep_ids), Trial.status.in_(shown))
    )
    if "higher" not in stored:  # lower, unless no listed row stores a direction
        return session.scalar(listed.limit(1)) is None
    counts = dict(session.execute(
        listed.with_only_columns(Metric.direction, func.count()).group_by(Metric.direction)
    ).all())
    higher, lower = counts.get("higher", 0), counts.get("lower", 0)
    if higher != lower:
        return higher > lower
    return higher == 0 or session.scalar(listed.order_by(*_GRID_ORDER).limit(1)) == "higher"


def _rank_stored(
    session: Session, metric: str, sweep_ids: list[int], higher: bool, limit: int | None,
    chosen: _Filters,
) -> list[int]:
    """Ids of the finished trials with a value of ``metric``, best first."""
    best_first = Metric.value.desc() if higher else Metric.value.asc()
    query = (
        select(Trial.id)
        .join(Metric, and_(Metric.trial_id == Trial.id, Metric.name == metric))
        .where(Trial.sweep_id.in_(sweep_ids), Trial.status == "done",
               Metric.value.is_not(None), *chosen.on(Trial))
        .order_by(best_first, *_GRID_ORDER)
        .limit(limit)
    )
    return list(session.scalars(query))


def _rank_computed(
    session: Session, metric: str, sweeps: list[Sweep],
    baselines: dict[tuple[int, str, str], Row], limit: int | None, chosen: _Filters,
) -> list[int]:
    """Ids of the finished trials with a value of the computed ``metric``, best first."""
    # One query part per (quality metric, weight) of the sweeps' specs, so that the metric
    # names are constants (the (name, ...) index serves them) and the weight a literal.
    groups: dict[tuple[str, float], set[int]] = defaultdict(set)
    for s in sweeps:
        groups[_score_settings(s.spec)].add(s.id)
    parts = []
    for (quality, weight), sweep_ids in groups.items():
        base_ids = [b.id for (sweep_id, _, _), b in baselines.items() if sweep_id in sweep_ids]
        if base_ids:
            parts.append(_computed_values(metric, quality, weight, base_ids, chosen))
    if not parts:
        return []
    ranked = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery("ranked")
    query = (
        select(ranked.c.id)
        .order_by(ranked.c.value.desc(), ranked.c.sweep_id, ranked.c.position, ranked.c.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def _nonzero(value: Any) -> Any:
    # Typed, so that SQLAlchemy casts the divisor to FLOAT: untyped it casts it to NUMERIC
    # on PostgreSQL, which rounds a double to 15 digits.
    return func.nullif(value, 0.0, type_=Float)


def _computed_values(metric: str, quality: str, weight: float, base_ids: list[int],
                     chosen: _Filters) -> Select:
    """``(id, sweep_id, position, value)`` of every finished trial with a baseline among
    ``base_ids`` and a value of ``metric`` (score, perf_norm or speed_norm).

    The arithmetic is that of :func:`perf_norm`, :func:`speed_norm` and :func:`score`,
    operation for operation in IEEE doubles, so the database orders and ties rows exactly
    as Python would; the values shown are then computed by those functions. (PostgreSQL
    refuses a ratio beyond the range of a double, where Python would give inf or 0: no
    real metric comes within hundreds of orders of magnitude of that.)
    """
    b, t = aliased(Trial, name="b"), aliased(Trial, name="t")
    bq, bs, q, s = (aliased(Metric, name=name) for name in ("bq", "bs", "q", "s"))
    be, e = aliased(Environment, name="be"), aliased(Environment, name="e")
    base = (
        select(b.sweep_id, b.model, b.dataset, bq.value.label("quality"),
               bq.direction.label("direction"), bs.value.label("tpt"),
               be.hardware_fingerprint.label("hardware"))
        .outerjoin(bq, and_(bq.trial_id == b.id, bq.name == quality))
        .outerjoin(bs, and_(bs.trial_id == b.id, bs.name == SPEED_METRIC))
        .outerjoin(be, be.id == b.environment_id)
        .where(b.id.in_(base_ids))
        .subquery("base")
    )
    query = select(t.id, t.sweep_id, t.position).select_from(base).join(t, and_(
        t.sweep_id == base.c.sweep_id, t.status == "done",
        t.model == base.c.model, t.dataset == base.c.dataset, *chosen.on(t),
    ))
    # Only the metrics the value needs are joined: each join is a lookup per trial.
    if metric != "speed_norm":
        query = query.outerjoin(q, and_(q.trial_id == t.id, q.name == quality))
        direction = func.coalesce(q.direction, base.c.direction)
        perf = case(
            (direction == "higher", q.value / _nonzero(base.c.quality)),
            (direction == "lower", base.c.quality / _nonzero(q.value)),
        )
    if metric != "perf_norm":
        query = query.outerjoin(s, and_(s.trial_id == t.id, s.name == SPEED_METRIC))
        query = query.outerjoin(e, e.id == t.environment_id)
        speed = case(
            (e.hardware_fingerprint == base.c.hardware, 1.0 - s.value / _nonzero(base.c.tpt)),
        )
    if metric == "perf_norm":
        value = perf
    elif metric == "speed_norm":
        value = speed
    else:
        value = literal(weight, Float) * perf + literal(1.0 - weight, Float) * speed
    # OFFSET 0 keeps this a subquery of its own on both backends, so the expression is
    # computed once per row rather than once for the filter and again for the sort key.
    scored = query.add_columns(value.label("value")).offset(0).subquery("scored")
    ranked = scored.c.value
    if metric == "score":
        ranked = case((scored.c.value > 0.0, scored.c.value), else_=0.0)  # max(…, 0)
    return select(scored.c.id, scored.c.sweep_id, scored.c.position, ranked.label("value")).where(
        scored.c.value.is_not(None)
    )


def _unranked(
    session: Session, sweep_ids: list[int], shown: tuple[str, ...], ranked: set[int],
    count: int | None, chosen: _Filters,
) -> list[int]:
    """The first ``count`` (all if None) listed trials outside ``ranked``: the finished
    ones, then the others, each in grid order."""
    query = (
        select(Trial.id)
        .where(Trial.sweep_id.in_(sweep_ids), Trial.status.in_(shown), *chosen.on(Trial))
        .order_by(case((Trial.status == "done", 0), else_=1), *_GRID_ORDER)
        # At most len(ranked) of the first count + len(ranked) rows are ranked ones.
        .limit(None if count is None else count + len(ranked))
    )
    return [i for i in session.scalars(query) if i not in ranked][:count]


def _rows(
    session: Session, by_id: dict[int, Sweep], shown: tuple[str, ...],
    baselines: dict[tuple[int, str, str], Row], order: list[int], metric: str,
) -> list[dict[str, Any]]:
    """The leaderboard rows of the trials ``order`` names, in that order."""
    trial_query = (
        select(
            Trial.id,
            Trial.sweep_id,
            Trial.trial_key,
            Trial.position,
            Trial.model,
            Trial.method,
            Trial.rate,
            Trial.dataset,
            Trial.params,
            Trial.is_baseline,
            Trial.status,
            Trial.failure_reason,
            Trial.error_type,
            Environment.hardware_fingerprint,
        )
        .outerjoin(Environment, Trial.environment_id == Environment.id)
    )
    metric_query = select(Metric.trial_id, Metric.name, Metric.value, Metric.direction)
    if len(order) <= _BY_ID_ROWS:
        trials = session.execute(trial_query.where(Trial.id.in_(order))).all()
        needed = set(order) | {
            b.id for t in trials if (b := baselines.get((t.sweep_id, t.model, t.dataset)))
        }
        metric_query = metric_query.where(Metric.trial_id.in_(needed))
    else:
        # Every listed trial of the sweeps (baselines are finished, so they are among them).
        listed = (Trial.sweep_id.in_(by_id), Trial.status.in_(shown))
        trials = session.execute(trial_query.where(*listed)).all()
        metric_query = metric_query.join(Trial, Metric.trial_id == Trial.id).where(*listed)

    values: dict[int, dict[str, float | None]] = defaultdict(dict)
    directions: dict[int, dict[str, str | None]] = defaultdict(dict)
    # By name, as Trial.metrics lists them, so the keys come in the same order on every backend.
    ordered = metric_query.order_by(Metric.trial_id, Metric.name)
    for trial_id, name, value, direction in session.execute(ordered):
        values[trial_id][name] = value
        directions[trial_id][name] = direction

    hardware_bound = hardware_dependent_metrics()
    built: dict[int, dict[str, Any]] = {}
    for t in trials:
        perf = speed = total = noise = None
        quality_metric, weight = _score_settings(by_id[t.sweep_id].spec)
        delta_metric = quality_metric if metric in COMPUTED_METRICS else metric
        base = baselines.get((t.sweep_id, t.model, t.dataset))
        same_hardware = base is not None and t.hardware_fingerprint is not None and (
            t.hardware_fingerprint == base.hardware_fingerprint)
        base_value = delta = delta_pct = None
        if t.status == "done" and base is not None and (
                same_hardware or delta_metric not in hardware_bound):
            base_value = values[base.id].get(delta_metric)
            value = values[t.id].get(delta_metric)
            if value is not None and base_value is not None:
                delta = value - base_value
                delta_pct = 100.0 * delta / abs(base_value) if base_value != 0 else None
        if t.status == "done" and base is not None:
            direction = directions[t.id].get(quality_metric) or directions[base.id].get(
                quality_metric
            )
            perf = perf_norm(
                values[t.id].get(quality_metric), values[base.id].get(quality_metric), direction
            )
            if same_hardware:
                speed = speed_norm(
                    values[t.id].get(SPEED_METRIC), values[base.id].get(SPEED_METRIC)
                )
                noise = _ratio(values[t.id].get(SPEED_NOISE_METRIC),
                               values[base.id].get(SPEED_METRIC))
            total = score(perf, speed, weight)
        built[t.id] = {
            "sweep": by_id[t.sweep_id].name,
            "model": t.model,
            "method": t.method,
            "rate": t.rate,
            "dataset": t.dataset,
            "params": t.params,
            "position": t.position,
            "trial_key": t.trial_key,
            "status": t.status,
            "failure_reason": t.failure_reason,
            "is_baseline": t.is_baseline,
            "error_type": t.error_type,
            "score": total,
            "perf_norm": perf,
            "speed_norm": speed,
            "speed_norm_noise": noise,
            "metrics": dict(values[t.id]),
            "directions": dict(directions[t.id]),
            "quality_metric": quality_metric,
            "delta_metric": delta_metric,
            "baseline_value": base_value,
            "delta": delta,
            "delta_pct": delta_pct,
        }
    return [built[i] for i in order]


MIN_KEY_PREFIX = 4
MAX_CANDIDATES = 5


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def trial_detail(session: Session, key_prefix: str, sweep: str | None = None) -> dict[str, Any]:
    """Everything stored about the one trial whose key starts with ``key_prefix``.

    Keys: ``sweep``, ``trial_key``, ``model``, ``method``, ``params``, ``rate``, ``dataset``,
    ``is_baseline``, ``status``, ``attempts``, ``host``, ``gpus`` (the GPU ids Ray gave the
    trial, "" on CPU, None before its worker announced itself), ``created_at``, ``started_at``,
    ``finished_at`` (ISO strings or None), ``duration_s``, ``config``, ``metrics`` (a list
    of ``{name, value, direction, note}``), ``evidence`` (None or ``{params_before,
    params_after, changed_fraction, max_abs_dlogits, details}``), ``environment`` (None or
    ``{hardware, packages, git_sha, fingerprint}``) and ``error`` (None or ``{type,
    message, traceback}``). The result is JSON-serialisable as it is.

    Raises :class:`BadInput` for a prefix shorter than ``MIN_KEY_PREFIX`` characters, one
    matching no trial, or one matching several (naming up to ``MAX_CANDIDATES`` of them).
    """
    prefix = key_prefix.strip()
    if len(prefix) < MIN_KEY_PREFIX:
        raise BadInput(
            f"trial key prefix {key_prefix!r} is too short; give at least {MIN_KEY_PREFIX} "
            "characters"
        )
    # substr rather than LIKE: LIKE is case-insensitive on SQLite only and treats _ and %
    # as wildcards, so the two backends would disagree on what matches.
    query = (
        select(Trial)
        .join(Sweep, Trial.sweep_id == Sweep.id)
        .where(func.substr(Trial.trial_key, 1, len(prefix)) == prefix)
        .order_by(Sweep.name, Trial.position, Trial.trial_key)
        .limit(MAX_CANDIDATES + 1)
    )
    if sweep is not None:
        sweep_id = _sweeps(session, sweep)[0].id
        query = query.where(Trial.sweep_id == sweep_id)
    found = list(session.scalars(query))
    where = f" in sweep {sweep!r}" if sweep is not None else ""
    if not found:
        raise BadInput(f"no trial with key prefix {prefix!r}{where}")
    if len(found) > 1:
        shown = ", ".join(
            f"{t.trial_key[:12]} ({t.method}"
            + ("" if t.rate is None else f" rate {t.rate:g}") + ")"
            for t in found[:MAX_CANDIDATES]
        )
        more = ", …" if len(found) > MAX_CANDIDATES else ""
        raise BadInput(
            f"key prefix {prefix!r} matches several trials{where}: {shown}{more}; "
            "give a longer prefix"
        )
    trial = found[0]
    evidence = trial.evidence
    environment = trial.environment
    failed = trial.error_type is not None or trial.error_message is not None
    return {
        "sweep": trial.sweep.name,
        "trial_key": trial.trial_key,
        "model": trial.model,
        "method": trial.method,
        "params": trial.params,
        "rate": trial.rate,
        "dataset": trial.dataset,
        "is_baseline": trial.is_baseline,
        "status": trial.status,
        "attempts": trial.attempts,
        "host": trial.host,
        "gpus": trial.gpus,
        "created_at": _iso(trial.created_at),
        "started_at": _iso(trial.started_at),
        "finished_at": _iso(trial.finished_at),
        "duration_s": trial.duration_s,
        "config": trial.config,
        "metrics": [
            {"name": m.name, "value": m.value, "direction": m.direction, "note": m.note}
            for m in trial.metrics
        ],
        "evidence": None if evidence is None else {
            "params_before": evidence.params_before,
            "params_after": evidence.params_after,
            "changed_fraction": evidence.changed_fraction,
            "max_abs_dlogits": evidence.max_abs_dlogits,
            "details": evidence.details,
        },
        "environment": None if environment is None else {
            "hardware": environment.hardware,
            "packages": environment.packages,
            "git_sha": environment.git_sha,
            "fingerprint": environment.fingerprint,
        },
        "error": {
            "reason": trial.failure_reason,
            "type": trial.error_type,
            "message": trial.error_message,
            "traceback": trial.error_traceback,
        } if failed or trial.error_traceback else None,
    }


def trial_outcomes(session: Session, sweep: str, trial_keys: list[str]) -> dict[str, tuple]:
    """``{trial_key: (status, failure_reason)}`` for the given trials of ``sweep``."""
    out: dict[str, tuple] = {}
    for start in range(0, len(trial_keys), 500):  # stay below bound-parameter limits
        rows = session.execute(
            select(Trial.trial_key, Trial.status, Trial.failure_reason)
            .join(Sweep, Trial.sweep_id == Sweep.id)
            .where(Sweep.name == sweep, Trial.trial_key.in_(trial_keys[start:start + 500]))
        ).all()
        out.update({key: (status, reason) for key, status, reason in rows})
    return out


def sweep_costs(session: Session, sweep: str) -> dict[str, Any]:
    """Where a sweep's time went and what it read twice, from its finished trials' evidence.

    ``model_loads`` counts trials that read their base model from disk (the others found
    it in their worker process); ``worker_processes`` the distinct (host, pid) that ran
    trials; ``max_loads_per_model_process`` the most loads of one model in one process
    (1 when nothing was read twice). ``calibrations``: calibration statistics computed, by
    the ``calibrating_trials`` (trials that computed or reused some).
    Seconds are sums over trials: ``trial_seconds`` (each trial's whole run in its worker),
    ``model_load_seconds``, ``method_seconds`` and ``evaluation_seconds``. Trials recorded
    before these figures existed count as ``trials_without_figures``.
    """
    from orchestrator.db.models import Evidence

    rows = session.execute(
        select(Trial.model, Trial.host, Trial.duration_s, Evidence.details)
        .join(Sweep, Trial.sweep_id == Sweep.id).join(Evidence, Evidence.trial_id == Trial.id)
        .where(Sweep.name == sweep, Trial.status == "done")
    ).all()
    out: dict[str, Any] = {
        "trials": len(rows), "trials_without_figures": 0, "model_loads": 0,
        "worker_processes": 0, "max_loads_per_model_process": 0, "calibrations": 0,
        "calibrating_trials": 0, "trial_seconds": 0.0, "model_load_seconds": 0.0,
        "method_seconds": 0.0, "evaluation_seconds": 0.0,
    }
    loads: dict[tuple, int] = defaultdict(int)
    processes = set()
    for model, host, duration, details in rows:
        details = details or {}
        out["trial_seconds"] += duration or 0.0
        out["method_seconds"] += details.get("method_seconds") or 0.0
        if "model_loaded" not in details:
            out["trials_without_figures"] += 1
            continue
        process = (host, details.get("pid"))
        processes.add(process)
        loads[(model, *process)] += bool(details["model_loaded"])
        out["model_loads"] += bool(details["model_loaded"])
        out["model_load_seconds"] += details.get("model_load_seconds") or 0.0
        out["evaluation_seconds"] += sum((details.get("evaluation_seconds") or {}).values())
        computed = details.get("calibrations_computed") or 0
        if computed or details.get("calibration_reused"):
            out["calibrating_trials"] += 1
            out["calibrations"] += computed
    out["worker_processes"] = len(processes)
    out["max_loads_per_model_process"] = max(loads.values(), default=0)
    return out
