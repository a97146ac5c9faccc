"""The token store: a corpus's training documents tokenized once, on disk, memory-mapped by every later reader.

Reading a corpus into Python lists and tokenizing it in one call costs tens of GB per process for a billion
tokens, and was repeated by every DDP process and by ``evaluate.py``. Instead the training documents are tokenized
once, batched and in parallel (``datasets.map``), into ``<root>/<key[:16]>/``:

- ``tokens.bin``: every training document's ids followed by EOS, back to back (uint16 when the vocabulary fits,
  uint32 otherwise), read through ``numpy.memmap``, so a process holds only the pages it touches;
- ``offsets.npy``: where each document starts in ``tokens.bin`` (int64, one more than the documents);
- ``index.json``: the key, what it was made of, the dtype and the counts; written last, so a directory without it
  is never read.

Context ``i`` of length ``L`` is BOS followed by tokens ``[i(L-1), (i+1)(L-1))`` of that stream (exactly what
packing the documents in memory gave), so contexts are cut by index: each DDP rank reads only its own.

The key is the SHA-256 of the tokenizer (its serialised vocabulary and rules), the data (source, path, split,
text column, and each file's name, size and modification time, or the hub dataset's cached files) and the split
(``heldout_fraction``); the context length is not in it (contexts are cut when read). The held-out documents are
not stored: ``heldout_contexts`` tokenizes only as many of them as an evaluation needs (see there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from sae.errors import ConfigError
from sae.io.atomic import staged_directory, write_json
from sae.lm.text import cut_contexts, heldout_start, is_text, separators, token_ids

FORMAT = "sae-token-store/1"
TOKENS, OFFSETS, INDEX = "tokens.bin", "offsets.npy", "index.json"
HELDOUT_SEED = 0  # the held-out documents' draw order: fixed, so training and evaluate.py draw the same contexts
IDS = "ids"
HELDOUT_BATCH = 64  # held-out documents tokenized at a time while drawing
DOCS_PER_PROC = 1000  # fewer documents than this per process are tokenized by fewer processes (start-up costs)

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``<the Hugging Face datasets cache>/sae-token-store`` (``HF_DATASETS_CACHE``, ``HF_HOME``)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "sae-token-store"


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    """uint16 when every id fits (Pythia's 50k vocabulary), uint32 otherwise."""
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The tokenizer's class and a hash of everything that decides its ids (a fast tokenizer's full serialisation;
    a slow one's vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "separators": list(separators(tokenizer))}


def data_fingerprint(text, rows) -> dict:
    """What the documents are: the settings that name them and the files they came from (name, size, mtime)."""
    files = rows.cache_files if text.source == "hub" else [{"filename": f} for f in _files(text.path)]
    stats = [[f["filename"], os.stat(f["filename"]).st_size, os.stat(f["filename"]).st_mtime_ns] for f in files]
    return {"source": text.source, "path": text.path, "split": text.split, "text_column": text.text_column,
            "rows": len(rows), "files": stats}


def _files(path: str) -> list[str]:
    from sae.lm.text import _resolve_files

    return _resolve_files(path)[1]


class PackedContexts:
    """``[n, context_length]`` contexts cut from a 1-D token stream on demand (``contexts[indices]`` gives a long
    tensor), so only the contexts read are ever in memory; ``material`` identifies them (for the activation
    cache's key) without reading them all."""

    def __init__(self, stream: np.ndarray, bos: int, context_length: int, material: dict):
        from sae.lm.text import check_context_fits

        self.stream, self.bos, self.context_length = stream, bos, context_length
        self.n = check_context_fits(len(stream), context_length)
        self.material = {**material, "context_length": context_length, "contexts": self.n}

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.n, self.context_length])

    def __getitem__(self, indices) -> torch.Tensor:
        if isinstance(indices, tuple):  # contexts[rows, positions]
            return self[indices[0]][(slice(None), *indices[1:])]
        body = self.context_length - 1
        if isinstance(indices, slice):
            start, stop, step = indices.indices(self.n)
            if step == 1:
                window = torch.from_numpy(np.asarray(self.stream[start * body : max(start, stop) * body], np.int64))
                return cut_contexts(window, self.bos, self.context_length) if stop > start else self._empty()
            indices = range(start, stop, step)
        rows = torch.as_tensor(indices, dtype=torch.long).reshape(-1).numpy()
        if len(rows) == 0:
            return self._empty()
        if rows.min() < -self.n or rows.max() >= self.n:
            raise IndexError(f"context index out of range for {self.n} contexts")
        rows = rows % self.n
        positions = rows[:, None] * body + np.arange(body)[None, :]
        ids = torch.from_numpy(np.asarray(self.stream[positions.reshape(-1)], np.int64)).view(len(rows), body)
        return torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), ids], dim=1)

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.context_length, dtype=torch.long)


@dataclass(frozen=True)
class TokenStore:
    """A finished store: the training stream (memory-mapped), document offsets and the index."""

    directory: Path
    index: dict

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.directory / TOKENS, dtype=self.index["dtype"], mode="r", shape=(self.index["tokens"],))

    @property
    def offsets(self) -> np.ndarray:
        return np.load(self.directory / OFFSETS, mmap_mode="r")

    def contexts(self, tokenizer: PreTrainedTokenizerBase, context_length: int) -> PackedContexts:
        return PackedContexts(self.tokens, separators(tokenizer)[0], context_length, {"token_store": self.index["key"]})


def store_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def open_store(root: Path, key: str) -> TokenStore | None:
    """The finished store of ``key`` under ``root``, or None (absent or unfinished: no ``index.json``)."""
    directory = Path(root) / key[:16]
    try:
        index = json.loads((directory / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return TokenStore(directory, index) if index.get("key") == key else None


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, column: str) -> dict:
    return {IDS: token_ids([t for t in batch[column] if is_text(t)], tokenizer)}


def build_store(root: Path, key: str, material: dict, train_rows, tokenizer: PreTrainedTokenizerBase, column: str,
                procs: int) -> TokenStore:
    """Tokenize ``train_rows`` (``procs`` processes at most, batched, with a progress bar) into a new store, written
    under a temporary name and renamed into place (a concurrent builder's finished copy wins)."""
    import datasets

    dtype = token_dtype(tokenizer)
    procs = min(procs, max(1, len(train_rows) // DOCS_PER_PROC))
    final = Path(root) / key[:16]
    with staged_directory(final, INDEX) as tmp:
        mapped = train_rows.map(
            _tokenize_batch, fn_kwargs={"tokenizer": tokenizer, "column": column}, batched=True, batch_size=1000,
            num_proc=procs if procs > 1 else None, remove_columns=train_rows.column_names, writer_batch_size=1000,
            features=datasets.Features({IDS: datasets.Sequence(datasets.Value(dtype.name))}),
            cache_file_name=str(tmp / "tokenized.arrow"), desc=f"tokenizing {len(train_rows):,} documents",
        )
        lengths = _write_stream(mapped, tmp / TOKENS, dtype)
        del mapped
        for leftover in tmp.glob("tokenized*.arrow"):
            leftover.unlink()
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        np.save(tmp / OFFSETS, offsets)
        index = {"key": key, "format": FORMAT, "material": material, "dtype": dtype.name, "tokens": int(offsets[-1]),
                 "documents": len(lengths)}
        write_json(tmp / INDEX, index)  # last: its presence marks a finished store
    return open_store(root, key)


def _write_stream(mapped, path: Path, dtype: np.dtype) -> np.ndarray:
    """Append every row's ids to ``path`` in order, one record batch at a time, read from the tokenized files
    rather than memory-mapped (mapped pages would count in this process's resident memory); the lengths."""
    import pyarrow as pa

    lengths = []
    with open(path, "wb") as out:
        for cache in mapped.cache_files:
            with pa.OSFile(cache["filename"]) as source:
                for batch in pa.ipc.open_stream(source):
                    ids = batch.column(IDS)
                    out.write(ids.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).tobytes())
                    lengths.append(ids.value_lengths().to_numpy(zero_copy_only=False))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def open_or_build(text, rows, tokenizer: PreTrainedTokenizerBase, root: Path | None, procs: int | None) -> TokenStore:
    """The store of ``rows``' training documents under ``text``'s settings: opened when a finished one has the
    key, built (and logged with its tokens per second) otherwise."""
    import time

    if procs is not None and procs < 1:
        raise ConfigError(f"data.tokenize_procs={procs} must be at least 1 (or null: the usable CPUs, at most 8)")
    root = Path(root) if root else default_root()
    material = {"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(text, rows),
                "heldout_fraction": text.heldout_fraction}
    key = store_key(material)
    store = open_store(root, key)
    if store is not None:
        log.info("token store: reading %s tokens from %s", f"{store.index['tokens']:,}", store.directory)
        return store
    start = time.perf_counter()
    try:
        train = rows.select(range(heldout_start(len(rows), text.heldout_fraction)))
    except ConfigError:  # too few rows to split (so few that reading them all is cheap): say if none holds text
        _check_text(rows[text.text_column], text)
        raise
    store = build_store(root, key, material, train, tokenizer, text.text_column, procs or default_procs())
    if store.index["documents"] == 0:
        _check_text([], text)
    seconds = time.perf_counter() - start
    log.info("token store: tokenized %s tokens in %.1f s (%s tokens/s) into %s", f"{store.index['tokens']:,}", seconds,
             f"{store.index['tokens'] / max(seconds, 1e-9):,.0f}", store.directory)
    return store


def _check_text(texts, text) -> None:
    if not any(is_text(t) for t in texts):
        raise ConfigError(f"data.path '{text.path}' holds no text in column '{text.text_column}'")


def default_procs() -> int:
    """Tokenizing processes when ``data.tokenize_procs`` is null: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def heldout_contexts(rows, text, tokenizer: PreTrainedTokenizerBase, n_contexts: int) -> torch.Tensor | None:
    """Up to ``n_contexts`` held-out contexts, drawn across the held-out documents: the documents (the last
    ``heldout_fraction`` of the rows) are taken in a fixed random order (``HELDOUT_SEED``) and tokenized a batch at
    a time only until ``n_contexts`` contexts are filled, then packed in that order. The order is fixed, so
    training's final metrics and ``evaluate.py`` read the same contexts. None when nothing is held out."""
    start = heldout_start(len(rows), text.heldout_fraction)
    if start == len(rows):
        return None
    order = start + np.random.default_rng(HELDOUT_SEED).permutation(len(rows) - start)
    needed, body, parts = n_contexts * (text.context_length - 1), text.context_length - 1, []
    for chunk in np.array_split(order, max(1, len(order) // HELDOUT_BATCH)):
        docs = [t for t in rows.select(chunk.tolist())[text.text_column] if is_text(t)]
        parts.extend(t for doc in token_ids(docs, tokenizer) for t in doc)
        if len(parts) >= needed:
            break
    stream = torch.tensor(parts[: max(needed, body)], dtype=torch.long)
    return cut_contexts(stream, separators(tokenizer)[0], text.context_length)[:n_contexts]
