"""What the Ray dashboard shows of a sweep: trial actors' names, log lines and metrics.

Metrics go through ``ray.util.metrics`` from the worker that runs the trial; Ray's
metrics agent on each node exports them in Prometheus format on the node's metrics port
(``ray start --metrics-export-port``; ``ray.nodes()[i]["MetricsExportPort"]``), with the
prefix ``ray_`` and a few seconds of delay. The dashboard's Metrics view draws them when
Prometheus and Grafana are set up as Ray documents. Every metric is tagged with the
sweep, the model and the method:

- ``compress_sweep_trials_done`` (counter): trials that finished with a result.
- ``compress_sweep_trials_failed`` (counter, tag ``reason``): failed and timed-out trials
  (``reason`` is the recorded failure reason: ``error``, ``out_of_memory``,
  ``no_effect``, ``invalid_evaluation``, ``timed_out``).
- ``compress_sweep_trial_duration_seconds`` (histogram): a trial's time in its worker.
- ``compress_sweep_tokens_evaluated`` (counter): tokens the perplexity evaluator scored
  (its ``eval_tokens``); other evaluators do not count tokens this way.
- ``compress_sweep_trials_running`` (gauge, tag ``rate``): 1 while the trial of that
  model, method and rate runs in this worker, then 0.

Nothing here may fail a trial: outside a Ray worker, or when Ray refuses a metric, the
calls do nothing (and say why once in the log).

Ray names an actor in the dashboard once, from ``repr()`` when the actor is created;
:func:`trainable` names trial actors after the trial they were created for. An actor is
reused for later trials (it keeps the base model in memory), so each trial also writes
one line when it starts and one when it ends to the actor's log, which the dashboard
shows with the actor.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

LOG = logging.getLogger(__name__)
TAGS = ("sweep", "model", "method")
# Trial time in a worker: seconds for the built-in model, hours for a 7B sweep.
DURATION_BOUNDARIES = [1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                       28800]

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_unavailable = False


def trial_label(trial: dict[str, Any]) -> str:
    """``model · method rate`` of a trial config (``method`` alone when it has no rate)."""
    method = trial.get("method") or {}
    rate = method.get("rate")
    name = method.get("name", "?")
    return f"{(trial.get('model') or {}).get('id', '?')} · {name}" + (
        "" if rate is None else f" {rate:g}")


def _tags(trial: dict[str, Any]) -> dict[str, str]:
    return {"sweep": str(trial.get("sweep", "")),
            "model": str((trial.get("model") or {}).get("id", "")),
            "method": str((trial.get("method") or {}).get("name", ""))}


def _rate_tag(trial: dict[str, Any]) -> str:
    rate = (trial.get("method") or {}).get("rate")
    return "none" if rate is None else f"{rate:g}"


def _get() -> dict[str, Any] | None:
    """The metrics of this process, made once; None outside a Ray worker."""
    global _metrics, _unavailable
    with _lock:
        if _metrics is not None or _unavailable:
            return _metrics
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                _unavailable = True
                return None
            _metrics = {
                "done": Counter("compress_sweep_trials_done",
                                description="Trials that finished with a result.",
                                tag_keys=TAGS),
                "failed": Counter("compress_sweep_trials_failed",
                                  description="Trials that failed or timed out, by reason.",
                                  tag_keys=(*TAGS, "reason")),
                "duration": Histogram("compress_sweep_trial_duration_seconds",
                                      description="A trial's time in its worker process.",
                                      boundaries=DURATION_BOUNDARIES, tag_keys=TAGS),
                "tokens": Counter("compress_sweep_tokens_evaluated",
                                  description="Tokens the perplexity evaluator scored.",
                                  tag_keys=TAGS),
                "running": Gauge("compress_sweep_trials_running",
                                 description="1 while a trial of this model, method and "
                                             "rate runs in this worker.",
                                 tag_keys=(*TAGS, "rate")),
            }
        except Exception as exc:  # noqa: BLE001 - metrics must never fail a trial
            LOG.warning("Ray metrics are unavailable in this worker: %s", exc)
            _unavailable = True
        return _metrics


def _say(line: str) -> None:
    """One line in the actor's log (Ray keeps a worker's stderr per actor)."""
    print(f"[compress-sweep] {line}", file=sys.stderr, flush=True)


def trial_started(trial: dict[str, Any], host: str, gpus: str) -> None:
    """Log the trial's start and mark it running."""
    key = str(trial.get("trial_key", ""))[:8]
    _say(f"trial {trial_label(trial)} ({key}) started on {host}"
         + (f", GPU {gpus}" if gpus else ""))
    metrics = _get()
    if metrics is None:
        return
    try:
        metrics["running"].set(1, tags={**_tags(trial), "rate": _rate_tag(trial)})
    except Exception as exc:  # noqa: BLE001
        LOG.warning("could not record a metric: %s", exc)


def trial_finished(trial: dict[str, Any], result: dict[str, Any]) -> None:
    """Log the trial's outcome and count it."""
    key = str(trial.get("trial_key", ""))[:8]
    status = result.get("status", "failed")
    duration = result.get("duration_s")
    reason = (result.get("error") or {}).get("reason") if status != "done" else None
    _say(f"trial {trial_label(trial)} ({key}) {status}"
         + (f" ({reason})" if reason else "")
         + (f" in {duration:.1f} s" if isinstance(duration, int | float) else ""))
    metrics = _get()
    if metrics is None:
        return
    tags = _tags(trial)
    try:
        metrics["running"].set(0, tags={**tags, "rate": _rate_tag(trial)})
        if status == "done":
            metrics["done"].inc(1, tags=tags)
            tokens = ((result.get("metrics") or {}).get("eval_tokens") or {}).get("value")
            if tokens:
                metrics["tokens"].inc(float(tokens), tags=tags)
        else:
            metrics["failed"].inc(1, tags={**tags, "reason": str(reason or status)})
        if isinstance(duration, int | float):
            metrics["duration"].observe(float(duration), tags=tags)
    except Exception as exc:  # noqa: BLE001
        LOG.warning("could not record a metric: %s", exc)


def trainable(function: Any) -> type:
    """A Tune trainable running ``function`` whose actors the dashboard names after the
    trial they were created for (``<sweep>: <model> · <method> <rate>``)."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(function)

    class SweepTrial(base):  # type: ignore[misc, valid-type]
        def __repr__(self) -> str:
            trial = (getattr(self, "config", None) or {}).get("trial")
            if not isinstance(trial, dict):
                return "SweepTrial"
            return f"{trial.get('sweep', 'sweep')}: {trial_label(trial)}"

    return SweepTrial
