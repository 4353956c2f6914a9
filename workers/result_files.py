"""Result files: every trial result is written to disk before it is reported to Tune.

The driver records results in the database as Tune delivers them. If the driver dies
between a worker's report and that write, the result would be lost; so the worker first
writes it atomically to ``<result_dir>/<trial_key>.json``, and the next launch ingests
the files of trials the database still has as pending. The driver deletes a file once its
result is in the database.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def path_of(result_dir: str | Path, trial_key: str) -> Path:
    """Where the result of ``trial_key`` is written."""
    return Path(result_dir) / f"{trial_key}.json"


def write(result_dir: str | Path, trial_key: str, result: dict[str, Any]) -> Path:
    """Write ``result`` durably and atomically (a reader never sees half a file)."""
    directory = Path(result_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = path_of(directory, trial_key)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{trial_key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read(result_dir: str | Path, trial_key: str) -> dict[str, Any] | None:
    """The result written for ``trial_key``; None when there is none (or it is unreadable)."""
    return _load(path_of(result_dir, trial_key))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def read_all(result_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every complete result file in ``result_dir`` by trial key (unreadable ones skipped)."""
    directory = Path(result_dir)
    out: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return out
    for path in directory.glob("*.json"):
        result = _load(path)
        if result is not None:
            out[path.stem] = result
    return out


def remove(result_dir: str | Path, trial_key: str) -> None:
    """Delete the result file of ``trial_key`` (its result is in the database)."""
    path_of(result_dir, trial_key).unlink(missing_ok=True)
