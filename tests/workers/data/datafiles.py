"""Writers of small dataset files in every supported file type, and real PNG images
(imported by the tests of this folder, which pytest puts on sys.path)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    # Columns from every record's keys (from_pylist would take the first record's only).
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys}), path)
    return path


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 4x4 PNG when Pillow is installed (the layer only needs the file to exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("PIL") is not None:
        from PIL import Image

        Image.new("RGB", (4, 4), color).save(path, format="PNG")
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a full image")
    return path
