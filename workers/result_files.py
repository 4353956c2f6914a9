"""Result files: every trial result is written to disk before it is reported to Tune.

The driver records results in the database as Tune delivers them. If the driver dies
between a worker's report and that write, the result would be lost; so the worker first
writes it atomically to ``<result_dir>/<trial_key>.json``, and the next launch ingests
the files of trials the database still has as pending. The driver deletes a file once its
result is in the database.

``result_dir`` is a local directory or a URI of a filesystem pyarrow knows (``s3://…``,
``gs://…``, ``file://…``; options such as ``?endpoint_override=…&region=…`` in its query),
which every node can reach without a shared mount.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any


def is_uri(location: str | Path) -> bool:
    """A URI (``s3://bucket/dir``), not a local path."""
    return "://" in str(location)


def uri_join(uri: str, *parts: str) -> str:
    """``uri`` with path ``parts`` appended before its query string."""
    base, _, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


@lru_cache(maxsize=8)
def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of ``uri``."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/")


def _uri_write(result_dir: str, trial_key: str, data: bytes) -> str:
    filesystem, base = _filesystem(result_dir)
    filesystem.create_dir(base, recursive=True)
    target = f"{base}/{trial_key}.json"
    # Written under a temporary name, then moved: a reader lists only complete *.json
    # files (an object store's object appears whole anyway).
    tmp = f"{base}/.{trial_key[:16]}.{uuid.uuid4().hex[:8]}.tmp"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    try:
        filesystem.move(tmp, target)
    except BaseException:
        try:
            filesystem.delete_file(tmp)
        except OSError:
            pass
        raise
    return uri_join(result_dir, f"{trial_key}.json")


def _uri_read(result_dir: str, name: str) -> bytes | None:
    filesystem, base = _filesystem(result_dir)
    try:
        with filesystem.open_input_stream(f"{base}/{name}") as stream:
            return stream.read()
    except OSError:  # FileNotFoundError included
        return None


def path_of(result_dir: str | Path, trial_key: str) -> Path:
    """Where the result of ``trial_key`` is written."""
    return Path(result_dir) / f"{trial_key}.json"


def write(result_dir: str | Path, trial_key: str, result: dict[str, Any]) -> Path | str:
    """Write ``result`` durably and atomically (a reader never sees half a file)."""
    if is_uri(result_dir):
        return _uri_write(str(result_dir), trial_key, json.dumps(result).encode())
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
    if is_uri(result_dir):
        return _parse(_uri_read(str(result_dir), f"{trial_key}.json"))
    return _load(path_of(result_dir, trial_key))


def _parse(data: bytes | str | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        result = json.loads(data)
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def read_all(result_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every complete result file in ``result_dir`` by trial key (unreadable ones skipped)."""
    if is_uri(result_dir):
        from pyarrow import fs

        filesystem, base = _filesystem(str(result_dir))
        out: dict[str, dict[str, Any]] = {}
        for info in filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            if info.type == fs.FileType.File and name.endswith(".json"):
                result = _parse(_uri_read(str(result_dir), name))
                if result is not None:
                    out[name.removesuffix(".json")] = result
        return out
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
    if is_uri(result_dir):
        filesystem, base = _filesystem(str(result_dir))
        try:
            filesystem.delete_file(f"{base}/{trial_key}.json")
        except FileNotFoundError:
            pass
        return
    path_of(result_dir, trial_key).unlink(missing_ok=True)
