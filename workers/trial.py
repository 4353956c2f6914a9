"""The whole life of one trial, inside a Ray worker process.

``run_trial(config) -> dict``: load the base model (once per process) → build the
variant on a private copy → verify it (parameter counts, changed-weight fraction,
max |Δlogits| vs the base on a fixed probe, causality) → evaluate → a plain result
dict. A method that claims to change the model but leaves the probe logits identical
fails the trial: "compression had no effect" is a failure, never a result.

The config and the result are plain dicts (the driver owns the database; this module
never imports ``orchestrator``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers import cache, result_files, telemetry
from workers.data import Dataset, load_dataset, load_documents, token_stream
from workers.deadline import Deadline
from workers.evaluators import MODEL_METRICS, evaluators
from workers.memory import is_out_of_memory, run_with_backoff
from workers.methods import MethodContext, get_method
from workers.models import LoadedModel, load_model

# Seconds between reporting a timed-out trial and ending its process: time for Tune to
# collect the report from this actor before it disappears.
TIMEOUT_EXIT_GRACE_S = 2.0
TIMEOUT_EXIT_CODE = 3


class NoEffectError(RuntimeError):
    """The method claimed to change the model but the variant's logits equal the base's."""


class InvalidEvaluationError(RuntimeError):
    """The variant cannot be evaluated as a causal language model (it sees future tokens)."""


# --------------------------------------------------------------------------- environment


@lru_cache(maxsize=1)
def hardware() -> dict[str, Any]:
    """What speed numbers depend on: CPU model, cores, threads, accelerator."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "system": platform.system(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


@lru_cache(maxsize=1)
def packages() -> dict[str, str]:
    """Versions of the packages results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ray", "numpy", "compress-sweep"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The project's git commit, when running from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Hardware, package versions and git sha, as stored with every result."""
    return {"hardware": hardware(), "packages": packages(), "git_sha": git_sha()}


# --------------------------------------------------------------------------- caches


def _device(config: dict[str, Any]) -> str:
    """The trial's device: its GPU when it was given one (unless the model entry says
    ``device: cpu``), else the CPU; ``device: cuda`` without a GPU is an error."""
    import torch

    wanted = (config.get("model") or {}).get("device") or "auto"
    if config.get("gpus_per_trial") == 0:
        # Ray leaves a GPU-less trial the node's GPUs visible; it was given none, so it
        # must not touch them (nor report them as its hardware). Set before CUDA starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    has_gpu = bool(config.get("use_gpu")) and torch.cuda.is_available()
    if wanted == "cpu":
        return "cpu"
    if wanted == "cuda" and not has_gpu:
        raise RuntimeError("model device is cuda but this trial has no GPU: set "
                           "resources.gpus_per_trial, or device: auto")
    # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU(s): the first visible one is ours.
    return "cuda:0" if has_gpu else "cpu"


def base_model(config: dict[str, Any], device: str) -> LoadedModel:
    """The base model of this trial, read from disk once per process."""
    entry = config["model"]
    key = cache.stable_hash([entry, device])
    loaded = cache.cached_model(key, lambda: load_model(
        entry["id"], dtype=entry.get("dtype"), device=device,
        trust_remote_code=bool(entry.get("trust_remote_code")), source=entry.get("source"),
        attn_implementation=entry.get("attn_implementation"), revision=entry.get("revision")))
    declared = entry.get("model_type")
    actual = getattr(loaded.model.config, "model_type", None)
    if declared and actual != declared:
        raise ValueError(f"model {entry['id']} is a {actual!r} model, not {declared!r} as its "
                         "spec entry declares (model_type); correct or remove it")
    return loaded


@lru_cache(maxsize=16)
def _documents(name: str, split: str | None, limit: int | None, seed: int) -> tuple[str, ...]:
    return tuple(load_documents(name, split, limit, seed))


_datasets: dict[str, Dataset] = {}
# Calibration statistics of methods, per base model and calibration set, for the life of
# the worker process: a sweep over several rates calibrates once (MethodContext.cached).
_calibration_cache: dict[str, Any] = {}


def dataset(entry: dict[str, Any], seed: int) -> Dataset:
    """The samples of the trial's dataset entry (read once per process)."""
    key = cache.stable_hash([entry, seed])
    if key not in _datasets:
        if len(_datasets) >= 16:
            _datasets.pop(next(iter(_datasets)))
        _datasets[key] = load_dataset(entry, seed)
    return _datasets[key]


_probe_cache: dict[str, Any] = {}


def probe_batch(loaded: LoadedModel, docs: list[str], length: int, device: str) -> Any:
    """A fixed [1, length] batch: the first ``length`` tokens of the evaluation text."""
    import torch

    ids = token_stream(loaded.tokenizer, docs, max_tokens=length)
    if len(ids) < 2:
        raise ValueError("the dataset has too little text to build a probe batch")
    return torch.tensor([ids[:length]], dtype=torch.long, device=device)


def logits_of(model: Any, batch: Any) -> Any:
    """float32 logits of ``model`` on ``batch``."""
    import torch

    with torch.inference_mode():
        return model(input_ids=batch).logits.float()


def _gpu_evidence(config: dict[str, Any], device: str) -> dict[str, Any]:
    """The GPUs Ray gave the trial, and whether other trials share them (a fraction)."""
    requested = float(config.get("gpus_per_trial") or 0)
    if not requested:
        return {}
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return {"gpus_per_trial": requested, "cuda_visible_devices": visible,
            # A fraction of a GPU runs beside other trials on it: speed is not isolated.
            "gpu_shared": requested < 1, "gpu_used": device.startswith("cuda")}


# --------------------------------------------------------------------------- evidence


def parameter_count(model: Any) -> int:
    """Number of weights the model represents: its parameters (shared tensors counted once)
    plus the weights that quantized modules hold outside parameters, so a quantized variant
    keeps the count of the float model it stands for.

    Those are the int8 weight values of ``quantize``'s ``Int8PerTokenLinear`` (a buffer;
    its bias stays a parameter) and the packed weight and bias values of torch.ao quantized
    modules (the tensors :func:`model_bytes` counts: ``_weight_bias()`` of a quantized
    linear, convolution or dynamic RNN, ``_weight()`` of an embedding). Quantization
    scales and zero points are not weights and are not counted.
    """
    import torch

    from workers.methods.quantize import Int8PerTokenLinear

    tensors = {id(p): p for p in model.parameters()}

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, tuple | list):
            for item in value:
                collect(item)
        elif isinstance(value, torch.Tensor):
            tensors[id(value)] = value

    for module in model.modules():
        if isinstance(module, Int8PerTokenLinear):
            tensors[id(module.weight_int8)] = module.weight_int8
        elif not type(module).__module__.startswith("torch.ao.nn."):
            continue
        elif isinstance(getattr(module, "_packed_params", None), torch.nn.Module):
            continue  # a quantized Linear: its LinearPackedParams child holds the weight
        elif callable(getattr(module, "_weight_bias", None)):
            collect(module._weight_bias())
        elif callable(getattr(module, "_weight", None)):
            collect(module._weight())
    return sum(t.numel() for t in tensors.values())


def model_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (shared tensors counted once), plus the weights that
    torch.ao quantized modules keep packed outside them.

    ``quantize``'s ``Int8PerTokenLinear`` keeps its int8 weight (1 byte per value) and its
    float32 per-output-channel scales as buffers and its float bias as a parameter, so the
    sum of parameters and buffers covers it.

    A packed weight (``_weight_bias()`` of a quantized linear's ``LinearPackedParams``, of a
    quantized convolution or dynamic RNN; ``_weight()`` of an ``EmbeddingPackedParams``)
    counts its integer values at their element size (1 byte for qint8 / quint8) plus its
    quantization parameters: a per-tensor scale and zero point as 8 bytes each, per-channel
    ones at the element size torch holds them in (float64 / int64 for a linear's qint8
    weight); a packed bias counts at its float size.
    """
    import torch

    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())

    def packed_bytes(value: Any) -> int:
        if isinstance(value, dict):
            return sum(packed_bytes(v) for v in value.values())
        if isinstance(value, tuple | list):
            return sum(packed_bytes(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return 0
        size = value.numel() * value.element_size()
        if value.is_quantized and value.qscheme() in (torch.per_tensor_affine,
                                                      torch.per_tensor_symmetric):
            size += 8 + 8
        elif value.is_quantized:
            size += sum(t.numel() * t.element_size() for t in (
                value.q_per_channel_scales(), value.q_per_channel_zero_points()))
        return size

    for module in model.modules():
        if not type(module).__module__.startswith("torch.ao.nn."):
            continue
        if isinstance(getattr(module, "_packed_params", None), torch.nn.Module):
            continue  # a quantized Linear: its LinearPackedParams child holds the weight
        if callable(getattr(module, "_weight_bias", None)):
            total += packed_bytes(module._weight_bias())
        elif callable(getattr(module, "_weight", None)):
            total += packed_bytes(module._weight())
    return total


def changed_fraction(base: Any, variant: Any, renamed: dict[str, str]) -> float:
    """Fraction of the base model's weights that the variant changed or removed."""
    import torch

    base_params = dict(base.named_parameters())
    total = sum(p.numel() for p in base_params.values())
    matched: set[str] = set()
    changed = 0
    for name, param in variant.named_parameters():
        base_name = renamed.get(name, name)
        original = base_params.get(base_name)
        if original is None or original.shape != param.shape:
            continue
        matched.add(base_name)
        with torch.no_grad():
            changed += int((original.to(param.device, param.dtype) != param).sum())
    removed = sum(p.numel() for n, p in base_params.items() if n not in matched)
    return (changed + removed) / total if total else 0.0


def causality_violation(model: Any, probe: Any) -> float:
    """Max |Δlogits| at positions ≤ t when only the tokens after t change (0 for a causal model)."""
    cut = probe.shape[1] // 2
    before = logits_of(model, probe)
    altered = probe.clone()
    altered[:, cut + 1:] = (probe[:, cut + 1:] + 1) % before.shape[-1]
    after = logits_of(model, altered)
    return float((before[:, : cut + 1] - after[:, : cut + 1]).abs().max())


# --------------------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any], deadline: Deadline | None = None) -> dict[str, Any]:
    """Build, verify and evaluate one variant; returns the result dict (status "done").

    ``deadline`` is told when each evaluation starts and ends, so a watcher can stop an
    evaluation that runs over ``evaluation.timeout_s``.
    """
    import torch

    deadline = deadline or Deadline(None, None)
    started = time.perf_counter()
    started_unix = time.time()
    threads = max(1, int(config.get("cpus_per_trial") or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(int(config.get("seed", 0)))
    device = _device(config)
    evaluation = config["evaluation"]

    loads_before = cache.model_loads()
    load_started = time.perf_counter()
    loaded = base_model(config, device)
    load_seconds = time.perf_counter() - load_started
    loaded_here = cache.model_loads() > loads_before
    data = dataset(config["dataset"], int(config.get("seed", 0)))
    probe = probe_batch(loaded, data.documents(), int(evaluation.get("probe_length", 32)), device)
    probe_key = cache.stable_hash([config["model"], device, probe.tolist()])
    if probe_key not in _probe_cache:
        _probe_cache[probe_key] = logits_of(loaded.model, probe)
    base_logits = _probe_cache[probe_key]

    method_cfg = config["method"]
    method = get_method(method_cfg["name"])
    params = method.config.model_validate(method_cfg.get("params") or {})
    params_before = parameter_count(loaded.model)
    bytes_before = model_bytes(loaded.model)
    method_started = time.perf_counter()
    if method.changes_model:
        seed = int(config.get("seed", 0))
        context = MethodContext(
            tokenizer=loaded.tokenizer, family=loaded.family, seed=seed, device=device,
            calibration_documents=lambda name, split, seed: list(_documents(name, split, None,
                                                                            seed)),
            calibration_dataset=lambda entry: dataset(dict(entry), seed),
            processor=getattr(loaded, "processor", None),
            model_key=cache.stable_hash([config["model"], device]),
            _cache=_calibration_cache)
        # The cached base must stay pristine for the next trial in this process.
        outcome = method.apply(copy.deepcopy(loaded.model), method_cfg.get("rate"), params,
                               context)
    else:
        outcome = method.apply(loaded.model, method_cfg.get("rate"), params, None)
    variant = outcome.model
    variant.eval()
    method_seconds = time.perf_counter() - method_started

    variant_logits = logits_of(variant, probe)
    if variant_logits.shape == base_logits.shape:
        max_dlogits = float((variant_logits - base_logits).abs().max())
        identical = bool(torch.equal(variant_logits, base_logits))
    else:
        max_dlogits, identical = float("inf"), False
    evidence = {
        "params_before": params_before,
        "params_after": parameter_count(variant),
        "changed_fraction": (changed_fraction(loaded.model, variant, outcome.renamed)
                             if method.changes_model else 0.0),
        "max_abs_dlogits": max_dlogits,
        "details": {
            "method": outcome.info,
            "bytes_before": bytes_before,
            "bytes_after": model_bytes(variant),
            "probe_tokens": int(probe.shape[1]),
            "method_seconds": method_seconds,
            "calibration_reused": bool(method.changes_model and context.cache_hits),
            # Calibration statistics this trial computed (0 when reused or not needed).
            "calibrations_computed": context.cache_misses if method.changes_model else 0,
            "device": device,
            "model_loads_in_process": cache.model_loads(),
            # This trial read its base model from disk (else the process had it already).
            "model_loaded": loaded_here,
            "model_load_seconds": load_seconds if loaded_here else 0.0,
            "pid": os.getpid(),
            **_gpu_evidence(config, device),
        },
    }
    if method.changes_model and identical:
        raise NoEffectError(
            f"compression had no effect: {method.name} at rate {method_cfg.get('rate')} left the "
            f"probe logits identical to the base model (changed weight fraction "
            f"{evidence['changed_fraction']:.3g})")
    violation = causality_violation(variant, probe)
    evidence["details"]["causality_max_abs_dlogits"] = violation
    if violation > 1e-4 * max(1.0, float(base_logits.abs().max())):
        raise InvalidEvaluationError(
            f"the variant is not causal: changing tokens after position t changed the logits at "
            f"positions <= t by up to {violation:.3g}; its language-model metrics would be invalid")

    metrics: dict[str, dict[str, Any]] = {}
    batches: dict[str, dict[str, Any]] = {}
    evaluation_seconds: dict[str, float] = {}
    registry = evaluators()
    # A dataset may name its own evaluators (a multiple-choice set has no perplexity).
    for name in config["dataset"].get("metrics") or evaluation["metrics"]:
        info = registry[name]
        evaluation_started = time.perf_counter()
        with deadline.evaluation(name):
            values, batch = run_with_backoff(
                lambda settings, info=info: info.evaluate(
                    variant, loaded.tokenizer, data, settings, device=device,
                    processor=getattr(loaded, "processor", None)),
                evaluation, info.batch_setting, name)
        evaluation_seconds[name] = time.perf_counter() - evaluation_started
        batches[name] = batch.as_dict()
        for metric, value in values.items():
            metrics[metric] = {"value": value, "direction": info.metrics.get(metric)}
    evidence["details"]["evaluation"] = batches
    # Pure evaluation time per evaluator (OOM retries included): with method_seconds, what
    # the trial could not have saved; the rest of duration_s is loading and checking.
    evidence["details"]["evaluation_seconds"] = evaluation_seconds
    # When the trial held its resources (epoch seconds), e.g. to check GPU sharing.
    evidence["details"]["wall_clock"] = {"start": started_unix, "end": time.time()}
    metrics["params"] = {"value": float(evidence["params_after"]),
                         "direction": MODEL_METRICS["params"]}
    metrics["size_mb"] = {"value": evidence["details"]["bytes_after"] / 2**20,
                          "direction": MODEL_METRICS["size_mb"]}
    return {
        "status": "done",
        "metrics": metrics,
        "evidence": evidence,
        "environment": environment(),
        "host": socket.gethostname(),
        "duration_s": time.perf_counter() - started,
    }


def failure_reason(exc: BaseException) -> str:
    """The recorded reason of a failure: what kind of failure it is, for retries and reports."""
    if is_out_of_memory(exc):
        return "out_of_memory"
    if isinstance(exc, NoEffectError):
        return "no_effect"
    if isinstance(exc, InvalidEvaluationError):
        return "invalid_evaluation"
    return "error"


def _safe_environment() -> dict[str, Any] | None:
    try:
        return environment()
    except Exception:  # noqa: BLE001 - the original error is what matters
        return None


def failure_result(exc: BaseException, started: float) -> dict[str, Any]:
    """The result dict of a trial that raised (call inside the ``except`` block)."""
    return {
        "status": "failed",
        "error": {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                  "traceback": traceback.format_exc(), "reason": failure_reason(exc)},
        "environment": _safe_environment(),
        "host": socket.gethostname(),
        "duration_s": time.perf_counter() - started,
    }


def timed_out_result(message: str, started: float, thread: threading.Thread | None) -> dict:
    """The result dict of a trial stopped by its deadline, with where it was stuck."""
    frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
    stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
    return {
        "status": "timed_out",
        "error": {"type": "TrialTimeout", "message": message, "reason": "timed_out",
                  "traceback": f"The trial (worker process {os.getpid()}) was here when it "
                               f"was stopped:\n{stack}"},
        "environment": _safe_environment(),
        "host": socket.gethostname(),
        "duration_s": time.perf_counter() - started,
    }


def attempt(config: dict[str, Any], deadline: Deadline | None = None) -> dict[str, Any]:
    """Run the trial; any error becomes a failed result (the sweep goes on)."""
    started = time.perf_counter()
    try:
        return run_trial(config, deadline)
    except Exception as exc:  # noqa: BLE001 - every trial error becomes a recorded failure
        return failure_result(exc, started)


def _run_within_limits(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(result, timed_out): the trial in a thread, watched against its deadline."""
    limits = config.get("limits") or {}
    deadline = Deadline(limits.get("trial_timeout_s"), limits.get("evaluation_timeout_s"))
    if not deadline.active:
        return attempt(config), False
    started = time.perf_counter()
    box: dict[str, dict[str, Any]] = {}
    thread = threading.Thread(target=lambda: box.update(result=attempt(config, deadline)),
                              name=f"trial-{config['trial_key'][:8]}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        message = deadline.exceeded()
        if message is not None and thread.is_alive():
            return timed_out_result(message, started, thread), True
    return box["result"], False


def tune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: run the trial and report its result as one JSON payload.

    Its first report, before any work, is ``{"started": JSON of host, pid, gpus}``: where
    the trial runs (``gpus`` the ids Ray assigned, "" on CPU). The result is first written
    to the trial's result file (durable across a driver crash), then reported. A trial over
    its time limit is reported as ``timed_out`` and its process then exits, releasing
    everything the stuck trial holds.
    """
    import ray
    from ray import tune

    trial = config["trial"]
    # Say where this trial runs before it starts working: the driver stores the host and
    # GPUs on the running trial (`sweep status --watch` shows them), while the result, which
    # names the host too, may be many minutes away. The driver ignores reports without a
    # "payload" for the outcome, so this one does not end the trial.
    try:
        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside a Ray worker: what CUDA would see
        gpu_ids = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    host, gpus = socket.gethostname(), ",".join(gpu_ids)
    tune.report({"started": json.dumps({"host": host, "pid": os.getpid(), "gpus": gpus})})
    telemetry.trial_started(trial, host, gpus)
    # Relative paths in the spec (datasets, images, model directories, calibration files)
    # mean what they meant where `sweep launch` ran, not in Tune's trial directory.
    driver_cwd = trial.get("driver_cwd")
    if driver_cwd and os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    result, timed_out = _run_within_limits(trial)
    if trial.get("result_dir"):
        result_files.write(trial["result_dir"], trial["trial_key"], result)
    telemetry.trial_finished(trial, result)
    tune.report({"payload": json.dumps(result), "trial_status": result["status"]})
    if timed_out:
        threading.Timer(TIMEOUT_EXIT_GRACE_S, os._exit, args=(TIMEOUT_EXIT_CODE,)).start()
        while True:  # never return: Tune must not reuse this process for another trial
            time.sleep(60)
