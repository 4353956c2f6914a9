"""Reading records (plain dicts) from local files and from the Hugging Face hub.

Local: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or an object
with one list of objects under ``data``/``rows``/``examples``), ``.csv`` (a header row;
every value a string), ``.parquet`` (through pyarrow). Hub: ``datasets.load_dataset(name,
config, split=...)``; with ``HF_HUB_OFFLINE=1`` only what is in the local cache.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from workers.data import DatasetError, DatasetRequest, Records

MAX_LOCAL_BYTES = 2 * 2**30  # a data file larger than this is surely a wrong path


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"dataset file {path} is not readable: {exc.strerror}") from None


def check_local_file(request: DatasetRequest) -> None:
    """The file exists, is a regular readable file, of a known type."""
    path = request.path
    if path.is_dir():
        raise DatasetError(f"dataset {request.name} is a directory; give the path of a "
                           ".txt/.jsonl/.json/.csv/.parquet file")
    if not path.is_file():
        raise DatasetError(f"dataset file {request.name} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".csv", ".parquet"):
        raise DatasetError(f"dataset file {request.name}: unknown file type {suffix or '(none)'};"
                           " use .txt, .jsonl, .json, .csv or .parquet")
    if path.stat().st_size > MAX_LOCAL_BYTES:
        raise DatasetError(f"dataset file {request.name} is larger than "
                           f"{MAX_LOCAL_BYTES // 2**30} GiB")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise DatasetError(f"dataset file {request.name} is not readable: {exc.strerror}") from None
    if request.split is not None:
        raise DatasetError(f"dataset file {request.name}: split applies to built-in and hub "
                           "datasets only; remove it (a file is one split)")


def read_local(request: DatasetRequest) -> Records:
    """Every record of a local .jsonl/.json/.csv/.parquet file, in file order."""
    check_local_file(request)
    path = request.path
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records: Records = []
        # split("\n"), not splitlines(): JSON text may hold a raw U+2028 or U+0085.
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: line {number} is not a JSON object")
            records.append(record)
        return records
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
        if isinstance(data, dict):
            lists = [data[k] for k in ("data", "rows", "examples") if isinstance(data.get(k), list)]
            data = lists[0] if lists else None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(f"{path} must hold a list of objects (or one under data/rows/"
                               "examples)")
        return data
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            records = []
            try:
                for row in reader:
                    # DictReader keeps extra values under None and fills missing ones with None.
                    if None in row or None in row.values():
                        raise DatasetError(
                            f"{path}: line {reader.line_num} does not have one value for each of "
                            f"the header's {len(reader.fieldnames or ())} columns; quote values "
                            "that contain commas")
                    records.append(dict(row))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DatasetError(f"{path} is not readable as CSV: {exc}") from None
            return records
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise DatasetError(f"{path} is not readable as Parquet: {exc}") from None
    raise DatasetError(f"{path}: records come from .jsonl, .json, .csv or .parquet files")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_dataset(request: DatasetRequest) -> None:
    """With HF_HUB_OFFLINE=1, the dataset must be in the local cache (nothing downloads)."""
    if not _offline():
        return  # availability is checked when the trial reads it
    try:
        read_hub(request, probe=True)
    except DatasetError as exc:
        raise DatasetError(f"{exc}; HF_HUB_OFFLINE=1 is set: download it first with "
                           f"`datasets` on a machine with hub access (same HF_HOME), or unset "
                           "HF_HUB_OFFLINE") from None


def read_hub(request: DatasetRequest, probe: bool = False) -> Records:
    """The records of a hub dataset split (``probe``: only that it can be opened)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the project
        raise DatasetError("reading hub datasets needs the datasets package") from None
    split = request.split or "test"
    try:
        data = datasets.load_dataset(request.name, request.config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"hub dataset {request.name!r} (config {request.config!r}, split "
                           f"{split!r}) cannot be read: {first}") from None
    if probe:
        return []
    return [dict(row) for row in data]


def get_path(record: dict[str, Any], path: str) -> Any:
    """``record[a][b]…`` for the dotted ``path`` ``a.b…``; KeyError naming the path."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value
