"""Benchmark of what a sweep costs beyond its forward passes (issue 7).

One run measures, side by side on the same 12-trial grid (``builtin:tiny-llama`` on
``builtin:pydoc``: the baseline, ``drop_layers`` × 4 rates, ``head_mask`` × 4 rates,
``prune_ffn`` × 3 rates; perplexity + speed with small settings):

1. *Launch*: ``sweep --db sqlite:///<tmp>/sweeps.db launch spec.yaml`` as a subprocess (what
   users run), wall time from process start to exit, on a fresh SQLite file. The
   ``COMPRESS_SWEEP_CACHE`` it gets is a fresh directory whose ``models`` entry links to the
   existing cache's, so the built-in model is not retrained and Tune's experiment
   directories do not pile up in the shared cache.
2. *Script*: a plain sequential script, as the users wrote before this tool, run as a
   subprocess of this file (``--script-only``) with torch's default thread count (all
   cores, as a user's script gets). For every trial it loads the model from disk again,
   reads the dataset again, evaluates the base model again, calibrates again (a fresh
   ``MethodContext`` cache per trial), applies the method and evaluates the variant. It
   uses the project's own building blocks (``workers.models.load_model``,
   ``workers.data.load_dataset``, the registered methods and evaluators) and none of the
   per-process caches of ``workers/trial.py`` (``cache.cached_model``, ``_datasets``,
   ``_documents``, ``_probe_cache``, ``_calibration_cache``). Target: launch <= 0.6× script.
3. *Ideal*: the pure evaluation work of the grid divided by ``max_concurrent_trials``.
   "Pure evaluation" is method application (calibration included, computed once per method
   as the product's cache intends) + the evaluators, measured in-process, once, at the
   trials' thread count (``cpus_per_trial``), on one loaded model, with nothing else
   running. The database's own figure (``evidence.details.method_seconds`` +
   ``evaluation_seconds``, timed inside the trials while others ran beside them) is printed
   next to it. Target: launch <= 1.15× ideal. From the database it also derives the
   per-trial orchestration overhead ``(launch wall × concurrency − Σ trials.duration_s) / n``
   and, per trial, the *start gap* ``(finished_at − started_at) − duration_s``: the time
   between Tune starting the trial (the driver's ``on_trial_start``) and its result being
   stored, beyond the worker's own ``run_trial``: worker start-up plus report latency, an
   upper bound of "Tune start → worker start" (the worker's start is not timestamped).
   Target: median <= 1 s.
4. *Model loads*: ``evidence.details.model_loads_in_process`` (the process's cumulative
   count) and ``pid`` per trial give the loads of each worker process; target one per
   model per process. Calibration: ``details.calibration_reused`` per trial gives how often
   each worker process calibrated each calibrating method; target one.

5. *Ray's floor*: a child process that starts Ray the way ``sweep launch`` does, runs as
   many empty Tune trials as the sweep runs at once (each only imports ``workers.trial``)
   and shuts Ray down: the fixed cost no sweep on this machine goes below. ``(launch −
   floor) / ideal`` is what the sweep adds beyond it.

``--running-ray`` starts a Ray head with ``ray start`` before the launch and gives the
launch and the floor ``--address``: the cluster case, where Ray is already running and a
launch neither starts nor stops it.

Every figure is printed with its target and ``met`` / ``missed``; a missed target does not
fail the run (a shared 2-core machine is noisy). The run does fail (exit 1) when the launch
fails, a trial fails, or the script's perplexities differ from the sweep's (relative
difference > 1e-4): timing different work would be meaningless.

Run from the project root (about 3 minutes on 2 cores)::

    .venv/bin/python tests/bench/bench_sweep.py [--concurrency 2] [--speed-repeats 5]
        [--script-threads N] [--no-dashboard] [--keep]

The file name does not match pytest's ``test_*.py``, so the test suite never collects it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "builtin:tiny-llama"
DATASET = "builtin:pydoc"
SCRIPT_TARGET = 0.6  # launch wall / script wall
IDEAL_TARGET = 1.15  # launch wall / ideal
START_GAP_TARGET_S = 1.0  # median per-trial start gap
SAME_RTOL = 1e-4


# --------------------------------------------------------------------------- the grid


def spec_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The 12-trial sweep: baseline + 4 + 4 + 3, perplexity and speed with small settings."""
    return {
        "name": "bench-sweep",
        "models": [{"id": MODEL}],
        "methods": [
            {"name": "drop_layers", "rates": [0.125, 0.25, 0.375, 0.5],
             "params": {"from": "top"}},
            {"name": "head_mask", "rates": [0.25, 0.375, 0.5, 0.75],
             "params": {"scope": "global"}},
            {"name": "prune_ffn", "rates": [0.25, 0.5, 0.75]},
        ],
        "datasets": [{"name": DATASET, "split": "test"}],
        "evaluation": {
            "metrics": ["perplexity", "speed"], "batch_size": 8, "max_length": 128,
            "stride": 64,
            "speed": {"warmup": args.speed_warmup, "repeats": args.speed_repeats,
                      "prompt_length": 64, "new_tokens": 32, "prompts": args.speed_prompts},
        },
        "resources": {"cpus_per_trial": 1},
        "max_concurrent_trials": args.concurrency,
        "seed": 0,
    }


def trial_configs(spec_path: Path) -> list[dict[str, Any]]:
    """The trial configs ``sweep launch`` gives the workers (the spec's own expansion)."""
    from orchestrator import spec as spec_module

    spec = spec_module.load(spec_path)
    return [dict(t.config, cpus_per_trial=spec.resources.cpus_per_trial, use_gpu=False)
            for t in spec_module.expand(spec)]


def evaluate_all(model: Any, loaded: Any, data: Any, config: dict[str, Any]) -> dict[str, float]:
    """Every evaluator the trial names, on ``model``: {metric: value}."""
    from workers.evaluators import evaluators

    registry = evaluators()
    evaluation = config["evaluation"]
    values: dict[str, float] = {}
    for name in config["dataset"].get("metrics") or evaluation["metrics"]:
        values.update(registry[name].evaluate(model, loaded.tokenizer, data,
                                              copy.deepcopy(evaluation), device="cpu",
                                              processor=getattr(loaded, "processor", None)))
    return values


def load_base(entry: dict[str, Any]) -> Any:
    """The model read from disk, bypassing ``workers.cache.cached_model``."""
    from workers.models import load_model

    return load_model(entry["id"], dtype=entry.get("dtype"), device="cpu",
                      trust_remote_code=bool(entry.get("trust_remote_code")),
                      source=entry.get("source"),
                      attn_implementation=entry.get("attn_implementation"),
                      revision=entry.get("revision"))


def method_context(loaded: Any, config: dict[str, Any], shared: dict[str, Any]) -> Any:
    """A MethodContext reading calibration text directly (no ``_documents`` lru_cache);
    ``shared`` is its calibration cache (a fresh dict: nothing reused)."""
    from workers.cache import stable_hash
    from workers.data import load_dataset, load_documents
    from workers.methods import MethodContext

    seed = int(config.get("seed", 0))
    return MethodContext(
        tokenizer=loaded.tokenizer, family=loaded.family, seed=seed, device="cpu",
        calibration_documents=lambda name, split, seed: load_documents(name, split, None, seed),
        calibration_dataset=lambda entry: load_dataset(dict(entry), seed),
        processor=getattr(loaded, "processor", None),
        model_key=stable_hash([config["model"], "cpu"]), _cache=shared)


# --------------------------------------------------------------------------- 2. the script


class Laps:
    """Seconds of consecutive phases: ``lap(name)`` ends the phase started at the last lap."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._mark
        self._mark = now


def sequential_script(spec_path: Path) -> list[dict[str, Any]]:
    """What the users' scripts did, trial after trial, with no reuse of anything."""
    import torch

    from workers.data import load_dataset
    from workers.methods import get_method

    rows = []
    for config in trial_configs(spec_path):
        torch.manual_seed(int(config.get("seed", 0)))
        laps = Laps()
        lap = laps.lap
        loaded = load_base(config["model"])
        lap("load_model")
        data = load_dataset(config["dataset"], int(config.get("seed", 0)))
        lap("load_data")
        method_cfg = config["method"]
        method = get_method(method_cfg["name"])
        params = method.config.model_validate(method_cfg.get("params") or {})
        if method.changes_model:
            evaluate_all(loaded.model, loaded, data, config)  # "vanilla" again, every time
            lap("baseline_eval")
            context = method_context(loaded, config, {})
            variant = method.apply(loaded.model, method_cfg.get("rate"), params, context).model
        else:
            variant = method.apply(loaded.model, None, params, None).model
        variant.eval()
        lap("method")
        metrics = evaluate_all(variant, loaded, data, config)
        lap("eval")
        rows.append({"trial_key": config["trial_key"], "method": method_cfg["name"],
                     "rate": method_cfg.get("rate"), "phases": laps.phases,
                     "perplexity": metrics.get("perplexity")})
    return rows


# --------------------------------------------------------------------------- 3. the ideal


def pure_pass(spec_path: Path, threads: int) -> list[dict[str, Any]]:
    """Method application + evaluators per trial at the trials' thread count, with one
    loaded model, one dataset and calibration computed once per method: the work itself."""
    import torch

    from workers.data import load_dataset
    from workers.methods import get_method

    torch.set_num_threads(threads)
    configs = trial_configs(spec_path)
    loaded = load_base(configs[0]["model"])
    data = load_dataset(configs[0]["dataset"], int(configs[0].get("seed", 0)))
    shared: dict[str, Any] = {}
    evaluate_all(loaded.model, loaded, data, configs[0])  # warm-up, untimed
    rows = []
    for config in configs:
        assert config["model"] == configs[0]["model"]
        assert config["dataset"] == configs[0]["dataset"]
        torch.manual_seed(int(config.get("seed", 0)))
        method_cfg = config["method"]
        method = get_method(method_cfg["name"])
        params = method.config.model_validate(method_cfg.get("params") or {})
        model = copy.deepcopy(loaded.model) if method.changes_model else loaded.model
        started = time.perf_counter()
        context = method_context(loaded, config, shared) if method.changes_model else None
        variant = method.apply(model, method_cfg.get("rate"), params, context).model
        variant.eval()
        method_s = time.perf_counter() - started
        started = time.perf_counter()
        metrics = evaluate_all(variant, loaded, data, config)
        rows.append({"trial_key": config["trial_key"], "method_s": method_s,
                     "eval_s": time.perf_counter() - started,
                     "perplexity": metrics.get("perplexity")})
    return rows


# --------------------------------------------------------------------------- 1. the launch


def run_launch(workdir: Path, spec_path: Path, env: dict[str, str], dashboard: bool,
               address: str | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, epoch start, process) of ``sweep launch`` on a fresh SQLite file."""
    db = f"sqlite:///{workdir / 'sweeps.db'}"
    command = [str(ROOT / ".venv" / "bin" / "sweep"), "--db", db, "launch", str(spec_path)]
    if not dashboard:
        command.append("--no-dashboard")
    if address:
        command += ["--address", address]
    epoch = time.time()
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                          check=False)
    return time.perf_counter() - started, epoch, proc


def sweep_rows(db_path: Path) -> list[dict[str, Any]]:
    """Per trial: timing columns, evidence details and perplexity, from the database."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session, selectinload

    from orchestrator.db.models import Trial

    engine = create_engine(f"sqlite:///{db_path}")
    rows = []
    with Session(engine) as session:
        trials = session.scalars(select(Trial).options(selectinload(Trial.metrics),
                                                       selectinload(Trial.evidence))
                                 .order_by(Trial.position)).all()
        for t in trials:
            details = t.evidence.details if t.evidence is not None else {}
            metrics = {m.name: m.value for m in t.metrics}
            rows.append({
                "trial_key": t.trial_key, "method": t.method, "rate": t.rate,
                "status": t.status, "error": t.error_message,
                "started": t.started_at.timestamp() if t.started_at else None,
                "finished": t.finished_at.timestamp() if t.finished_at else None,
                "duration_s": t.duration_s, "method_s": details.get("method_seconds"),
                "eval_s": sum((details.get("evaluation_seconds") or {}).values()),
                "loads": details.get("model_loads_in_process"), "pid": details.get("pid"),
                "calibration_reused": details.get("calibration_reused"),
                "model": t.model, "perplexity": metrics.get("perplexity"),
            })
    engine.dispose()
    return rows


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def load_avg() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=2,
                        help="max_concurrent_trials of the sweep (default 2)")
    parser.add_argument("--speed-warmup", type=int, default=2)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--script-threads", type=int, default=None,
                        help="torch threads of the sequential script (default: torch's "
                             "default, all cores, as a user's script gets)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="launch with --no-dashboard (default: the users' default)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--script-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--running-ray", action="store_true",
                        help="launch on a Ray started beforehand with `ray start --head` (the "
                             "cluster case: no Ray start or shutdown in the launch)")
    return parser.parse_args(argv)


def _floor_trial(config: dict[str, Any]) -> None:
    from ray import tune

    import workers.trial  # noqa: F401 - what every trial's worker process imports first

    tune.report({"done": 1})


@contextmanager
def running_ray(root: Path, env: dict[str, str], cpus: int, dashboard: bool):
    """A local Ray head started with ``ray start`` (as on a cluster), stopped afterwards;
    yields its address. Only this head's processes are stopped."""
    import signal
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    port = free_port()
    command = [str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
               "--temp-dir", str(root), "--dashboard-port", str(free_port()),
               "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
               f"--include-dashboard={'true' if dashboard else 'false'}"]
    head_env = dict(env, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(command, env=head_env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=120)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {output[-2000:]}")
        yield f"127.0.0.1:{port}", head_env
    finally:
        for entry in Path("/proc").iterdir():  # the head's daemons name its temp dir
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if entry.name.isdigit() and str(root) in cmdline:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def floor_main(concurrency: int, dashboard: bool, address: str | None = None) -> int:
    """The ``--floor-only`` child: what Ray and Tune cost with no work at all.

    The launch's own steps around the trials: import the CLI's modules, start a local Ray
    as ``sweep launch`` does (``launch.start_ray``), run ``concurrency`` Tune trials that
    only import ``workers.trial`` (a worker's first import) in ``concurrency`` actors, shut
    Ray down. Printed as one figure: no sweep can go below it on this machine.
    """
    from ray import tune

    from orchestrator import launch
    from orchestrator.cli import main as _cli  # noqa: F401 - the CLI's imports

    launch.start_ray(address, include_dashboard=dashboard)
    import ray

    storage = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    tune.Tuner(tune.with_resources(_floor_trial, {"cpu": 1}),
               param_space={"i": tune.grid_search(list(range(concurrency)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=concurrency,
                                           reuse_actors=True),
               run_config=tune.RunConfig(storage_path=str(storage), verbose=0)).fit()
    ray.shutdown()  # disconnects from a running Ray; stops a Ray started here
    return 0


def script_main(spec_path: Path, threads: int | None) -> int:
    """The ``--script-only`` child: run the sequential script, print its rows as JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    rows = sequential_script(spec_path)
    print("BENCH-SCRIPT-ROWS " + json.dumps({"threads": torch.get_num_threads(), "rows": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.script_only is not None:
        return script_main(args.script_only, args.script_threads)
    if args.floor_only:
        return floor_main(args.concurrency, not args.no_dashboard, args.ray_address)

    import yaml

    from workers.cache import cache_dir
    from workers.models.builtin import ensure_builtin_model

    cores = os.cpu_count() or 1
    print(f"bench_sweep: {MODEL} on {DATASET}; machine: {cores} cores "
          f"({os.sched_getaffinity(0).__len__()} usable); {load_avg()}", flush=True)
    model_dir = ensure_builtin_model(MODEL.removeprefix("builtin:"))  # untimed: trained once
    shared_models = cache_dir() / "models"
    workdir = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    cache = workdir / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(shared_models, target_is_directory=True)
    env = dict(os.environ, COMPRESS_SWEEP_CACHE=str(cache))
    spec = spec_dict(args)
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    configs = trial_configs(spec_path)
    n = len(configs)
    concurrency = args.concurrency
    print(f"grid: {n} trials (baseline, drop_layers x4, head_mask x4, prune_ffn x3), "
          f"max_concurrent_trials {concurrency}, cpus_per_trial 1; model {model_dir.name}; "
          f"work dir {workdir}", flush=True)

    # 1. launch, and 4. Ray's floor, both on a Ray started beforehand with --running-ray
    with ExitStack() as stack:
        address = None
        if args.running_ray:
            address, env = stack.enter_context(running_ray(
                Path(tempfile.mkdtemp(prefix="bench-ray-")), env, concurrency,
                not args.no_dashboard))
            print(f"[0] Ray head started beforehand at {address}; {load_avg()}", flush=True)
        launch_s, launch_epoch, proc = run_launch(workdir, spec_path, env, not args.no_dashboard,
                                                  address)
        print(f"[1] sweep launch: {launch_s:.1f} s (exit code {proc.returncode}); {load_avg()}",
              flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return 1
        # 4. Ray's floor: start, trivial trials in as many worker processes, shutdown
        command = [sys.executable, str(Path(__file__).resolve()), "--floor-only",
                   "--concurrency", str(concurrency)]
        command += ["--no-dashboard"] if args.no_dashboard else []
        command += ["--ray-address", address] if address else []
        started = time.perf_counter()
        child = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                               check=False)
        floor_s = time.perf_counter() - started
        if child.returncode != 0:
            print("the Ray floor run failed:", child.stdout[-3000:], child.stderr[-3000:],
                  sep="\n")
            return 1
        what = "connect" if address else "start"
        print(f"[4] Ray/Tune floor ({what}, {concurrency} empty trials, shutdown): "
              f"{floor_s:.1f} s; {load_avg()}", flush=True)

    db_rows = sweep_rows(workdir / "sweeps.db")
    failed = [r for r in db_rows if r["status"] != "done"]
    if len(db_rows) != n or failed:
        print(f"the sweep did not finish all {n} trials: "
              + "; ".join(f"{r['method']} {r['rate']}: {r['status']} {r['error']}"
                          for r in failed))
        return 1

    # 2. the sequential script
    command = [sys.executable, str(Path(__file__).resolve()), "--script-only", str(spec_path)]
    if args.script_threads:
        command += ["--script-threads", str(args.script_threads)]
    started = time.perf_counter()
    child = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                           check=False)
    script_s = time.perf_counter() - started
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("BENCH-SCRIPT-ROWS ")]
    if child.returncode != 0 or not lines:
        print("the sequential script failed:", child.stdout[-3000:], child.stderr[-3000:],
              sep="\n")
        return 1
    script = json.loads(lines[-1].removeprefix("BENCH-SCRIPT-ROWS "))
    print(f"[2] sequential script ({script['threads']} torch threads): {script_s:.1f} s; "
          f"{load_avg()}", flush=True)

    # 3. the pure work, in this process, at the trials' thread count
    pure = pure_pass(spec_path, threads=1)
    print(f"[3] pure evaluation pass (1 thread): "
          f"{sum(r['method_s'] + r['eval_s'] for r in pure):.1f} s of work; {load_avg()}",
          flush=True)

    # same work? the perplexities must agree across the three
    by_key = {r["trial_key"]: r for r in db_rows}
    script_by_key = {r["trial_key"]: r for r in script["rows"]}
    pure_by_key = {r["trial_key"]: r for r in pure}
    worst = 0.0
    for key, row in by_key.items():
        for other in (script_by_key[key]["perplexity"], pure_by_key[key]["perplexity"]):
            worst = max(worst, abs(other - row["perplexity"]) / abs(row["perplexity"]))

    # figures
    durations = [r["duration_s"] for r in db_rows]
    sum_duration = sum(durations)
    sum_pure = sum(r["method_s"] + r["eval_s"] for r in pure)
    ideal = sum_pure / concurrency
    # The same ideal from what the trials themselves stored (the evaluators' and the method's
    # own time in the worker, at cpus_per_trial threads, next to each other trial).
    ideal_db = sum(r["method_s"] + r["eval_s"] for r in db_rows) / concurrency
    overhead = (launch_s * concurrency - sum_duration) / n
    gaps = [(r["finished"] - r["started"]) - r["duration_s"] for r in db_rows]
    median_gap = statistics.median(gaps)
    first_start = min(r["started"] for r in db_rows)
    last_finish = max(r["finished"] for r in db_rows)
    startup = first_start - launch_epoch
    span = last_finish - first_start
    tail = launch_epoch + launch_s - last_finish

    per_pid: dict[Any, dict[str, Any]] = defaultdict(lambda: {"loads": 0, "models": set(),
                                                               "trials": 0})
    calibrations: dict[tuple[Any, str], list[int]] = defaultdict(lambda: [0, 0])
    calibrating = {"head_mask", "prune_ffn"}
    for r in db_rows:
        entry = per_pid[r["pid"]]
        entry["loads"] = max(entry["loads"], int(r["loads"] or 0))
        entry["models"].add(r["model"])
        entry["trials"] += 1
        if r["method"] in calibrating:
            counts = calibrations[(r["pid"], r["method"])]
            counts[0] += 1
            counts[1] += 0 if r["calibration_reused"] else 1
    loads_per_model = max(e["loads"] / len(e["models"]) for e in per_pid.values())
    max_calibrations = max(c[1] for c in calibrations.values()) if calibrations else 0

    print()
    print(f"Per trial (sweep: database; script: its own phases at {script['threads']} "
          f"thread(s); pure: 1 thread)")
    headers = ["method", "rate", "pid", "loads", "calib reused", "duration_s", "method_s",
               "start gap s", "pure method+eval s", "script load+data+base+method+eval s"]
    table = []
    for r in db_rows:
        p = pure_by_key[r["trial_key"]]
        ph = script_by_key[r["trial_key"]]["phases"]
        table.append([
            r["method"], "" if r["rate"] is None else f"{r['rate']:g}", str(r["pid"]),
            str(r["loads"]), str(r["calibration_reused"]), f"{r['duration_s']:.2f}",
            f"{r['method_s']:.3f}", f"{(r['finished'] - r['started']) - r['duration_s']:.2f}",
            f"{p['method_s']:.2f}+{p['eval_s']:.2f}",
            "+".join(f"{ph.get(k, 0.0):.2f}" for k in ("load_model", "load_data",
                                                       "baseline_eval", "method", "eval")),
        ])
    print_table(headers, table)

    print()
    print("Worker processes (evidence: pid, model_loads_in_process, calibration_reused)")
    print_table(["pid", "trials", "models", "model loads"],
                [[str(pid), str(e["trials"]), str(len(e["models"])), str(e["loads"])]
                 for pid, e in per_pid.items()])
    print_table(["pid", "method", "trials", "calibrations computed"],
                [[str(pid), m, str(c[0]), str(c[1])] for (pid, m), c in calibrations.items()])

    script_phase_totals: dict[str, float] = defaultdict(float)
    for row in script["rows"]:
        for k, v in row["phases"].items():
            script_phase_totals[k] += v
    print()
    print("Where the time goes")
    print(f"  launch: {startup:.1f} s from `sweep launch` to the first trial started (imports, "
          f"Ray start, Tune set-up), {span:.1f} s from first trial start to last result "
          f"stored, {tail:.1f} s after (shutdown)")
    print(f"  trials: sum of duration_s {sum_duration:.1f} s (worker-side run_trial), of which "
          f"method {sum(r['method_s'] for r in db_rows):.1f} s; pure work at 1 thread "
          f"{sum_pure:.1f} s (method {sum(r['method_s'] for r in pure):.1f} + evaluators "
          f"{sum(r['eval_s'] for r in pure):.1f}); in-worker non-evaluation time "
          f"{sum_duration - sum_pure:.1f} s")
    print("  script: " + ", ".join(f"{k} {v:.1f} s" for k, v in script_phase_totals.items())
          + f" (sum {sum(script_phase_totals.values()):.1f} s; the rest of its {script_s:.1f} s "
          f"is Python/torch start-up)")
    print(f"  start gap (per trial, (finished_at - started_at) - duration_s): median "
          f"{median_gap:.2f} s, min {min(gaps):.2f} s, max {max(gaps):.2f} s")

    print()
    print(f"Summary on {cores} cores ({load_avg()})")
    rows = [
        ["sweep launch wall time", f"{launch_s:.1f} s", "", ""],
        ["sequential script wall time", f"{script_s:.1f} s", "", ""],
        ["ideal: sum pure evaluation / concurrency", f"{ideal:.1f} s", "", ""],
        ["launch / script", f"{launch_s / script_s:.2f}x", f"<= {SCRIPT_TARGET}x",
         verdict(launch_s <= SCRIPT_TARGET * script_s)],
        ["ideal from the database: sum (method + evaluators) / concurrency",
         f"{ideal_db:.1f} s", "", ""],
        ["launch / ideal", f"{launch_s / ideal:.2f}x", f"<= {IDEAL_TARGET}x",
         verdict(launch_s <= IDEAL_TARGET * ideal)],
        ["Ray/Tune floor: start-up, empty trials, shutdown", f"{floor_s:.1f} s", "", ""],
        ["(launch - floor) / ideal: what the sweep adds beyond Ray's fixed cost",
         f"{(launch_s - floor_s) / ideal:.2f}x", f"<= {IDEAL_TARGET}x",
         verdict(launch_s - floor_s <= IDEAL_TARGET * ideal)],
        ["first trial start to last result / ideal (without start-up and shutdown)",
         f"{span / ideal:.2f}x", f"<= {IDEAL_TARGET}x", verdict(span <= IDEAL_TARGET * ideal)],
        ["orchestration overhead per trial", f"{overhead:.2f} s",
         "(wall x concurrency - sum duration_s) / n", ""],
        ["median start gap per trial", f"{median_gap:.2f} s", f"<= {START_GAP_TARGET_S:g} s",
         verdict(median_gap <= START_GAP_TARGET_S)],
        ["model loads per model per worker process", f"{loads_per_model:g} (max)", "1",
         verdict(loads_per_model <= 1)],
        ["calibrations per method per worker process", f"{max_calibrations} (max)", "1",
         verdict(max_calibrations <= 1)],
        ["worker processes", str(len(per_pid)), "", ""],
        ["perplexity agreement sweep/script/pure", f"{worst:.1e} max rel diff",
         f"<= {SAME_RTOL:g}", "SAME" if worst <= SAME_RTOL else "DIFFERS"],
    ]
    print_table(["figure", "value", "target", "verdict"], rows)
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir}")
    return 0 if worst <= SAME_RTOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
