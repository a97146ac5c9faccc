"""LightningDataModule whose batches are live activations of the frozen LM at the configured hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae.activations import Batch, context_batches, shuffled_batches
from sae.cache import CacheSettings, activation_source
from sae.hooks import HookPoint
from sae.model import load_model, load_tokenizer
from sae.text import load_documents, pack_contexts, special_ids, split_heldout


class BatchStream(IterableDataset):
    """An endless iterable dataset of ready-made batches; ``make()`` starts a fresh iterator."""

    def __init__(self, make: Callable[[], Iterator[Batch]]):
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


def stream_loader(make: Callable[[], Iterator[Batch]]) -> DataLoader:
    """A DataLoader over ``BatchStream(make)`` that adds no batching and no workers."""
    return DataLoader(BatchStream(make), batch_size=None, num_workers=0)


class ActivationDataModule(pl.LightningDataModule):
    """Tokenized, packed text split into training and held-out contexts; training batches are shuffled activations.

    The LM is loaded in ``setup`` onto the trainer's device, so LM and dictionary share the accelerator. With a
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
        super().__init__()
        self.model_name, self.model_dtype, self.hooks = model_name, model_dtype, hooks
        self.source, self.path, self.text_column, self.split = source, path, text_column, split
        self.context_length, self.heldout_fraction = context_length, heldout_fraction
        self.lm_batch_size, self.buffer_size, self.batch_size, self.seed = lm_batch_size, buffer_size, batch_size, seed
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
        self.prepare_text()
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

    def activations(self, seed: int, epochs: int | None = None) -> Iterator[Batch]:
        """Unshuffled activations of the training contexts, in a context order drawn from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        indices = context_batches(torch.arange(len(self.train_contexts)), self.lm_batch_size, gen, epochs)
        return map(self.activations_of, indices)

    def sample(self, n: int) -> Batch:
        """About ``n`` training activations per hook (for initialising normalisation), from a separate stream."""
        chunks, rows = [], 0
        for chunk in self.activations(self.seed + 1, epochs=1):
            chunks.append(chunk)
            rows += len(next(iter(chunk.values())))
            if rows >= n:
                break
        return {k: torch.cat([c[k] for c in chunks])[:n] for k in chunks[0]}

    def train_batches(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed)
        return shuffled_batches(self.activations(self.seed), self.buffer_size, self.batch_size, gen)

    def train_dataloader(self) -> DataLoader:
        return stream_loader(self.train_batches)
