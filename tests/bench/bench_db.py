"""Benchmark of the results database: how fast results go in, how fast the leaderboard comes out.

Measured in one run, on SQLite (a fresh file in a temporary directory) and on a real
PostgreSQL 15 server that this script starts and removes itself (``tests/postgres_server.py``):

1. Ingest rate, results/s, through the driver's real write path: for every result, what
   the Tune callback in ``orchestrator/launch.py`` does, ``ResultWriter.started`` (on
   on_trial_start), then ``json.loads(payload)`` and ``ResultWriter.finished`` (on
   on_trial_result); timed until the writer has committed the last one. The events are
   handed over as fast as they come, as when many trials end together: that is the
   writer's capacity, the figure the target is about. A second figure, not a target,
   commits each result before the next arrives (the cost of a lone result). The result
   dicts have the
   shape ``workers.trial.run_trial`` returns: the eight metrics of the perplexity and speed
   evaluators plus ``params`` and ``size_mb``, with their registered directions; evidence
   with the method's details; the environment (hardware, packages, git sha); ~4 % failed or
   timed out, with a reason and a traceback, as ``failure_result`` / ``timed_out_result``
   build them. Target: >= 1,000 results/s.
2. Leaderboard latency over ``--n-results`` stored results (default 100,000): the trials are
   the real grid of ``orchestrator.spec.expand`` over six sweeps (one holds 55 % of the
   results; 12 models, 1-3 datasets, drop_layers/head_mask entries with dense rate grids,
   a baseline per model x dataset, 4 % failed and 2 % pending trials, two hardware
   fingerprints), bulk-loaded (core executemany on SQLite, COPY on PostgreSQL; loading is
   not measured). Then
   ``queries.leaderboard`` is timed as ``sweep leaderboard --top 20`` calls it (``limit=20``:
   ranked in the database, only those rows built) with metric ``score`` and
   ``perplexity``, over all sweeps and over the big sweep alone: median of ``--repeats``
   runs, each in its own read session (fewer when the runs of one variant have already
   taken ``--budget-s``: a leaderboard far off target needs no fifth run to show it).
   Target: <= 300 ms.

Targets are reported as MEETS/MISSES; a slow machine does not fail the run. ``--profile``
adds a cProfile of one leaderboard call on SQLite, to see where the time goes.

Run from the project root (needs root for PostgreSQL: the server is started as the
``postgres`` user through ``runuser``)::

    .venv/bin/python tests/bench/bench_db.py [--n-results 100000] [--n-ingest 1000]
        [--repeats 5] [--budget-s 10] [--skip-postgres] [--profile]

The file name does not match pytest's ``test_*.py``, so the test suite never collects it.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import JSON, Engine, create_engine, func, insert, make_url, select, text

from orchestrator import queries
from orchestrator import spec as spec_module
from orchestrator.db.engine import dispose_engines, ensure_schema, session_scope
from orchestrator.db.models import Environment, Evidence, Metric, Sweep, Trial
from orchestrator.db.store import (
    RESULT_STATUSES,
    fingerprint,
    json_safe,
    register_sweep,
)
from orchestrator.db.writer import ResultWriter
from workers.evaluators import MODEL_METRICS, evaluators, metric_directions


def _load_postgres_server() -> ModuleType:
    # tests/postgres_server.py is loaded from its file: putting tests/ on sys.path would let
    # the namespace package tests/orchestrator shadow parts of the real orchestrator package.
    path = Path(__file__).resolve().parent.parent / "postgres_server.py"
    spec = importlib.util.spec_from_file_location("postgres_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


postgres_server = _load_postgres_server()
PG_BIN: Path = postgres_server.PG_BIN

INGEST_TARGET_PER_S = 1_000.0
LEADERBOARD_TARGET_S = 0.300
TOP = 20
INSERT_CHUNK = 10_000

# The metrics a trial with evaluation.metrics [perplexity, speed] stores and their directions,
# taken from the registry so the benchmark follows it (a new metric fails metric_values).
DIRECTIONS: dict[str, str | None] = metric_directions()
STORED_METRICS: tuple[str, ...] = (
    *evaluators()["perplexity"].metrics, *evaluators()["speed"].metrics, *MODEL_METRICS,
)

# (hub id, parameters, decoder layers, attention heads per layer): real sizes, so evidence and
# size metrics have realistic magnitudes (several exceed 2**31 parameters).
MODELS: tuple[tuple[str, int, int, int], ...] = (
    ("meta-llama/Llama-3.2-1B", 1_235_814_400, 16, 32),
    ("meta-llama/Llama-3.2-3B", 3_212_749_824, 28, 24),
    ("meta-llama/Llama-3.1-8B", 8_030_261_248, 32, 32),
    ("Qwen/Qwen2.5-0.5B", 494_032_768, 24, 14),
    ("Qwen/Qwen2.5-1.5B", 1_543_714_304, 28, 12),
    ("Qwen/Qwen2.5-7B", 7_615_616_512, 28, 28),
    ("LGAI-EXAONE/EXAONE-4.0-1.2B", 1_279_463_424, 30, 32),
    ("mistralai/Mistral-7B-v0.3", 7_248_023_552, 32, 32),
    ("google/gemma-2-2b", 2_614_341_888, 26, 8),
    ("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, 32, 32),
    ("HuggingFaceTB/SmolLM2-1.7B", 1_711_376_384, 24, 32),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384, 22, 32),
)
MODEL_INFO = {m[0]: m for m in MODELS}
DATASETS: tuple[dict[str, Any], ...] = (
    {"name": "wikitext", "split": "test"},
    {"name": "builtin:pydoc", "split": "test"},
    {"name": "allenai/c4", "split": "validation", "limit": 512},
)
DROP_TOP = {"name": "drop_layers", "params": {"from": "top"}}
DROP_BOTTOM = {"name": "drop_layers", "params": {"from": "bottom"}}
MASK_GLOBAL = {"name": "head_mask", "params": {"scope": "global"}}
MASK_LAYER = {"name": "head_mask", "params": {"scope": "layer"}}


@dataclass(frozen=True)
class SweepLayout:
    """One sweep of the stored layout: its share of the results and its grid axes."""

    name: str
    share: float
    models: tuple[int, ...]
    datasets: tuple[int, ...]
    methods: tuple[dict[str, Any], ...]


# One big sweep and a tail of smaller ones, like a team database after a few months.
LAYOUT: tuple[SweepLayout, ...] = (
    SweepLayout("llm-pruning-grid", 0.55, tuple(range(12)), (0, 1),
                (DROP_TOP, DROP_BOTTOM, MASK_GLOBAL, MASK_LAYER)),
    SweepLayout("qwen-rate-scan", 0.15, (3, 4, 5), (0, 1), (DROP_TOP, MASK_GLOBAL)),
    SweepLayout("drop-layers-ablation", 0.12, (0, 1, 2, 6, 7, 8), (0,), (DROP_TOP, DROP_BOTTOM)),
    SweepLayout("head-mask-scope", 0.10, (0, 2, 9, 10), (0, 1, 2), (MASK_GLOBAL, MASK_LAYER)),
    SweepLayout("exaone-repro", 0.05, (6, 11), (0, 2), (DROP_TOP, MASK_LAYER)),
    SweepLayout("smoke", 0.03, (11, 3), (1,), (DROP_TOP, MASK_GLOBAL)),
)
BIG_SWEEP = LAYOUT[0].name

HARDWARE: tuple[dict[str, Any], ...] = (
    {"cpu": "AMD EPYC 7763 64-Core Processor", "cpu_count": 128, "machine": "x86_64",
     "system": "Linux", "torch_threads": 8, "cuda": True, "gpu": "NVIDIA A100-SXM4-80GB",
     "cuda_version": "12.4"},
    {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpu_count": 224, "machine": "x86_64",
     "system": "Linux", "torch_threads": 8, "cuda": True, "gpu": "NVIDIA H100 80GB HBM3",
     "cuda_version": "12.4"},
)
PACKAGES = {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.2.0", "ray": "2.60.0",
            "numpy": "2.2.1", "compress-sweep": "0.1.0"}
GIT_SHA = "4bb6cce8a1d2f0e9b7c6d5e4f3a2b1c0d9e8f7a6"
TRACEBACK = "".join(
    f'  File "/opt/compress-sweep/workers/{name}.py", line {line}, in {func_}\n    {code}\n'
    for name, line, func_, code in (
        ("trial", 318, "tune_trainable", "result = run_trial(config['trial'])"),
        ("trial", 262, "run_trial", "raise NoEffectError("),
    )
)
# (status, error type, message, failure reason) as workers.trial's failure_result and
# timed_out_result report them.
FAILURES: tuple[tuple[str, str, str, str], ...] = (
    ("failed", "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
     "79.15 GiB total capacity; 76.02 GiB already allocated)", "out_of_memory"),
    ("failed", "NoEffectError", "compression had no effect: head_mask at rate 0.01 left the "
     "probe logits identical to the base model (changed weight fraction 0)", "no_effect"),
    ("failed", "InvalidEvaluationError", "the variant is not causal: changing tokens after "
     "position t changed the logits at positions <= t by up to 0.31", "invalid_evaluation"),
    ("timed_out", "TrialTimeout", "the trial exceeded its 3600 s deadline", "timed_out"),
)


# --------------------------------------------------------------------------- the grid


def sweep_spec(layout: SweepLayout, n_trials: int) -> spec_module.SweepSpec:
    """A valid spec whose grid has at least ``n_trials`` trials (dense rates fill it up)."""
    pairs = len(layout.models) * len(layout.datasets)
    per_entry = max(1, math.ceil((n_trials / pairs - 1) / len(layout.methods)))
    # Evenly spaced rates strictly inside (0, 1); a real spec has a handful, a database
    # accumulates many through reruns with new grids.
    rates = [round((i + 1) / (per_entry + 1), 6) for i in range(per_entry)]
    return spec_module.SweepSpec.model_validate({
        "name": layout.name,
        "models": [{"id": MODELS[i][0], "dtype": "bfloat16"} for i in layout.models],
        "methods": [{**entry, "rates": rates} for entry in layout.methods],
        "datasets": [DATASETS[i] for i in layout.datasets],
        "evaluation": {"metrics": ["perplexity", "speed"], "max_length": 2048, "stride": 512},
        "score": {"quality_metric": "perplexity", "weight": 0.5},
    })


def grid(layout: SweepLayout, n_trials: int) -> tuple[spec_module.SweepSpec,
                                                      list[spec_module.TrialSpec]]:
    """The spec and its first ``n_trials`` trials in grid order (baselines come first per pair,
    so cutting the tail only shortens the last pair's rate list)."""
    spec = sweep_spec(layout, n_trials)
    return spec, spec_module.expand(spec)[:n_trials]


def split_counts(total: int) -> list[int]:
    """Results per sweep of ``LAYOUT``, summing exactly to ``total``."""
    counts = [max(1, int(total * layout.share)) for layout in LAYOUT]
    counts[0] += total - sum(counts)
    return counts


# --------------------------------------------------------------------------- result dicts
# Everything random is derived from the trial key (a sha256), so the stored layout and the
# ingested results are the same on every run and every backend, and cheap to produce.


def key_fraction(trial: spec_module.TrialSpec, slot: int) -> float:
    """A uniform draw in [0, 1) taken from 8 hex digits of the trial key (slot 0-7)."""
    return int(trial.trial_key[8 * slot:8 * slot + 8], 16) / 2**32


def trial_rng(trial: spec_module.TrialSpec) -> random.Random:
    """A generator seeded by the trial key (an int seed: str seeds hash with sha512), from
    digits that ``key_fraction`` slots 0-4 do not use."""
    return random.Random(int(trial.trial_key[40:56], 16))


@cache
def _stable_draw(label: str) -> float:
    return random.Random(label).random()


def environment(hardware_index: int) -> dict[str, Any]:
    """The environment dict a worker on this hardware reports (``workers.trial.environment``)."""
    return {"hardware": HARDWARE[hardware_index], "packages": PACKAGES, "git_sha": GIT_SHA}


def hardware_of(trial: spec_module.TrialSpec, sweep: str) -> int:
    """Which hardware ran a trial: mostly one per model, ~10 % elsewhere (no speed score)."""
    home = int(_stable_draw(f"{sweep}|{trial.model}") * len(HARDWARE))
    if not trial.is_baseline and key_fraction(trial, 1) < 0.10:
        return 1 - home
    return home


def outcome_of(trial: spec_module.TrialSpec) -> str:
    """done, failed (~4 %, failed or timed out) or pending (~2 %, a sweep still running);
    baselines are always done."""
    if trial.is_baseline:
        return "done"
    draw = key_fraction(trial, 0)
    return "failed" if draw < 0.04 else "pending" if draw < 0.06 else "done"


def metric_values(trial: spec_module.TrialSpec, rng: random.Random) -> dict[str, float]:
    """Plausible metric values: a base per model x dataset, degraded and sped up by the rate."""
    _, n_params, _, _ = MODEL_INFO[trial.model]
    ppl_base = 6.0 + 19.0 * _stable_draw(f"{trial.model}|{trial.dataset}|ppl")
    ms_base = (15.0 + 45.0 * _stable_draw(f"{trial.model}|{trial.dataset}|ms")) * n_params / 3e9
    rate = trial.rate or 0.0
    noise = 1.0 + rng.gauss(0.0, 0.02) if not trial.is_baseline else 1.0
    if trial.method == "drop_layers":
        ppl = ppl_base * math.exp(2.5 * rate * noise)
        speedup, kept = 1.0 - 0.85 * rate, 1.0 - 0.85 * rate
    elif trial.method == "head_mask":
        ppl = ppl_base * math.exp(2.0 * rate**1.5 * noise)
        speedup, kept = 1.0, 1.0  # masked heads are zeroed, not removed
    else:
        ppl, speedup, kept = ppl_base, 1.0, 1.0
    ms = ms_base * speedup * (1.0 + rng.gauss(0.0, 0.01))
    params = float(int(n_params * kept))
    return {
        "perplexity": ppl,
        "nll_per_token": math.log(ppl),
        "eval_tokens": 287_644.0,
        "prefill_tokens_per_s": 1_000.0 / ms * 64 * 12,
        "decode_ms_per_token": ms,
        "decode_tokens_per_s": 1_000.0 / ms,
        "decode_ms_per_token_iqr": ms * abs(rng.gauss(0.0, 0.03)),
        "peak_memory_mb": params * 2 / 2**20 + 1_800.0,
        "params": params,
        "size_mb": params * 2 / 2**20,
    }


@cache
def masked_heads(layers: int, heads: int, per_layer: int) -> dict[str, list[int]]:
    """``masked_heads_per_layer`` of the same size as the real details; which heads are listed
    does not matter to the database, so a rotating pattern stands in for the ranking."""
    return {str(layer): sorted((layer * 7 + i) % heads for i in range(per_layer))
            for layer in range(layers)}


def evidence(trial: spec_module.TrialSpec, values: dict[str, float],
             rng: random.Random) -> dict[str, Any]:
    """Evidence as ``run_trial`` builds it, with the method's own details."""
    _, n_params, layers, heads = MODEL_INFO[trial.model]
    rate = trial.rate or 0.0
    if trial.method == "drop_layers":
        n_drop = min(layers - 1, max(1, round(rate * layers)))
        dropped = (list(range(layers - n_drop, layers)) if trial.params.get("from") == "top"
                   else list(range(n_drop)))
        info: dict[str, Any] = {"layers_before": layers, "layers_after": layers - n_drop,
                                "dropped_layers": dropped}
    elif trial.method == "head_mask":
        per_layer_count = max(1, round(rate * heads))
        per_layer = masked_heads(layers, heads, per_layer_count)
        info = {"heads_masked": per_layer_count * layers, "heads_total": layers * heads,
                "masked_heads_per_layer": per_layer, "scope": trial.params.get("scope"),
                "calibration": {"dataset": "builtin:pydoc", "split": "train", "samples": 16,
                                "length": 128}}
    else:
        info = {}
    return {
        "params_before": n_params,
        "params_after": int(values["params"]),
        "changed_fraction": 0.0 if trial.is_baseline else min(1.0, rate * 1.1),
        "max_abs_dlogits": 0.0 if trial.is_baseline else rng.uniform(0.5, 30.0),
        "details": {
            "method": info, "bytes_before": n_params * 2, "bytes_after": int(values["params"]) * 2,
            "probe_tokens": 32, "method_seconds": rng.uniform(0.1, 40.0), "device": "cuda:0",
            "model_loads_in_process": 1, "pid": rng.randrange(1_000, 4_000_000),
            "causality_max_abs_dlogits": 0.0,
        },
    }


def result_dict(trial: spec_module.TrialSpec, sweep: str) -> dict[str, Any]:
    """The result dict a worker reports for ``trial`` (``run_trial`` or ``failure_result``)."""
    hw = hardware_of(trial, sweep)
    host = f"gpu-{'ah'[hw]}{1 + int(key_fraction(trial, 2) * 8):02d}"
    if outcome_of(trial) == "failed":
        status, kind, message, reason = FAILURES[int(key_fraction(trial, 3) * len(FAILURES))]
        return {
            "status": status,
            "error": {"type": kind, "message": message, "reason": reason,
                      "traceback": f"Traceback (most recent call last):\n{TRACEBACK}"
                                   f"workers.errors.{kind}: {message}\n"},
            "environment": environment(hw), "host": host, "duration_s": 42.0,
        }
    rng = trial_rng(trial)
    values = metric_values(trial, rng)
    return {
        "status": "done",
        "metrics": {name: {"value": values[name], "direction": DIRECTIONS[name]}
                    for name in STORED_METRICS},
        "evidence": evidence(trial, values, rng),
        "environment": environment(hw),
        "host": host,
        "duration_s": 60.0 + 600.0 * key_fraction(trial, 4),
    }


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """A database server to run the benchmarks on: a factory of fresh, empty database URLs."""

    name: str
    fresh_url: Callable[[str], str]
    note: str = ""


@contextmanager
def sqlite_backend() -> Iterator[Backend]:
    """SQLite files in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp:
        try:
            yield Backend("sqlite", lambda label: f"sqlite:///{Path(tmp) / label}.db",
                          "WAL, synchronous=NORMAL (the project's settings)")
        finally:
            dispose_engines()


@contextmanager
def postgres_backend() -> Iterator[Backend]:
    """A throwaway PostgreSQL 15 server; each URL is a new database on it."""
    with postgres_server.running_postgres() as admin_url:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")

        def fresh_url(label: str) -> str:
            name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            return make_url(admin_url).set(database=name).render_as_string(hide_password=False)

        try:
            # The test server runs with fsync=off and synchronous_commit=off: commits cost no
            # disk flush, so its ingest rate is an upper bound for a production server.
            yield Backend("postgresql", fresh_url, "test server: fsync=off, synchronous_commit=off")
        finally:
            dispose_engines()
            admin.dispose()


# --------------------------------------------------------------------------- 1. ingest


@dataclass
class IngestFigures:
    """Outcome of the ingest benchmark on one backend."""

    results: int
    seconds: float
    transactions: int  # the writer's commits

    @property
    def per_s(self) -> float:
        return self.results / self.seconds


def bench_ingest(url: str, n_results: int, one_at_a_time: bool = False) -> IngestFigures:
    """Feed ``n_results`` trial starts and results to the driver's writer; time until stored.

    Default: as the callback does when results arrive faster than they are written (many
    trials ending together): events are handed over without waiting, and the writer
    commits whatever has queued up in one transaction. ``one_at_a_time``: each result is
    committed before the next arrives (the latency of a lone result, a trial every few
    seconds).
    """
    layout = SweepLayout("ingest", 1.0, (0, 3, 6, 11), (0,), (DROP_TOP, MASK_GLOBAL))
    spec, trials = grid(layout, n_results)
    engine = ensure_schema(url, create=True)
    with session_scope(engine, write=True) as session:
        register_sweep(session, spec.name, spec.model_dump(mode="json", by_alias=True), None,
                       [t.row() for t in trials])
    # The callback receives each result as the JSON payload the trainable reported.
    payloads = [json.dumps(result_dict(t, spec.name)) for t in trials]

    writer = ResultWriter(engine, spec.name)
    started = time.perf_counter()
    for trial, payload in zip(trials, payloads, strict=True):
        writer.started(trial.trial_key)  # on_trial_start
        writer.finished(trial.trial_key, json.loads(payload))  # on_trial_result
        if one_at_a_time:
            writer.flush()
    writer.close()
    seconds = time.perf_counter() - started

    # A benchmark that silently wrote nothing would be fast; check every result landed.
    expected_metrics = len(STORED_METRICS) * sum(
        1 for payload in payloads if json.loads(payload)["status"] == "done")
    with session_scope(engine) as session:
        finished = session.scalar(
            select(func.count()).select_from(Trial).where(Trial.status.in_(RESULT_STATUSES)))
        stored_metrics = session.scalar(select(func.count()).select_from(Metric))
        attempts = session.scalar(select(func.sum(Trial.attempts)))
    if (finished, stored_metrics, attempts) != (len(trials), expected_metrics, len(trials)):
        raise RuntimeError(f"ingest wrote {finished} results / {stored_metrics} metrics / "
                           f"{attempts} attempts, expected {len(trials)} / "
                           f"{expected_metrics} / {len(trials)}")
    return IngestFigures(len(trials), seconds, writer.batches)


# --------------------------------------------------------------------------- 2. bulk load


def _insert_rows(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (all with the same keys) in one transaction, as fast as the backend can.

    SQLite: core executemany, which pysqlite runs in C. PostgreSQL: COPY through the psycopg
    connection, because psycopg 3 runs an executemany as one pipelined statement per row
    (~70 s for 100,000 results here) and SQLAlchemy's multi-row VALUES pages are slower still
    (psycopg re-parses each huge statement in Python). COPY bypasses SQLAlchemy's type
    processing, so JSON columns are serialised here as SQLAlchemy would (json.dumps).
    """
    if not rows:
        return
    with engine.begin() as conn:
        if engine.dialect.name != "postgresql":
            for start in range(0, len(rows), INSERT_CHUNK):
                conn.execute(insert(table), rows[start:start + INSERT_CHUNK])
            return
        columns = list(rows[0])
        as_json = [isinstance(table.c[name].type, JSON) for name in columns]
        quoted = ", ".join(f'"{name}"' for name in columns)
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(f'COPY "{table.name}" ({quoted}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([
                    json.dumps(value) if is_json and value is not None else value
                    for value, is_json in zip(row.values(), as_json, strict=True)
                ])


def bulk_load(engine: Engine, n_results: int) -> dict[str, int]:
    """Store ``n_results`` trials (with metrics, evidence, environments) in ``LAYOUT``.

    Trials get explicit ids, so metrics and evidence can reference their trial without
    reading ids back (see ``_insert_rows`` for how rows are written). Returns row counts.
    """
    now = datetime(2026, 11, 1, tzinfo=UTC)
    env_ids: dict[int, int] = {}
    with session_scope(engine, write=True) as session:
        for index, hw in enumerate(HARDWARE):
            hardware, packages = json_safe(hw), json_safe(PACKAGES)
            row = Environment(
                fingerprint=fingerprint({"hardware": hardware, "packages": packages,
                                         "git_sha": GIT_SHA}),
                hardware_fingerprint=fingerprint(hardware), hardware=hardware,
                packages=packages, git_sha=GIT_SHA)
            session.add(row)
            session.flush()
            env_ids[index] = row.id

    counts = {"sweeps": 0, "trials": 0, "metrics": 0, "evidence": 0}
    next_id = 1
    for layout, n_trials in zip(LAYOUT, split_counts(n_results), strict=True):
        spec, trials = grid(layout, n_trials)
        with session_scope(engine, write=True) as session:
            sweep = Sweep(name=spec.name, spec=spec.model_dump(mode="json", by_alias=True),
                          spec_path=f"sweeps/{spec.name}.yaml", created_at=now,
                          updated_at=now)
            session.add(sweep)
            session.flush()
            sweep_id = sweep.id
        trial_rows: list[dict[str, Any]] = []
        metric_rows: list[dict[str, Any]] = []
        evidence_rows: list[dict[str, Any]] = []
        for trial in trials:
            trial_id, next_id = next_id, next_id + 1
            row: dict[str, Any] = {
                **trial.row(), "id": trial_id, "sweep_id": sweep_id, "status": "pending",
                "attempts": 0, "created_at": now, "started_at": None, "finished_at": None,
                "duration_s": None, "host": None, "error_type": None, "error_message": None,
                "error_traceback": None, "failure_reason": None, "environment_id": None,
            }
            trial_rows.append(row)
            if outcome_of(trial) == "pending":
                continue
            result = result_dict(trial, spec.name)
            started = now + timedelta(seconds=90 * trial.position)
            row.update(status=result["status"], attempts=1, started_at=started,
                       finished_at=started + timedelta(seconds=result["duration_s"]),
                       duration_s=result["duration_s"], host=result["host"],
                       environment_id=env_ids[hardware_of(trial, spec.name)])
            if result["status"] != "done":
                error = result["error"]
                row.update(error_type=error["type"], error_message=error["message"],
                           error_traceback=error["traceback"], failure_reason=error["reason"])
                continue
            metric_rows.extend(
                {"trial_id": trial_id, "name": name, "value": entry["value"],
                 "direction": entry["direction"], "note": None}
                for name, entry in result["metrics"].items())
            evidence_rows.append({"trial_id": trial_id, **result["evidence"]})
        _insert_rows(engine, Trial.__table__, trial_rows)
        _insert_rows(engine, Metric.__table__, metric_rows)
        _insert_rows(engine, Evidence.__table__, evidence_rows)
        counts["sweeps"] += 1
        counts["trials"] += len(trial_rows)
        counts["metrics"] += len(metric_rows)
        counts["evidence"] += len(evidence_rows)

    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # Explicit ids bypassed the sequence; keep it ahead so later inserts do not collide.
            conn.execute(text("SELECT setval(pg_get_serial_sequence('trials', 'id'), "
                              "(SELECT max(id) FROM trials))"))
            # Autovacuum would analyse the freshly loaded tables within a minute; do it now so
            # the timings reflect a settled server rather than planner guesses on empty stats.
            conn.execute(text("VACUUM ANALYZE"))
    return counts


# --------------------------------------------------------------------------- 3. leaderboard


@dataclass
class LeaderboardFigures:
    """Timings of one leaderboard variant on one backend."""

    label: str
    times: list[float] = field(default_factory=list)
    rows: int = 0
    with_value: int = 0
    best: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _leaderboard_top(engine: Engine, metric: str, sweep: str | None) -> list[dict[str, Any]]:
    # What `sweep leaderboard --top 20` does: a read session, the query with its limit.
    with session_scope(engine) as session:
        return queries.leaderboard(session, metric=metric, sweep=sweep, limit=TOP)


def bench_leaderboard(engine: Engine, metric: str, sweep: str | None,
                      repeats: int, budget_s: float) -> LeaderboardFigures:
    """Wall times of ``leaderboard(..., limit=TOP)``: ``repeats`` calls, or fewer once they took
    ``budget_s`` together. The median is reported; with three or more calls it discards the
    first call's cold caches and statement compilation."""
    figures = LeaderboardFigures(f"{metric}, {'sweep ' + sweep if sweep else 'all sweeps'}")
    while len(figures.times) < repeats and sum(figures.times) < budget_s:
        started = time.perf_counter()
        top = _leaderboard_top(engine, metric, sweep)
        figures.times.append(time.perf_counter() - started)
    # A leaderboard that ranked nothing would be fast: check rows came back with the metric.
    key = (lambda r: r[metric]) if metric in queries.COMPUTED_METRICS else (
        lambda r: r["metrics"].get(metric))
    figures.rows = len(top)
    figures.with_value = sum(1 for r in top if key(r) is not None)
    if len(top) < TOP or key(top[0]) is None or not isinstance(top[0]["params"], dict):
        raise RuntimeError(f"leaderboard by {metric} returned no ranked rows: {top[:1]}")
    best = top[0]
    figures.best = f"{best['model']} {best['method']} {best['rate']} {metric}={key(best):.4g}"
    return figures


def profile_leaderboard(engine: Engine, metric: str, limit: int = 14) -> str:
    """cProfile of one leaderboard call: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    _leaderboard_top(engine, metric, None)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


def run_backend(backend: Backend, args: argparse.Namespace,
                table: list[tuple[str, str, str, str, str]]) -> None:
    """All measurements on one backend; appends (backend, what, figure, target, verdict)."""
    print(f"\n== {backend.name} ({backend.note})", flush=True)

    ingest = bench_ingest(backend.fresh_url("ingest"), args.n_ingest)
    ok = ingest.per_s >= INGEST_TARGET_PER_S
    print(f"ingest: {ingest.results} results in {ingest.seconds:.2f} s = "
          f"{ingest.per_s:,.0f} results/s in {ingest.transactions} transactions "
          f"(target >= {INGEST_TARGET_PER_S:,.0f}) {verdict(ok)}", flush=True)
    lone = bench_ingest(backend.fresh_url("lone"), max(1, args.n_ingest // 4),
                        one_at_a_time=True)
    print(f"ingest one result at a time (each committed before the next): "
          f"{lone.per_s:,.0f} results/s, {1000 / lone.per_s:.2f} ms per result "
          f"(not a target)", flush=True)
    table.append((backend.name, f"ingest ({ingest.results} results)",
                  f"{ingest.per_s:,.0f} results/s", f">= {INGEST_TARGET_PER_S:,.0f}/s",
                  verdict(ok)))
    dispose_engines()

    url = backend.fresh_url("leaderboard")
    engine = ensure_schema(url, create=True)
    started = time.perf_counter()
    counts = bulk_load(engine, args.n_results)
    print(f"bulk load: {counts['trials']:,} trials, {counts['metrics']:,} metrics, "
          f"{counts['evidence']:,} evidence rows in {counts['sweeps']} sweeps "
          f"({time.perf_counter() - started:.1f} s, not a target)", flush=True)
    for metric, sweep in (("score", None), ("perplexity", None), ("score", BIG_SWEEP)):
        figures = bench_leaderboard(engine, metric, sweep, args.repeats, args.budget_s)
        ok = figures.median <= LEADERBOARD_TARGET_S
        spread = ", ".join(f"{t * 1000:.0f}" for t in figures.times)
        print(f"leaderboard top {TOP} by {figures.label}: median {figures.median * 1000:,.0f} ms "
              f"[{spread}], {figures.rows} rows returned ({figures.with_value} ranked; best: "
              f"{figures.best}) (target <= {LEADERBOARD_TARGET_S * 1000:.0f} ms) {verdict(ok)}",
              flush=True)
        table.append((backend.name, f"leaderboard {figures.label}",
                      f"{figures.median * 1000:,.0f} ms",
                      f"<= {LEADERBOARD_TARGET_S * 1000:.0f} ms", verdict(ok)))
    if args.profile and backend.name == "sqlite":
        print(f"\ncProfile of one leaderboard call by score on {backend.name}:")
        print(profile_leaderboard(engine, "score"))
    dispose_engines()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-results", type=int, default=100_000,
                        help="results stored for the leaderboard timing (default: the target)")
    parser.add_argument("--n-ingest", type=int, default=1_000,
                        help="results written through the driver's path (default 1000)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed leaderboard calls per variant; the median is reported")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="stop repeating a leaderboard variant once its calls took this "
                             "long (default 10 s; at least one call always runs)")
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one leaderboard call on SQLite")
    args = parser.parse_args(argv)
    if args.n_results < 100 or args.n_ingest < 10 or args.repeats < 1:
        parser.error("need --n-results >= 100, --n-ingest >= 10, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Other work on a 2-core machine skews every figure; the load average says how much.
    print(f"bench_db: ingest {args.n_ingest:,} results, leaderboard over {args.n_results:,} "
          f"results, up to {args.repeats} timed runs per leaderboard variant "
          f"(budget {args.budget_s:g} s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    table: list[tuple[str, str, str, str, str]] = []
    started = time.perf_counter()

    with sqlite_backend() as backend:
        run_backend(backend, args, table)

    if args.skip_postgres:
        print("\n== postgresql skipped (--skip-postgres)")
    elif not (PG_BIN / "initdb").exists():
        print(f"\n== postgresql skipped: {PG_BIN / 'initdb'} absent (no PostgreSQL 15)")
    else:
        with postgres_backend() as backend:
            run_backend(backend, args, table)

    print(f"\nsummary (total {time.perf_counter() - started:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
