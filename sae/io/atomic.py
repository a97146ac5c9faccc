"""The one way this project writes a file a reader may open at any moment: to a temporary name, then renamed.

A kill at any point leaves either the old file or the new one, never half of one. Directories that must appear
whole (an activation cache, an evaluation's output) are built under a temporary name and renamed the same way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: dict | list) -> None:
    """JSON, indented, written atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None, only: bool = False) -> None:
    """All ``rows`` in one CSV, the key ``columns`` first and every other key after them (sorted), atomically;
    ``only``: exactly ``columns`` (a row lacking one leaves it empty)."""
    columns = list(columns or [])
    fields = columns if only else columns + sorted({k for r in rows for k in r} - set(columns))
    if only:
        rows = [{f: r.get(f) for f in fields} for r in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


@contextlib.contextmanager
def staged_directory(final: str | Path, marker: str | None = None) -> Iterator[Path]:
    """A new empty directory beside ``final`` to build a directory in: moved into place (``publish_directory``)
    when the block ends without error, removed otherwise, so a kill or an error never leaves a half-built ``final``.

    With ``marker`` (a file only a finished build holds) a finished copy already there wins: a concurrent builder
    of the same content (another rank, another run) made it. Without, the new directory replaces the old whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, final, replace=marker is None or not (final / marker).is_file())


def publish_directory(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a finished directory ``tmp`` into place at ``final``.

    Without ``replace`` a finished copy already there wins (a concurrent writer of the same content) and ``tmp`` is
    dropped; with it, the old directory is removed first (``final`` is briefly absent, never half-new)."""
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(final)
    os.rename(tmp, final)
