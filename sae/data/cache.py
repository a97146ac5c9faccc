"""An on-disk cache of a hook's activations over the training contexts a run reads (``stream.cache_dir``).

One directory per hook and key, ``<cache_dir>/<hook>-<key[:16]>/``: ``contexts.npy`` (the sorted indices of the
training contexts stored: those the run will read, planned by ``sae.data.datamodule`` from ``train.tokens``, or
all of them), ``shard-00000.npy``, ... (memory-mapped ``[rows, context_length, width]`` arrays of every position of
those contexts, in that order, ``SHARD_BYTES`` at most each; float16, bfloat16 (stored as its int16 bits) or
float32) and ``meta.json``. So a batch of stored context indices reads exactly the activations a live forward over
those contexts would give (masked the same way afterwards); ``holds`` says whether a batch is stored.

The key is the SHA-256 of everything the activations depend on (``key_material``): the model (name, a fingerprint
of its files, its dtype, the transformers version), the hook, the text settings, the training contexts themselves
(the token store's key and the context length, which pin the data files, tokenizer and split exactly; or a hash of
contexts held in memory), which of them are stored, the cache dtype and the format version. A cache is written into
a temporary directory, ``meta.json`` last, then renamed into place, so a directory without ``meta.json`` (or with
another key) is never read. Under DDP rank 0 writes it while the others wait (``sae.distributed.lead_first``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.io.atomic import staged_directory, write_json
from sae.io.checkpoints import sha256_of
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_batches

FORMAT = "sae-activation-cache/2"
STORED, META = "contexts.npy", "meta.json"
SHARD_BYTES = 1 << 30  # each shard file holds at most this much (a few contexts more for very wide hooks)
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STORED_AS = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}  # bfloat16: its bits, as int16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    """Where caches live, how they are stored, and what produced the activations (beyond hook and tokens)."""

    root: Path
    dtype: str
    model_name: str
    model_dtype: str
    data: dict  # source, path, split, text_column, context_length, heldout_fraction


def model_fingerprint(name_or_path: str) -> dict:
    """The model's directory (local, or its hub snapshot, whose name is the resolved commit), every file there by
    name, size and modification time, and the hash of ``config.json``'s content."""
    from transformers.utils import cached_file

    config = Path(cached_file(name_or_path, "config.json"))
    directory = config.parent
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(directory.iterdir()) if f.is_file()]
    revision = directory.name if directory.parent.name == "snapshots" else None
    return {"revision": revision, "files": files, "config_sha256": sha256_of(config)}


def contexts_material(contexts) -> dict:
    """What identifies the training contexts: a token store's contexts say it themselves (no need to read them),
    contexts in memory are hashed."""
    if hasattr(contexts, "material"):
        return contexts.material
    return {
        "shape": list(contexts.shape),
        "sha256": hashlib.sha256(contexts.contiguous().numpy().tobytes()).hexdigest(),
    }


def key_material(settings: CacheSettings, hook: HookPoint, contexts, fingerprint: dict,
                 stored: torch.Tensor | None = None) -> dict:
    """Everything the cached activations of ``hook`` over the ``stored`` contexts (default: all) depend on."""
    import transformers

    stored = _all(contexts) if stored is None else stored
    return {
        "format": FORMAT,
        "model": {"name_or_path": settings.model_name, "dtype": settings.model_dtype, "fingerprint": fingerprint},
        "transformers": transformers.__version__,
        "hook": {"layer": hook.layer, "site": hook.site},
        "data": settings.data,
        "tokens": contexts_material(contexts),
        "stored": {"count": len(stored), "sha256": hashlib.sha256(stored.long().numpy().tobytes()).hexdigest()},
        "cache_dtype": settings.dtype,
    }


def _all(contexts) -> torch.Tensor:
    return torch.arange(len(contexts))


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_directory(root: Path, hook: HookPoint, key: str) -> Path:
    return Path(root) / f"{hook.name}-{key[:16]}"


class ActivationCache:
    """A finished cache: ``holds(indices)`` says whether those training contexts are stored, ``read(indices)``
    gives their activations."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta
        self.stored = np.load(directory / STORED)
        self.shards = [np.load(directory / name, mmap_mode="r") for name in meta["shards"]]
        self.rows_per_shard = meta["rows_per_shard"]
        if len(self.stored) != sum(len(s) for s in self.shards):
            raise ValueError(f"{directory}: {len(self.stored)} contexts listed, the shards hold another number")

    def _rows(self, indices: torch.Tensor) -> np.ndarray:
        wanted = indices.cpu().numpy()
        rows = np.searchsorted(self.stored, wanted)
        rows[rows == len(self.stored)] = 0
        return np.where(self.stored[rows] == wanted, rows, -1) if len(self.stored) else np.full(len(wanted), -1)

    def holds(self, indices: torch.Tensor) -> bool:
        """Whether every context of ``indices`` is stored."""
        return bool((self._rows(indices) >= 0).all())

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """``[len(indices), context_length, width]`` float32 activations of the stored training contexts
        ``indices`` (a KeyError for one not stored)."""
        rows = self._rows(indices)
        if (rows < 0).any():
            raise KeyError(f"contexts {indices[torch.from_numpy(rows < 0)][:5].tolist()} are not in {self.directory}")
        shard, within = np.divmod(rows, self.rows_per_shard)
        parts = [self.shards[s][within[shard == s]] for s in range(len(self.shards)) if (shard == s).any()]
        flat = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        order = np.argsort(np.argsort(shard, kind="stable"), kind="stable")  # back from shard order to ``indices``'
        out = torch.from_numpy(np.ascontiguousarray(flat[order]))
        if self.meta["material"]["cache_dtype"] == "bfloat16":
            out = out.view(torch.bfloat16)
        return out.float()


class _Subset:
    """The ``stored`` rows of ``contexts``, sliceable as the reader slices a tensor of contexts."""

    def __init__(self, contexts, stored: torch.Tensor):
        self.contexts, self.stored = contexts, stored

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.contexts[self.stored[rows]]


def open_cache(root: Path, hook: HookPoint, key: str) -> ActivationCache | None:
    """The finished cache of ``key``, or None (absent, half-written: no ``meta.json``, or unreadable)."""
    directory = cache_directory(root, hook, key)
    try:
        meta = json.loads((directory / META).read_text())
        return ActivationCache(directory, meta) if meta.get("key") == key else None
    except (OSError, ValueError):
        return None


def _to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    stored = acts.detach().to(CACHE_DTYPES[dtype]).cpu()
    return (stored.view(torch.int16) if dtype == "bfloat16" else stored).numpy()


def build_caches(
    root: Path,
    wanted: dict[HookPoint, dict],
    model: nn.Module,
    contexts,
    stored: torch.Tensor,
    dtype: str,
    batch_size: int = 32,
) -> dict[HookPoint, ActivationCache]:
    """Write the caches of the hooks in ``wanted`` (hook -> key material) over the ``stored`` contexts (sorted
    indices) with one cut-off forward per batch of contexts, and open them."""
    root = Path(root)
    hooks = list(wanted)
    keys = {hook: cache_key(material) for hook, material in wanted.items()}
    with contextlib.ExitStack() as stack:
        tmp = {
            hook: stack.enter_context(staged_directory(cache_directory(root, hook, keys[hook]), META)) for hook in hooks
        }
        writers: dict[HookPoint, _ShardWriter] = {}
        desc = f"writing activation cache ({len(hooks)} hooks, {len(stored):,} contexts)"
        for _, acts in read_batches(model, hooks, _Subset(contexts, stored), batch_size, desc=desc):
            for hook, a in acts.items():
                if hook not in writers:
                    writers[hook] = _ShardWriter(tmp[hook], len(stored), a.shape[1:], dtype)
                writers[hook].append(_to_storage(a, dtype))
        for hook in hooks:
            np.save(tmp[hook] / STORED, stored.long().numpy())
            meta = {"key": keys[hook], "shards": writers[hook].names, "rows_per_shard": writers[hook].rows_per_shard,
                    "shape": [len(stored), *writers[hook].row_shape], "material": wanted[hook]}
            write_json(tmp[hook] / META, meta)  # last: its presence marks a finished cache
    return {hook: open_cache(root, hook, keys[hook]) for hook in hooks}


class _ShardWriter:
    """Rows appended in order into ``shard-00000.npy``, ``shard-00001.npy``, ... of ``rows_per_shard`` each."""

    def __init__(self, directory: Path, total: int, row_shape: tuple, dtype: str):
        self.directory, self.total, self.row_shape, self.dtype = directory, total, tuple(row_shape), dtype
        row_bytes = int(np.prod(self.row_shape)) * np.dtype(_STORED_AS[dtype]).itemsize
        self.rows_per_shard = max(1, SHARD_BYTES // row_bytes)
        self.names: list[str] = []
        self.written, self.array = 0, None

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            within = self.written % self.rows_per_shard
            if within == 0:
                self._open_next()
            take = min(len(rows), self.rows_per_shard - within)
            self.array[within : within + take] = rows[:take]
            self.written, rows = self.written + take, rows[take:]
            if self.written % self.rows_per_shard == 0 or self.written == self.total:
                self.array.flush()

    def _open_next(self) -> None:
        name = f"shard-{len(self.names):05d}.npy"
        rows = min(self.rows_per_shard, self.total - self.written)
        self.array = np.lib.format.open_memmap(
            self.directory / name, "w+", _STORED_AS[self.dtype], (rows, *self.row_shape)
        )
        self.names.append(name)


def prepare_caches(
    settings: CacheSettings, hooks: list[HookPoint], model: nn.Module, contexts, batch_size: int = 32,
    stored: torch.Tensor | None = None,
) -> dict[HookPoint, ActivationCache]:
    """Every hook's cache of the ``stored`` contexts (sorted indices; default: all): opened where a finished one
    has the right key, written (all missing hooks in one pass) otherwise."""
    stored = _all(contexts) if stored is None else stored
    fingerprint = model_fingerprint(settings.model_name)
    wanted = {hook: key_material(settings, hook, contexts, fingerprint, stored) for hook in hooks}
    caches = {hook: open_cache(settings.root, hook, cache_key(material)) for hook, material in wanted.items()}
    missing = {hook: wanted[hook] for hook, cache in caches.items() if cache is None}
    for hook, cache in caches.items():
        if cache is not None:
            log.info("activation cache: reading %s from %s", hook.name, cache.directory)
    if missing:
        caches.update(build_caches(settings.root, missing, model, contexts, stored, settings.dtype, batch_size))
        log.info("activation cache: wrote %s (%d contexts) under %s", ", ".join(h.name for h in missing), len(stored),
                 settings.root)
    return caches
