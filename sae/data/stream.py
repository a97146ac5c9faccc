"""The resumable stream of shuffled training batches.

Training batches come fill by fill: contexts are read in a seeded random order (this process's share of them),
their activations fill a buffer, the buffer is permuted and emptied in whole batches, then filled again. Where the
activations of a set of contexts come from is one function of the context indices (``ReadContexts``): a forward
of the frozen LM (``sae.lm``) or a lookup in the activation cache (``sae.data.cache``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sae.lm.reader import Batch

ReadContexts = Callable[[torch.Tensor], Batch]  # context indices -> activations of their ordinary-text positions


class ContextOrder:
    """This process's share (every ``world_size``-th, from ``rank``) of ``n_contexts`` indices, in a fresh random
    order each epoch, taken a few at a time. Its state restores the exact position."""

    def __init__(self, n_contexts: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n_contexts, self.rank, self.world_size = n_contexts, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = -1
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_start = self.generator.get_state()
        self.order = torch.randperm(self.n_contexts, generator=self.generator)[self.rank :: self.world_size]
        self.epoch, self.position = self.epoch + 1, 0

    def take(self, k: int) -> torch.Tensor:
        """The next (at most) ``k`` indices; a new epoch starts when this one is used up."""
        if self.position >= len(self.order):
            self._new_epoch()
        taken = self.order[self.position : self.position + k]
        self.position += len(taken)
        return taken

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_start"])
        self.epoch = state["epoch"] - 1
        self._new_epoch()
        self.position = state["position"]


class ResumableStream:
    """Batches made fill by fill, whose position can be saved and restored exactly without saving any data.

    A subclass says where a fill starts (``_position``: plain tensors and ints), how to go back there
    (``_restore``), and how to make a fill's batches from there (``_fill``, deterministic given the position).
    The state after a batch is the position where its fill started and how many of its batches were emitted;
    restoring it makes that fill again and skips those.
    """

    def __init__(self):
        self._skip = 0
        self._state = {**self._position(), "emitted": 0}

    def _position(self) -> dict:
        raise NotImplementedError

    def _restore(self, position: dict) -> None:
        raise NotImplementedError

    def _fill(self) -> list[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The state after the last batch this stream yielded."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._restore(state)
        self._skip, self._state = state["emitted"], state

    def __iter__(self) -> Iterator[Batch]:
        while True:
            start = self._position()
            batches = self._fill()
            end = {**self._position(), "emitted": 0}
            for i in range(self._skip, len(batches)):
                self._state = end if i + 1 == len(batches) else {**start, "emitted": i + 1}
                yield batches[i]
            self._skip = 0


class ActivationStream(ResumableStream):
    """Shuffled batches of activations of contexts taken from ``order``, ``contexts_per_read`` at a time.

    Each fill reads contexts until the buffer holds at least ``buffer_size`` rows, permutes them and emits every
    whole batch of ``batch_size`` (the few rows left over are dropped), so rows of one context land in different
    batches. Resuming re-reads at most one buffer.
    """

    def __init__(self, read: ReadContexts, order: ContextOrder, contexts_per_read: int, buffer_size: int,
                 batch_size: int, seed: int):
        if buffer_size < batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least batch_size ({batch_size})")
        self.read, self.order, self.contexts_per_read = read, order, contexts_per_read
        self.buffer_size, self.batch_size = buffer_size, batch_size
        self.shuffle = torch.Generator().manual_seed(seed)
        super().__init__()

    def _position(self) -> dict:
        return {"order": self.order.state_dict(), "shuffle": self.shuffle.get_state()}

    def _restore(self, position: dict) -> None:
        self.order.load_state_dict(position["order"])
        self.shuffle.set_state(position["shuffle"])

    def _fill(self) -> list[Batch]:
        chunks, rows = [], 0
        while rows < self.buffer_size:
            chunks.append(self.read(self.order.take(self.contexts_per_read)))
            rows += len(next(iter(chunks[-1].values())))
        store = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        perm = torch.randperm(rows, generator=self.shuffle).to(next(iter(store.values())).device)
        n, b = rows // self.batch_size, self.batch_size
        return [{k: v[perm[i * b : (i + 1) * b]] for k, v in store.items()} for i in range(n)]
