"""A SQLite cache of every LLM request and response, so a killed study resumes and a replay is deterministic.

Keys hash the backend, the model, the kind of request, its prompt and its parameters. Each response is
committed as soon as it arrives (WAL journal), so whatever finished before a kill is there on the next run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sae.errors import ConfigError

MODES = ("readwrite", "replay", "off")


def request_key(backend: str, model: str, kind: str, request: Any) -> str:
    """A stable hash of everything that determines a response."""
    blob = json.dumps({"backend": backend, "model": model, "kind": kind, "request": request}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """get/put by key, with hit and miss counts; `replay` turns a miss into an error, `off` stores nothing."""

    def __init__(self, path: Path | str | None, mode: str = "readwrite"):
        if mode not in MODES:
            raise ConfigError(f"autointerp.cache_mode={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "replay" and (path is None or not Path(path).is_file()):
            raise ConfigError(f"autointerp.cache_mode=replay needs an existing cache file; {path} is absent")
        self.mode, self.path = mode, None if path is None else Path(path)
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._db = None
        if mode != "off" and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, kind TEXT, request TEXT, "
                             "response TEXT)")

    def get(self, key: str) -> Any | None:
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, kind: str, request: Any, response: Any) -> None:
        if self._db is None or self.mode == "replay":
            return
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (key, kind, json.dumps(request, ensure_ascii=False), json.dumps(response, ensure_ascii=False)),
            )

    def __len__(self) -> int:
        if self._db is None:
            return 0
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def through(self, backend: str, model: str, kind: str, payloads: Sequence[Any],
                compute: Callable[[list[int]], list[Any]], chunk: int = 8) -> list[Any]:
        """Responses for `payloads`: cached ones looked up, the others computed `chunk` at a time and stored at once.

        `compute` gets the indices of the payloads to answer. Storing each chunk as it finishes is what lets a
        killed study pick up where it stopped.
        """
        keys = [request_key(backend, model, kind, p) for p in payloads]
        found = [self.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        self.hits += len(payloads) - len(todo)
        self.misses += len(todo)
        if todo and self.mode == "replay":
            raise ConfigError(f"autointerp.cache_mode=replay: {len(todo)} {kind} request(s) to {backend}:{model} are "
                              f"not in {self.path}; run once with cache_mode=readwrite")
        for start in range(0, len(todo), max(1, chunk)):
            part = todo[start: start + max(1, chunk)]
            for i, response in zip(part, compute(part)):
                found[i] = response
                self.put(keys[i], kind, payloads[i], response)
        return found

    def stats(self) -> dict:
        return {"path": None if self.path is None else str(self.path), "mode": self.mode, "hits": self.hits,
                "misses": self.misses}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
