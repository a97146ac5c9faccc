"""LightningDataModules whose training batches come from a resumable stream; the LM one reads live activations.

Resuming is exact: Lightning saves the datamodule's ``state_dict`` in every checkpoint and restores it with
``load_state_dict`` before training resumes. The state is the stream's state after the last batch actually
trained on (the training loop fetches one batch ahead), one entry per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae.data.cache import ActivationCache, CacheSettings, prepare_caches
from sae.data.stream import ActivationStream, ContextOrder, ResumableStream
from sae.distributed import gather_objects, lead_first
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import Batch, token_mask
from sae.lm.session import LMSession

log = logging.getLogger(__name__)

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


def share_session(dm: StreamDataModule) -> None:
    """Ready ``dm.session`` for this process: its text ready (the token store built by rank 0 while the others
    wait, then opened by each), enough training contexts for every process to take its share, and the LM on the
    trainer's device (so LM and dictionary share the accelerator)."""
    lead_first(dm.session.prepare_text)
    if not dm.session.text.streaming and len(dm.session.train_contexts) < dm.world_size:
        raise ConfigError(f"{len(dm.session.train_contexts)} training contexts cannot be shared by "
                          f"{dm.world_size} processes: give more text or fewer trainer.devices")
    if dm.trainer is not None:
        dm.session.to(dm.trainer.strategy.root_device)


@dataclass(frozen=True)
class StreamSettings:
    """How activations become training batches (the ``stream`` group; the one default of each: its YAML)."""

    lm_batch_size: int
    """Contexts per LM forward."""
    buffer_size: int
    """Activations shuffled together (per process) before they are cut into batches."""
    cache_dir: str | None
    """A directory: activations are written there by the first run and read by later ones (None: no cache)."""
    cache_dtype: str
    """How cached activations are stored: float16, bfloat16 or float32."""


@dataclass(frozen=True)
class ReadPlan:
    """How much a run reads, so an activation cache stores only that (``ActivationDataModule``)."""

    steps: int
    """Training steps (``train.tokens // train.batch_size``)."""
    init_tokens: int
    """Activations sampled once to initialise the dictionaries (``train.init_tokens``)."""


LOOKAHEAD = 2  # batches the training loop may fetch beyond its last step


class ActivationDataModule(StreamDataModule):
    """Training batches of shuffled activations of a session's training contexts at ``hooks``.

    In ``setup`` the session moves to the trainer's device, so LM and dictionary share the accelerator. With
    several processes each reads its own share of the contexts into its own buffer of ``buffer_size`` rows. With a
    ``cache_dir``, hooks are read from (and first written to, by rank 0 while the others wait) an on-disk cache
    each (``sae.data.cache``) holding the contexts the run will read (``plan``: the ones the stream and the
    initialising sample take in ``plan.steps`` steps, found by running them over token counts alone; all contexts
    without a plan); the LM runs only for the hooks without one (or, should a batch fall outside the plan, for that
    batch). With ``data.streaming`` the contexts come in stream order and there is no cache.
    """

    def __init__(
        self,
        session: LMSession,
        hooks: list[HookPoint],
        stream: StreamSettings,
        batch_size: int,
        seed: int = 0,
        plan: ReadPlan | None = None,
    ):
        super().__init__(batch_size)
        self.session, self.hooks, self.stream, self.seed, self.plan = session, hooks, stream, seed, plan
        self.caches: dict[HookPoint, ActivationCache] | None = None
        self._warned = False

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        share_session(self)
        if self.caches is None:
            settings = self._cache_settings()
            self.caches = lead_first(lambda: prepare_caches(settings, self.hooks, self.session.model,
                                                            self.session.train_contexts, self.stream.lm_batch_size,
                                                            self.planned_contexts())) if settings else {}

    def planned_contexts(self) -> torch.Tensor:
        """The sorted indices of the training contexts the run will read: every process's stream over
        ``plan.steps`` steps (and ``LOOKAHEAD`` batches more) and the initialising sample, found by running them
        with a reader that gives only row counts (no LM); all contexts without a plan."""
        contexts, special = self.session.train_contexts, self.session.special_ids
        if self.plan is None:
            return torch.arange(len(contexts))
        taken: list[torch.Tensor] = []

        def count_rows(indices: torch.Tensor) -> Batch:
            taken.append(indices)
            return {"rows": torch.empty(int(token_mask(contexts[indices], special).sum()), 0)}

        for rank in range(self.world_size):
            stream = self._activation_stream(count_rows, ContextOrder(len(contexts), self.seed, rank, self.world_size))
            for _ in zip(range(self.plan.steps + LOOKAHEAD), stream):
                pass
        self.session.sample([], self.plan.init_tokens, read=count_rows)
        return torch.unique(torch.cat(taken))

    def _cache_settings(self) -> CacheSettings | None:
        if self.stream.cache_dir is None:
            return None
        if self.session.text.streaming:
            raise ConfigError("stream.cache_dir caches contexts by index, which data.streaming=true does not have: "
                              "set stream.cache_dir=null or data.streaming=false")
        s = self.session
        return CacheSettings(Path(self.stream.cache_dir), self.stream.cache_dtype, s.model_name, s.model_dtype,
                             s.text.as_record())

    def read(self, indices: torch.Tensor) -> Batch:
        """Activations of the training contexts ``indices`` at every hook (the stream's ``ReadContexts``): the
        cache where a hook has one, a live forward of the LM for the others."""
        input_ids = self.session.train_contexts[indices]
        cached = {hook: cache for hook, cache in self.caches.items() if cache.holds(indices)}
        if len(cached) < len(self.caches) and not self._warned:
            log.warning("activation cache: contexts outside the planned ones were read live")
            self._warned = True
        live = [hook for hook in self.hooks if hook not in cached]
        batch = self.session.read(live, input_ids) if live else {}
        if cached:
            keep = token_mask(input_ids, self.session.special_ids)
            device = self.session.device
            batch.update({hook.name: cache.read(indices)[keep].to(device) for hook, cache in cached.items()})
        return {hook.name: batch[hook.name] for hook in self.hooks}

    def sample(self, n: int) -> Batch:
        """About ``n`` training activations per hook (for initialising normalisation), from a separate order of all
        the contexts (the same in every process)."""
        return self.session.sample(self.hooks, n, read=None if self.session.text.streaming else self.read)

    def make_stream(self) -> ActivationStream:
        if self.session.text.streaming:
            contexts = self.session.streamed_contexts(self.rank, self.world_size)
            return self._activation_stream(lambda ids: self.session.read(self.hooks, ids), contexts)
        order = ContextOrder(len(self.session.train_contexts), self.seed, self.rank, self.world_size)
        return self._activation_stream(self.read, order)

    def _activation_stream(self, read, order) -> ActivationStream:
        return ActivationStream(read, order, self.stream.lm_batch_size, self.stream.buffer_size,
                                self.batch_size // self.world_size, self.seed)
