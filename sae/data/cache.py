"""An on-disk cache of a hook's activations over the training contexts (``data.cache_dir``).

One directory per hook and key, ``<cache_dir>/<hook>-<key[:16]>/``: ``activations.npy`` (a memory-mapped
``[n_contexts, context_length, width]`` array, every position of every packed training context in context-index
order, float16, bfloat16 (stored as its int16 bits) or float32) and ``meta.json``. So a batch of context indices
reads exactly the activations a live forward over those contexts would give (masked the same way afterwards).

The key is the SHA-256 of everything the activations depend on (``key_material``): the model (name, a fingerprint
of its files, its dtype, the transformers version), the hook, the text settings and the token ids of the training
contexts themselves (which pins the data files, tokenizer, split and context length exactly), the cache dtype and
the format version. A cache is written into a temporary directory, ``meta.json`` last, then renamed into place, so a
directory without ``meta.json`` (or with another key) is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.io.atomic import publish_directory, write_json
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_batches

FORMAT = "sae-activation-cache/1"
ARRAY, META = "activations.npy", "meta.json"
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


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_fingerprint(name_or_path: str) -> dict:
    """The model's directory (local, or its hub snapshot, whose name is the resolved commit), every file there by
    name, size and modification time, and the hash of ``config.json``'s content."""
    from transformers.utils import cached_file

    config = Path(cached_file(name_or_path, "config.json"))
    directory = config.parent
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(directory.iterdir()) if f.is_file()]
    revision = directory.name if directory.parent.name == "snapshots" else None
    return {"revision": revision, "files": files, "config_sha256": _sha256_file(config)}


def key_material(settings: CacheSettings, hook: HookPoint, contexts: torch.Tensor, fingerprint: dict) -> dict:
    """Everything the cached activations of ``hook`` over ``contexts`` depend on."""
    import transformers

    tokens = hashlib.sha256(contexts.contiguous().numpy().tobytes()).hexdigest()
    return {
        "format": FORMAT,
        "model": {"name_or_path": settings.model_name, "dtype": settings.model_dtype, "fingerprint": fingerprint},
        "transformers": transformers.__version__,
        "hook": {"layer": hook.layer, "site": hook.site},
        "data": settings.data,
        "tokens": {"shape": list(contexts.shape), "sha256": tokens},
        "cache_dtype": settings.dtype,
    }


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_directory(root: Path, hook: HookPoint, key: str) -> Path:
    return Path(root) / f"{hook.name}-{key[:16]}"


class ActivationCache:
    """A finished cache: ``read(indices)`` gives the activations of those training contexts."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta
        self.array = np.load(directory / ARRAY, mmap_mode="r")
        if list(self.array.shape) != meta["shape"]:
            raise ValueError(f"{directory / ARRAY} has shape {self.array.shape}, meta.json says {meta['shape']}")

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """``[len(indices), context_length, width]`` float32 activations of the training contexts ``indices``."""
        rows = torch.from_numpy(np.ascontiguousarray(self.array[indices.cpu().numpy()]))
        if self.meta["material"]["cache_dtype"] == "bfloat16":
            rows = rows.view(torch.bfloat16)
        return rows.float()


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
    contexts: torch.Tensor,
    dtype: str,
    batch_size: int = 32,
) -> dict[HookPoint, ActivationCache]:
    """Write the caches of the hooks in ``wanted`` (hook -> key material) with one cut-off forward per batch of
    contexts, and open them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hooks = list(wanted)
    keys = {hook: cache_key(material) for hook, material in wanted.items()}
    tmp = {hook: root / f".tmp-{hook.name}-{keys[hook][:16]}-{uuid.uuid4().hex[:8]}" for hook in hooks}
    arrays: dict[HookPoint, np.ndarray] = {}
    try:
        batches = read_batches(model, hooks, contexts, batch_size, desc=f"writing activation cache ({len(hooks)} hooks)")
        for start, (_, acts) in zip(range(0, len(contexts), batch_size), batches):
            for hook, a in acts.items():
                if hook not in arrays:
                    tmp[hook].mkdir()
                    shape = (len(contexts), contexts.shape[1], a.shape[-1])
                    arrays[hook] = np.lib.format.open_memmap(tmp[hook] / ARRAY, "w+", _STORED_AS[dtype], shape)
                arrays[hook][start : start + len(a)] = _to_storage(a, dtype)
        for hook in hooks:
            arrays[hook].flush()
            meta = {"key": keys[hook], "shape": list(arrays[hook].shape), "material": wanted[hook]}
            write_json(tmp[hook] / META, meta)  # last: its presence marks a finished cache
            final = cache_directory(root, hook, keys[hook])  # a concurrent writer's finished copy wins
            publish_directory(tmp[hook], final, replace=not (final / META).is_file())
    except BaseException:
        for directory in tmp.values():
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return {hook: open_cache(root, hook, keys[hook]) for hook in hooks}


def prepare_caches(
    settings: CacheSettings, hooks: list[HookPoint], model: nn.Module, contexts: torch.Tensor, batch_size: int = 32
) -> dict[HookPoint, ActivationCache]:
    """Every hook's cache: opened where a finished one has the right key, written (all missing hooks in one pass)
    otherwise."""
    fingerprint = model_fingerprint(settings.model_name)
    wanted = {hook: key_material(settings, hook, contexts, fingerprint) for hook in hooks}
    caches = {hook: open_cache(settings.root, hook, cache_key(material)) for hook, material in wanted.items()}
    missing = {hook: wanted[hook] for hook, cache in caches.items() if cache is None}
    for hook, cache in caches.items():
        if cache is not None:
            log.info("activation cache: reading %s from %s", hook.name, cache.directory)
    if missing:
        caches.update(build_caches(settings.root, missing, model, contexts, settings.dtype, batch_size))
        log.info("activation cache: wrote %s under %s", ", ".join(h.name for h in missing), settings.root)
    return caches
