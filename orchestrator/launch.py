"""Running a sweep on Ray Tune, with the driver-side callback as the only DB writer.

``launch`` expands the spec, records the sweep and its trials (``pending``), skips every
trial already ``done``, and runs the rest with ``tune.Tuner`` — one trial per pending
trial spec, model-major, ``max_concurrent_trials`` at once, one GPU per trial when the
cluster has GPUs. Results reach the database only through :class:`ResultsCallback`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import spec as spec_module
from orchestrator.db.engine import ensure_schema, session_scope
from orchestrator.db.store import mark_running, record_result, register_sweep, reset_stale_running
from orchestrator.errors import SweepError


@dataclass
class LaunchPlan:
    """What a launch would do: every trial of the grid and the ones that will run."""

    spec: spec_module.SweepSpec
    trials: list[spec_module.TrialSpec]
    to_run: list[spec_module.TrialSpec]
    statuses: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchOutcome:
    """Counts of what this launch ran."""

    sweep: str
    total: int
    skipped: int
    ran: int = 0
    done: int = 0
    failed: int = 0
    dashboard_url: str | None = None
    seconds: float = 0.0


def local_ray_environment() -> None:
    """Environment for a local, loopback-only Ray without token auth (Ray ≥ 2.60)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's own console table would fight with our progress bar.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def plan(spec: spec_module.SweepSpec, spec_path: str | None, db_url: str,
         retry_failed: bool = False, dry_run: bool = False) -> LaunchPlan:
    """Expand the grid; unless ``dry_run``, record the sweep and find what must run."""
    trials = spec_module.expand(spec)
    if dry_run:
        return LaunchPlan(spec, trials, list(trials))
    engine = ensure_schema(db_url, create=True)
    with session_scope(engine, write=True) as session:
        # A previous driver that died leaves trials "running"; they run again.
        reset_stale_running(session, spec.name)
        statuses = register_sweep(session, spec.name, spec.model_dump(mode="json", by_alias=True),
                                  spec_path, [t.row() for t in trials])
    runnable = {"pending", "running"} | ({"failed"} if retry_failed else set())
    to_run = [t for t in trials if statuses.get(t.trial_key) in runnable]
    return LaunchPlan(spec, trials, to_run, statuses)


class Progress:
    """Counts shown while the sweep runs; ``on_change`` redraws the progress display."""

    def __init__(self, total: int, on_change: Callable[[Progress], None] | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.running = 0
        self.on_change = on_change

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


def _results_callback_class() -> type:
    from ray.tune import Callback

    class ResultsCallback(Callback):
        """Writes trial transitions and results to the database (the single writer)."""

        def __init__(self, engine: Any, sweep: str, progress: Progress) -> None:
            self.engine = engine
            self.sweep = sweep
            self.progress = progress
            self.recorded: set[str] = set()

        def __getstate__(self) -> dict:
            # Tune pickles the Tuner (callbacks included) for experiment restore; an engine
            # and a live progress display cannot be pickled and make no sense restored.
            return {**self.__dict__, "engine": None, "progress": Progress(self.progress.total)}

        def _key(self, trial: Any) -> str:
            return trial.config["trial"]["trial_key"]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            with session_scope(self.engine, write=True) as session:
                mark_running(session, self.sweep, self._key(trial))
            self.progress.running += 1
            self.progress.changed()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            payload = result.get("payload")
            if payload is None:
                return
            self._record(trial, json.loads(payload))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # The trainable catches trial errors itself; this is a crashed worker process.
            error = trial.error_message if hasattr(trial, "error_message") else None
            self._record(trial, {
                "status": "failed",
                "error": {"type": "WorkerCrashed",
                          "message": "the trial's worker process died"
                                     + (f": {error.splitlines()[-1]}" if error else ""),
                          "traceback": error or ""},
            })

        def _record(self, trial: Any, result: dict) -> None:
            key = self._key(trial)
            if key in self.recorded:
                return
            with session_scope(self.engine, write=True) as session:
                record_result(session, self.sweep, key, result)
            self.recorded.add(key)
            self.progress.running = max(0, self.progress.running - 1)
            if result.get("status") == "done":
                self.progress.done += 1
            else:
                self.progress.failed += 1
            self.progress.changed()

    return ResultsCallback


def _trial_name(trial: Any) -> str:
    config = trial.config["trial"]
    method = config["method"]
    rate = "" if method["rate"] is None else f"-{method['rate']:g}"
    model = config["model"]["id"].replace("/", "_").replace(":", "_")
    return f"{model}-{method['name']}{rate}-{config['trial_key'][:8]}"


def prepare_models(spec: spec_module.SweepSpec) -> None:
    """Build built-in models on the driver first, so their progress bar is seen once."""
    for model in spec.models:
        if model.id.startswith("builtin:"):
            from workers.models.builtin import ensure_builtin_model

            ensure_builtin_model(model.id.removeprefix("builtin:"))


def start_ray(address: str | None, include_dashboard: bool) -> tuple[bool, str | None]:
    """Connect to ``address`` or start a local Ray; returns (started_here, dashboard URL)."""
    import logging

    import ray

    if ray.is_initialized():
        return False, None
    if address is None:
        local_ray_environment()
        context = ray.init(include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
                           log_to_driver=False, logging_level=logging.WARNING,
                           configure_logging=True)
    else:
        context = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    url = getattr(context, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return True, url


def run(plan_: LaunchPlan, db_url: str, *, max_concurrent: int | None = None,
        address: str | None = None, include_dashboard: bool = True,
        on_start: Callable[[str | None], None] | None = None,
        on_change: Callable[[Progress], None] | None = None,
        storage_path: str | None = None) -> LaunchOutcome:
    """Run ``plan_.to_run`` on Ray Tune; the callback records every transition."""
    spec = plan_.spec
    outcome = LaunchOutcome(sweep=spec.name, total=len(plan_.trials),
                            skipped=len(plan_.trials) - len(plan_.to_run))
    if not plan_.to_run:
        return outcome
    started = time.perf_counter()
    prepare_models(spec)
    import ray
    from ray import tune

    from workers.cache import cache_dir
    from workers.trial import git_sha, tune_trainable

    started_here, url = start_ray(address, include_dashboard)
    outcome.dashboard_url = url
    if on_start is not None:
        on_start(url)
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        gpus = spec.resources.gpus_per_trial
        if gpus is None:
            gpus = 1.0 if cluster_gpus > 0 else 0.0
        if gpus > cluster_gpus:
            raise SweepError(f"resources.gpus_per_trial is {gpus:g} but the cluster has "
                             f"{cluster_gpus:g} GPUs; lower it or add GPU workers")
        cpus = spec.resources.cpus_per_trial
        sha = git_sha()
        configs = [dict(t.config, use_gpu=gpus > 0, cpus_per_trial=cpus, git_sha=sha)
                   for t in plan_.to_run]
        progress = Progress(len(configs), on_change)
        engine = ensure_schema(db_url, create=False)
        callback = _results_callback_class()(engine, spec.name, progress)
        storage = storage_path or str(cache_dir() / "tune")
        Path(storage).mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(
            tune.with_resources(tune_trainable, {"cpu": cpus, "gpu": gpus}),
            param_space={"trial": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent or spec.max_concurrent_trials,
                reuse_actors=True, trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage,
                verbose=0, callbacks=[callback], log_to_file=True),
        )
        tuner.fit()
        outcome.ran = len(configs)
        outcome.done = progress.done
        outcome.failed = progress.failed
    finally:
        if started_here:
            ray.shutdown()
    outcome.seconds = time.perf_counter() - started
    return outcome
