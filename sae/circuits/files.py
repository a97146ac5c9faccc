"""Atomic writes for the studies' outputs: a reader (or a crashed run) never leaves half a file behind."""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name in the same folder, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cell(value) -> object:
    """Empty for a missing value, floats at full precision, the rest as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def write_csv(path: Path, rows: Iterable[Mapping], fields: Sequence[str]) -> None:
    """``rows`` as a CSV with exactly ``fields`` as columns (a row lacking one leaves it empty), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: _cell(row.get(f)) for f in fields})
    write_text_atomic(path, buffer.getvalue())
