"""Batches of token contexts for the end-to-end objectives, resumable exactly like the activation stream.

An end-to-end objective (``objective=kl|kl_mse|e2e_ds``) runs the LM itself on every step, so its batches are
context ids ``{"input_ids": [contexts, context_length]}``, not activations. The contexts come in the same seeded
order as the activation stream's (``ContextOrder``: this process's share, a fresh permutation each epoch), and the
stream's state is the order's position, so a resumed run sees the same contexts in the same batches. There is no
activation cache: the objective needs the LM's forward anyway.
"""

from __future__ import annotations

import torch

from sae.data.datamodule import StreamDataModule, share_session
from sae.data.stream import ContextOrder, ResumableStream
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import Batch
from sae.lm.session import LMSession

INPUT_IDS = "input_ids"


class ContextStream(ResumableStream):
    """Batches of ``per_batch`` contexts of ``contexts`` taken from ``order`` (one batch per fill; a batch may
    straddle two epochs)."""

    def __init__(self, contexts: torch.Tensor, order: ContextOrder, per_batch: int):
        self.contexts, self.order, self.per_batch = contexts, order, per_batch
        super().__init__()

    def _position(self) -> dict:
        return {"order": self.order.state_dict()}

    def _restore(self, position: dict) -> None:
        self.order.load_state_dict(position["order"])

    def _fill(self) -> list[Batch]:
        taken, count = [], 0
        while count < self.per_batch:
            taken.append(self.order.take(self.per_batch - count))
            count += len(taken[-1])
        return [{INPUT_IDS: self.contexts[torch.cat(taken)]}]


class ContextDataModule(StreamDataModule):
    """Training batches of ``train.batch_size // context_length`` contexts of a session's training text (split
    between the processes), and samples of activations at ``hooks`` for initialising the dictionaries.

    ``batch_size`` stays the step's size in tokens (context positions), as for activations, so that the run's
    length (``train.tokens / train.batch_size`` steps) and the firing counts mean the same under every objective.
    """

    def __init__(self, session: LMSession, hooks: list[HookPoint], batch_size: int, seed: int):
        super().__init__(batch_size)
        self.session, self.hooks, self.seed = session, hooks, seed
        self.contexts_per_batch = batch_size // session.text.context_length

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.session.text.streaming:
            raise ConfigError("the end-to-end objectives read contexts by index, which data.streaming=true does not "
                              "have: use objective=mse or data.streaming=false")
        if self.contexts_per_batch < 1 or self.contexts_per_batch % self.world_size:
            raise ConfigError(f"train.batch_size={self.batch_size} gives {self.contexts_per_batch} contexts of "
                              f"{self.session.text.context_length} tokens per step, which {self.world_size} processes "
                              "cannot share: make it a multiple of data.context_length x the processes")
        share_session(self)

    def sample(self, n: int) -> Batch:
        """About ``n`` training activations per hook (the normalisation and decoder bias), as for activations."""
        return self.session.sample(self.hooks, n)

    def make_stream(self) -> ContextStream:
        order = ContextOrder(len(self.session.train_contexts), self.seed, self.rank, self.world_size)
        return ContextStream(self.session.train_contexts, order, self.contexts_per_batch // self.world_size)
