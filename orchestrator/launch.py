"""Running a sweep on Ray Tune, with the driver-side callback as the only DB writer.

``plan`` expands the spec, records the sweep and its trials (``pending``), takes back
trials a dead driver left ``running``, recovers results its workers had written to result
files, and claims what is left to run under this driver's lease. ``run`` runs the claimed
trials with ``tune.Tuner`` — model-major, ``max_concurrent_trials`` at once, one GPU per
trial when the cluster has GPUs — retrying failures up to ``max_attempts``. Results reach
the database only through :class:`ResultsCallback`, which hands them to a
:class:`~orchestrator.db.writer.ResultWriter` (batched, off Tune's loop).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import placement
from orchestrator import spec as spec_module
from orchestrator.db.engine import ensure_schema, redact_url, session_scope
from orchestrator.db.leases import (
    HEARTBEAT_S,
    claim,
    finish_driver,
    heartbeat,
    reclaim,
    start_driver,
)
from orchestrator.db.models import DETERMINISTIC_FAILURES
from orchestrator.db.store import record_result, register_sweep
from orchestrator.db.writer import ResultWriter
from orchestrator.errors import BadInput, SweepError
from orchestrator.queries import trial_outcomes
from workers import result_files


@dataclass
class LaunchPlan:
    """What a launch will do: every trial of the grid and the ones it claimed to run.

    ``busy`` are trials another live launch is running (left to it); ``reset`` counts
    trials a dead driver left ``running``; ``recovered`` counts results found in result
    files of trials whose driver died before recording them.
    """

    spec: spec_module.SweepSpec
    trials: list[spec_module.TrialSpec]
    to_run: list[spec_module.TrialSpec]
    statuses: dict[str, str] = field(default_factory=dict)
    driver_id: int | None = None
    result_dir: str | None = None
    busy: dict[str, str] = field(default_factory=dict)
    reset: int = 0
    recovered: int = 0


@dataclass
class LaunchOutcome:
    """Counts of what this launch ran."""

    sweep: str
    total: int
    skipped: int
    ran: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    dashboard_url: str | None = None
    placement: str = ""
    seconds: float = 0.0


def local_ray_environment() -> None:
    """Environment for a local, loopback-only Ray without token auth (Ray ≥ 2.60)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's own console table would fight with our progress bar.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Trials resolve the spec's relative paths from the launch directory, not Tune's.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


def storage_dir(storage_path: str | None = None) -> Path | str:
    """Where Tune keeps experiment state (and workers their result files): a directory, or
    a URI (``s3://…``) as given."""
    from workers.cache import cache_dir

    if storage_path and result_files.is_uri(storage_path):
        return storage_path
    return Path(storage_path) if storage_path else cache_dir() / "tune"


def result_dir(db_url: str, sweep: str, storage_path: str | None = None) -> Path | str:
    """The result-file directory (or URI) of one sweep in one database.

    Keyed by the database (without its password) so that two databases holding a sweep of
    the same name never ingest each other's results.
    """
    database = hashlib.sha256(redact_url(db_url).encode()).hexdigest()[:16]
    storage = storage_dir(storage_path)
    if isinstance(storage, str):
        return result_files.uri_join(storage, "results", database, sweep)
    return storage / "results" / database / sweep


def check_storage_uri(uri: str) -> None:
    """Refuse a storage URI pyarrow cannot open (bad scheme, malformed options)."""
    try:
        from pyarrow import fs

        fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"--storage-path {uri}: {first}; give a directory, or a URI such as "
                       "s3://bucket/dir (options in its query, e.g. ?region=eu-west-1)") from exc


def check_local_resources(spec: spec_module.SweepSpec) -> None:
    """Refuse, before anything is written or started, GPUs this machine does not have.

    Only for a local Ray (the cluster's GPUs are known once connected).
    """
    wanted = spec.resources.gpus_per_trial
    if not wanted:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted > have:
        raise BadInput(f"resources.gpus_per_trial is {wanted:g} but this machine has {have} "
                       "GPU(s); set it to 0 (or remove it) to run on CPU, or launch on a "
                       "cluster with --address")


def plan(spec: spec_module.SweepSpec, spec_path: str | None, db_url: str,
         retry_failed: bool = False, dry_run: bool = False,
         storage_path: str | None = None) -> LaunchPlan:
    """Expand the grid; unless ``dry_run``, record the sweep and claim what must run.

    In one write transaction: trials of dead drivers go back to ``pending``, results
    their workers left in result files are recorded, and what is pending (plus failed and
    timed-out trials with ``retry_failed``) and not held by a live launch is claimed.
    """
    trials = spec_module.expand(spec)
    if dry_run:
        return LaunchPlan(spec, trials, list(trials))
    engine = ensure_schema(db_url, create=True)
    files_dir = result_dir(db_url, spec.name, storage_path)
    with session_scope(engine, write=True) as session:
        reclaimed = reclaim(session, spec.name)
        statuses = register_sweep(session, spec.name, spec.model_dump(mode="json", by_alias=True),
                                  spec_path, [t.row() for t in trials])
        recovered, stale_files = _ingest_result_files(session, spec.name, files_dir, statuses,
                                                      reclaimed.busy)
        runnable = {"pending"} | ({"failed", "timed_out"} if retry_failed else set())
        to_run = [t for t in trials
                  if statuses[t.trial_key] in runnable and t.trial_key not in reclaimed.busy]
        driver_id = start_driver(session, spec.name)
        if to_run:
            claim(session, spec.name, driver_id, [t.trial_key for t in to_run])
        else:
            finish_driver(session, driver_id)
    for key in stale_files:  # only once their results are committed
        result_files.remove(files_dir, key)
    return LaunchPlan(spec, trials, to_run, statuses, driver_id=driver_id,
                      result_dir=str(files_dir), busy=reclaimed.busy, reset=reclaimed.reset,
                      recovered=recovered)


def _ingest_result_files(session: Any, sweep: str, files_dir: Path, statuses: dict[str, str],
                         busy: dict[str, str]) -> tuple[int, list[str]]:
    """Record results a worker wrote but no driver recorded; returns (count, files to drop)."""
    recovered = 0
    drop: list[str] = []
    for key, result in result_files.read_all(files_dir).items():
        if key not in statuses or key in busy:
            continue  # another spec version's trial, or a live launch's
        if statuses[key] == "pending":
            evidence = result.get("evidence")
            if isinstance(evidence, dict) and isinstance(evidence.get("details"), dict):
                evidence["details"]["recovered_from_result_file"] = True
            try:
                with session.begin_nested():
                    record_result(session, sweep, key, result)
            except (ValueError, TypeError):
                continue  # a malformed file: the trial simply runs again
            statuses[key] = result["status"]
            recovered += 1
        drop.append(key)
    return recovered, drop


class Progress:
    """Per-trial states while the sweep runs; ``on_change`` redraws the progress display."""

    def __init__(self, keys: list[str],
                 on_change: Callable[[Progress], None] | None = None) -> None:
        self.states = dict.fromkeys(keys, "pending")
        self.on_change = on_change

    @property
    def total(self) -> int:
        return len(self.states)

    def count(self, *states: str) -> int:
        return sum(1 for s in self.states.values() if s in states)

    @property
    def done(self) -> int:
        return self.count("done")

    @property
    def failed(self) -> int:
        return self.count("failed", "timed_out")

    @property
    def running(self) -> int:
        return self.count("running")

    def set(self, key: str, state: str) -> None:
        self.states[key] = state
        if self.on_change is not None:
            self.on_change(self)


def _results_callback_class() -> type:
    from ray.tune import Callback

    class ResultsCallback(Callback):
        """Writes trial transitions and results to the database (the single writer)."""

        def __init__(self, writer: ResultWriter, progress: Progress,
                     files_dir: str | None, db_url: str | None = None) -> None:
            self._writer = writer
            self.progress = progress
            self.files_dir = files_dir
            self.recorded: set[str] = set()
            # Only for a Ray Client launch: there, Tune runs on the cluster, with a copy
            # of this callback that opens its own writer on the database.
            self.db_url = db_url
            self.sweep = getattr(writer, "sweep", None)
            self.owns_writer = False

        def __getstate__(self) -> dict:
            # Tune pickles the Tuner (callbacks included) for experiment restore, and with
            # Ray Client to run it on the cluster; a writer thread and a live progress
            # display cannot be pickled.
            return {**self.__dict__, "_writer": None, "progress": Progress([]),
                    "owns_writer": False}

        @property
        def writer(self) -> ResultWriter:
            if self._writer is None:
                if self.db_url is None:
                    raise RuntimeError("the results callback was copied to another process "
                                       "without a database to write to")
                self._writer = ResultWriter(ensure_schema(self.db_url, create=False),
                                            self.sweep)
                self.owns_writer = True
            return self._writer

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.owns_writer and self._writer is not None and not self._writer.closed:
                self._writer.close()  # the launch reads the outcomes once Tune returns

        def _key(self, trial: Any) -> str:
            return trial.config["trial"]["trial_key"]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.writer.started(self._key(trial))
            self.progress.set(self._key(trial), "running")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            payload = result.get("payload")
            if payload is None:
                # The worker's first report says where it runs (workers/trial.py
                # tune_trainable); it is not a result, and the trial goes on.
                placement = result.get("started")
                if placement is not None:
                    self._placed(trial, placement)
                return
            self._record(trial, json.loads(payload))

        def _placed(self, trial: Any, placement: Any) -> None:
            key = self._key(trial)
            if key in self.recorded:
                return  # stale: this trial's result is in already
            try:
                where = json.loads(placement)
                host, gpus = where.get("host"), where.get("gpus")
            except (TypeError, ValueError, AttributeError):
                logging.getLogger(__name__).warning(
                    "trial %s announced an unreadable placement: %r", key, placement)
                return
            self.writer.placed(key, host=None if host is None else str(host),
                               gpus=None if gpus is None else str(gpus))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            if key in self.recorded:
                return  # a timed-out trial's process ends after its report
            # The worker may have written its result before its process died.
            written = result_files.read(self.files_dir, key) if self.files_dir else None
            if written is not None:
                self._record(trial, written)
                return
            error = trial.error_message if hasattr(trial, "error_message") else None
            self._record(trial, {
                "status": "failed",
                "error": {"type": "WorkerCrashed", "reason": "worker_crashed",
                          "message": "the trial's worker process died"
                                     + (f": {error.splitlines()[-1]}" if error else ""),
                          "traceback": error or ""},
            })

        def _record(self, trial: Any, result: dict) -> None:
            key = self._key(trial)
            if key in self.recorded:
                return
            files_dir = self.files_dir
            self.writer.finished(
                key, result,
                on_committed=(lambda: result_files.remove(files_dir, key)) if files_dir else None)
            self.recorded.add(key)
            self.progress.set(key, result.get("status", "failed"))

    return ResultsCallback


class _Heartbeat(threading.Thread):
    """Refreshes the driver's lease every ``HEARTBEAT_S`` until stopped."""

    def __init__(self, engine: Any, driver_id: int) -> None:
        super().__init__(name="sweep-driver-heartbeat", daemon=True)
        self.engine = engine
        self.driver_id = driver_id
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                with session_scope(self.engine, write=True) as session:
                    heartbeat(session, self.driver_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease is 6 beats
                continue


def is_client_address(address: str | None) -> bool:
    """A Ray Client address (``ray://HOST:10001``): Tune itself then runs on the cluster."""
    return bool(address) and address.startswith("ray://")


def check_address(address: str | None, db_url: str, storage_path: str | None = None) -> None:
    """Refuse, before anything is written, what a Ray Client launch cannot use.

    With Ray Client, Tune runs on the cluster's head node and the results are written from
    there: a SQLite file on this machine is out of its reach, and so is the default storage
    path (this machine's cache), where the next launch looks for result files.
    """
    if not is_client_address(address):
        return
    if db_url.split(":", 1)[0].split("+", 1)[0] == "sqlite":
        raise BadInput(f"--address {address} runs the sweep's Tune loop on the cluster, which "
                       "writes the results itself: SQLite is a file on this machine; use "
                       "PostgreSQL reachable from the head node (--db postgresql://…), or run "
                       "`sweep launch --address auto` on the head node")
    if storage_path is None:
        raise BadInput(f"--address {address} needs --storage-path: Tune runs on the cluster, "
                       "so give a directory this machine and every node mount at the same path, "
                       "or an object store URI (s3://bucket/dir)")


class _StatusPoller(threading.Thread):
    """Follows trials in the database while Tune runs elsewhere (Ray Client launches).

    A status counts when it changes from what the database said before, so a trial that
    failed in an earlier round and waits for its retry is not shown as failed again.
    """

    def __init__(self, engine: Any, sweep: str, progress: Progress, keys: list[str],
                 interval_s: float = 1.0) -> None:
        super().__init__(name="sweep-status-poller", daemon=True)
        self.engine, self.sweep, self.progress, self.keys = engine, sweep, progress, keys
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.seen = self._read()

    def _read(self) -> dict[str, str]:
        with session_scope(self.engine) as session:
            return {k: v[0] for k, v in trial_outcomes(session, self.sweep, self.keys).items()}

    def poll(self) -> None:
        now = self._read()
        for key, status in now.items():
            if status != self.seen.get(key) and status != "pending":
                self.progress.set(key, status)
        self.seen = now

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a missed poll only delays the display
                continue

    def __enter__(self) -> _StatusPoller:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.join()
        # Tune has returned: every trial of the round has its outcome in the database
        # (a retry that failed again between two polls never looked changed).
        for key, status in self._read().items():
            if status != "pending":
                self.progress.set(key, status)


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


# Filesystem types (from /proc/mounts) that other machines can mount too.
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "fuse.ceph", "gpfs", "beegfs",
    "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
    "fuse.goofys", "fuse.rclone", "9p", "virtiofs", "wekafs", "fuse.weka", "panfs", "afs",
})


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem holding ``path`` per /proc/mounts; None when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def cluster_warnings(nodes: int, db_url: str, storage_path: str | Path,
                     storage_filesystem: str | None = None) -> list[str]:
    """Warnings for a sweep on a cluster of ``nodes`` nodes (none for a single node).

    Only the driver writes the database, so SQLite works on a cluster, but it is a file on
    the driver's machine: nobody elsewhere can read the results. Workers write result files
    under the storage path for crash recovery; on a directory only this machine has, the
    files of trials on other nodes land on their own disks, where the next launch cannot
    find them. ``storage_filesystem`` is the path's filesystem type (see
    :func:`filesystem_type`); a network filesystem or a URI counts as shared.
    """
    if nodes <= 1:
        return []
    warnings = []
    if db_url.split(":", 1)[0].split("+", 1)[0] == "sqlite":
        warnings.append(
            f"the results database is SQLite, a file on this machine, on a cluster of {nodes} "
            "nodes: only this driver writes it, so the sweep works, but other machines cannot "
            "read the results; use PostgreSQL (--db postgresql://…, see README: Running on "
            "a cluster)")
    storage = str(storage_path)
    if "://" not in storage and storage_filesystem not in SHARED_FILESYSTEMS:
        kind = f" ({storage_filesystem})" if storage_filesystem else ""
        warnings.append(
            f"the storage path {storage} is on a filesystem{kind} of this machine only, on a "
            f"cluster of {nodes} nodes: result files of trials on other nodes stay on their "
            "disks, so a crashed launch cannot recover them; pass --storage-path on a shared "
            "filesystem mounted at the same path on every node")
    return warnings


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def run(plan_: LaunchPlan, db_url: str, *, max_concurrent: int | None = None,
        address: str | None = None, include_dashboard: bool = True,
        on_start: Callable[[str | None, str], None] | None = None,
        on_change: Callable[[Progress], None] | None = None,
        storage_path: str | None = None,
        on_warning: Callable[[str], None] | None = None) -> LaunchOutcome:
    """Run ``plan_.to_run`` on Ray Tune; the callback records every transition.

    Failed and timed-out trials are run again, in further rounds, until each has had
    ``max_attempts`` attempts in this launch (failures that would repeat are not retried).
    On a cluster of several nodes, :func:`cluster_warnings` go to ``on_warning`` (default:
    the log) before the sweep starts.
    """
    spec = plan_.spec
    outcome = LaunchOutcome(sweep=spec.name, total=len(plan_.trials),
                            skipped=len(plan_.trials) - len(plan_.to_run))
    if not plan_.to_run:
        return outcome
    started = time.perf_counter()
    engine = ensure_schema(db_url, create=False)
    beat = _Heartbeat(engine, plan_.driver_id) if plan_.driver_id is not None else None
    if beat is not None:
        beat.start()
    started_here = False
    writer: ResultWriter | None = None
    try:
        prepare_models(spec)
        import ray

        from workers.trial import git_sha

        started_here, url = start_ray(address, include_dashboard)
        outcome.dashboard_url = url
        storage = storage_dir(storage_path)
        if isinstance(storage, Path):
            storage.mkdir(parents=True, exist_ok=True)
        if address is not None:  # a local Ray is one node
            warn = on_warning or logging.getLogger(__name__).warning
            kind = filesystem_type(storage) if isinstance(storage, Path) else None
            for message in cluster_warnings(_alive_nodes(), db_url, storage, kind):
                warn(message)
        nodes = placement.nodes_of_cluster(ray.nodes())
        request = placement.trial_resources(spec.resources.gpus_per_trial,
                                            spec.resources.cpus_per_trial, nodes)
        where = placement.check_feasible(nodes, request)
        gpus = request.gpus
        on_cuda = [i for i, m in enumerate(spec.models) if m.device == "cuda"]
        if on_cuda and gpus == 0:
            raise SweepError(f"models[{on_cuda[0]}].device is cuda but trials get no GPU (the "
                             "cluster has none, or resources.gpus_per_trial is 0); use "
                             "device: auto")
        outcome.placement = placement.describe(where, request,
                                               max_concurrent or spec.max_concurrent_trials)
        if on_start is not None:
            on_start(url, outcome.placement)
        cpus = spec.resources.cpus_per_trial
        sha = git_sha()
        configs = [dict(t.config, use_gpu=gpus > 0, gpus_per_trial=gpus, cpus_per_trial=cpus,
                        git_sha=sha,
                        result_dir=plan_.result_dir, driver_cwd=os.getcwd())
                   for t in plan_.to_run]
        progress = Progress([c["trial_key"] for c in configs], on_change)
        attempts: dict[str, int] = dict.fromkeys(progress.states, 0)
        round_configs = configs
        stamp = time.strftime("%Y%m%d-%H%M%S")
        writer = ResultWriter(engine, spec.name)
        client = is_client_address(address)
        for round_number in range(1, spec.max_attempts + 1):
            callback = _results_callback_class()(writer, progress, plan_.result_dir,
                                                 db_url=db_url if client else None)
            tuner = _tuner(spec, round_configs, cpus, gpus, max_concurrent, callback,
                           name=f"{spec.name}-{stamp}" + (f"-retry{round_number - 1}"
                                                           if round_number > 1 else ""),
                           storage=str(storage))
            if client:
                # Tune runs on the cluster and its copy of the callback writes the
                # database; this side follows the trials there.
                with _StatusPoller(engine, spec.name, progress,
                                   [c["trial_key"] for c in round_configs]):
                    tuner.fit()
            else:
                tuner.fit()
            writer.flush()  # the retry decision reads this round's outcomes
            for config in round_configs:
                attempts[config["trial_key"]] += 1
            round_configs = _to_retry(engine, spec.name, round_configs, attempts,
                                      spec.max_attempts)
            if not round_configs:
                break
            outcome.retried += len(round_configs)
            for config in round_configs:
                progress.set(config["trial_key"], "pending")
        writer.close()
        outcome.ran = len(configs)
        outcome.done = progress.done
        outcome.failed = progress.failed
    finally:
        if writer is not None and not writer.closed:
            # Ctrl-C or a failed round: what was reported is still stored, and the error
            # in flight stays the one raised.
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).exception("storing the last trial events failed")
        if beat is not None:
            beat.stopped.set()
            beat.join()
            with session_scope(engine, write=True) as session:
                finish_driver(session, plan_.driver_id)
        if started_here:
            import ray

            ray.shutdown()
    outcome.seconds = time.perf_counter() - started
    return outcome


def _tuner(spec: spec_module.SweepSpec, configs: list[dict], cpus: float, gpus: float,
           max_concurrent: int | None, callback: Any, name: str, storage: str) -> Any:
    from ray import tune

    from workers.telemetry import trainable
    from workers.trial import tune_trainable

    return tune.Tuner(
        # Actors named after their first trial in the dashboard (workers/telemetry.py).
        tune.with_resources(trainable(tune_trainable), {"cpu": cpus, "gpu": gpus}),
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or spec.max_concurrent_trials,
            reuse_actors=True, trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                  callbacks=[callback], log_to_file=True),
    )


def _to_retry(engine: Any, sweep: str, configs: list[dict], attempts: dict[str, int],
              max_attempts: int) -> list[dict]:
    """The configs whose trial failed in a way worth retrying and has attempts left."""
    keys = [c["trial_key"] for c in configs]
    with session_scope(engine) as session:
        outcomes = trial_outcomes(session, sweep, keys)
    return [c for c in configs
            if outcomes.get(c["trial_key"], ("done", None))[0] in ("failed", "timed_out")
            and outcomes[c["trial_key"]][1] not in DETERMINISTIC_FAILURES
            and attempts[c["trial_key"]] < max_attempts]
