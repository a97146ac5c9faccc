"""LightningDataModules whose training batches come from a resumable stream; the LM one reads live activations.

Resuming is exact: Lightning saves the datamodule's ``state_dict`` in every checkpoint and restores it with
``load_state_dict`` before training resumes. The state is the stream's state after the last batch actually
trained on (the training loop fetches one batch ahead), one entry per process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae.activations import ActivationStream, Batch, ContextOrder, ResumableStream, context_activations
from sae.distributed import gather_objects
from sae.errors import ConfigError
from sae.cache import CacheSettings, activation_source
from sae.hooks import HookPoint
from sae.model import load_model, load_tokenizer
from sae.text import load_documents, pack_contexts, special_ids, split_heldout

SEQ = "_seq"  # key of a batch's sequence number, removed before the batch reaches the module


class _Iterate(IterableDataset):
    """An iterable dataset over ``make()``'s iterator (a fresh one per ``iter``)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


class StreamDataModule(pl.LightningDataModule):
    """Training batches of ``batch_size // world_size`` rows per process from ``make_stream`` (a subclass's),
    resumable exactly through ``state_dict``/``load_state_dict``."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size  # over all processes
        self.rank, self.world_size = 0, 1
        self._resume: dict | None = None
        self._pending: dict[int, dict] = {}
        self._trained: dict | None = None

    def make_stream(self) -> ResumableStream:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by the {self.world_size} processes")

    def _tagged(self) -> Iterator[Batch]:
        stream = self.make_stream()
        if self._resume is not None:
            stream.load_state_dict(self._resume)
        for seq, batch in enumerate(stream):
            self._pending[seq] = stream.state_dict()
            yield {**batch, SEQ: seq}

    def train_dataloader(self) -> DataLoader:
        self._pending, self._trained = {}, None
        return DataLoader(_Iterate(self._tagged), batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Runs when the batch is about to be trained on (not when it was fetched): record the stream's state."""
        if isinstance(batch, dict) and SEQ in batch:
            seq = batch.pop(SEQ)
            self._trained = self._pending.pop(seq)
            self._pending = {k: v for k, v in self._pending.items() if k > seq}
        return batch

    def state_dict(self) -> dict:
        state = self._trained if self._trained is not None else self._resume
        if state is None:
            return {}
        return {"ranks": gather_objects(state)}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.world_size:
            raise ConfigError(
                f"the checkpoint was written by {len(ranks)} training processes, this run has {self.world_size}: "
                f"resume with the same train.devices"
            )
        self._resume = ranks[self.rank]


class ActivationDataModule(StreamDataModule):
    """Tokenized, packed text split into training and held-out contexts; training batches are shuffled activations.

    The LM is loaded in ``setup`` onto the trainer's device, so LM and dictionary share the accelerator. With several
    processes each reads its own share of the contexts into its own buffer of ``buffer_size`` rows. With a
    ``cache_dir``, activations are read from (and first written to) an on-disk cache per hook (``sae.cache``).
    """

    def __init__(
        self,
        model_name: str,
        hooks: list[HookPoint],
        source: str,
        path: str,
        text_column: str = "text",
        split: str = "train",
        context_length: int = 256,
        heldout_fraction: float = 0.1,
        lm_batch_size: int = 32,
        buffer_size: int = 131072,
        batch_size: int = 1024,
        model_dtype: str = "float32",
        seed: int = 0,
        cache_dir: str | None = None,
        cache_dtype: str = "float16",
    ):
        super().__init__(batch_size)
        self.model_name, self.model_dtype, self.hooks = model_name, model_dtype, hooks
        self.source, self.path, self.text_column, self.split = source, path, text_column, split
        self.context_length, self.heldout_fraction = context_length, heldout_fraction
        self.lm_batch_size, self.buffer_size, self.seed = lm_batch_size, buffer_size, seed
        self.cache_dir, self.cache_dtype = cache_dir, cache_dtype
        self.model, self.activations_of = None, None  # activations_of: context indices -> activations

    def prepare_text(self) -> None:
        """Load, split and pack the text (cheap; no model weights). Idempotent."""
        if hasattr(self, "train_contexts"):
            return
        tokenizer = load_tokenizer(self.model_name)
        docs = load_documents(self.source, self.path, self.text_column, self.split)
        text = split_heldout(docs, self.heldout_fraction)
        self.special_ids = special_ids(tokenizer)
        self.train_contexts = pack_contexts(text.train, tokenizer, self.context_length)
        self.heldout_contexts = pack_contexts(text.heldout, tokenizer, self.context_length) if text.heldout else None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.prepare_text()
        if len(self.train_contexts) < self.world_size:
            raise ConfigError(f"{len(self.train_contexts)} training contexts cannot be shared by {self.world_size} "
                              "processes: give more text or fewer train.devices")
        if self.model is None:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            self.model = load_model(self.model_name, self.model_dtype, device)
        if self.activations_of is None:
            self.activations_of = activation_source(self.model, self.hooks, self.train_contexts, self.special_ids,
                                                    self._cache_settings(), self.lm_batch_size)

    def _cache_settings(self) -> CacheSettings | None:
        if self.cache_dir is None:
            return None
        data = {"source": self.source, "path": self.path, "split": self.split, "text_column": self.text_column,
                "context_length": self.context_length, "heldout_fraction": self.heldout_fraction}
        return CacheSettings(Path(self.cache_dir), self.cache_dtype, self.model_name, self.model_dtype, data)

    def read(self, indices: torch.Tensor) -> Batch:
        """Activations of the training contexts ``indices`` (the stream's ``ReadContexts``): a live forward of the
        LM, or the cache."""
        return self.activations_of(indices)

    def sample(self, n: int) -> Batch:
        """About ``n`` training activations per hook (for initialising normalisation), from a separate order of all
        the contexts (the same in every process)."""
        order = torch.randperm(len(self.train_contexts), generator=torch.Generator().manual_seed(self.seed + 1))
        chunks, rows = [], 0
        for indices in order.split(self.lm_batch_size):
            chunks.append(self.read(indices))
            rows += len(next(iter(chunks[-1].values())))
            if rows >= n:
                break
        return {k: torch.cat([c[k] for c in chunks])[:n] for k in chunks[0]}

    def make_stream(self) -> ActivationStream:
        order = ContextOrder(len(self.train_contexts), self.seed, self.rank, self.world_size)
        return ActivationStream(self.read, order, self.lm_batch_size, self.buffer_size,
                                self.batch_size // self.world_size, self.seed)
