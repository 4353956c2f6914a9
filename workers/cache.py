"""Caches: a per-process cache of loaded base models and the on-disk cache directory.

A worker process reads each base model from disk once; the on-disk cache directory
holds the trained built-in model and Ray Tune's experiment directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_models: dict[str, Any] = {}
_model_loads = 0


def cache_dir() -> Path:
    """Root of the on-disk cache: ``$COMPRESS_SWEEP_CACHE``, else ``~/.cache/compress-sweep``."""
    explicit = os.environ.get("COMPRESS_SWEEP_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "compress-sweep"
    root.mkdir(parents=True, exist_ok=True)
    return root


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_model(key: str, load: Callable[[], Any]) -> Any:
    """Return the object cached under ``key`` in this process, loading it once."""
    global _model_loads
    with _lock:
        if key not in _models:
            _models[key] = load()
            _model_loads += 1
        return _models[key]


def model_loads() -> int:
    """How many models this process has read from disk (for evidence and benchmarks)."""
    return _model_loads
