"""Contexts straight from a streamed dataset (``data.streaming=true``), for corpora too large to download whole.

Nothing is stored: the documents come one by one from ``datasets.load_dataset(..., streaming=True)`` (a hub corpus
or local files), are tokenized a few at a time and packed as the token store packs them (documents joined with EOS,
cut into BOS + ``context_length - 1`` tokens). The length of the stream is unknown, so the held-out documents cannot
be "the last fraction": document ``i`` of the stream is held out when ``floor((i+1)f) > floor(if)`` for
``f = heldout_fraction``, i.e. one document in every ``1/f``, spread evenly from the start (``is_heldout``).
Training reads the other documents in stream order (each DDP rank every ``world_size``-th of them), epoch after
epoch; the evaluation reads held-out documents from the start of the stream until it has enough tokens.

The position is (epoch, the stream index of the first document not wholly used, the tokens of it already used),
so a resumed run skips to the same document (``IterableDataset.skip``: rows are read, not tokenized) and cuts the
same contexts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from sae.errors import ConfigError
from sae.lm.text import check_context_fits, cut_contexts, is_text, separators, token_ids

DOCS_PER_TOKENIZE = 64


def is_heldout(i: int, fraction: float) -> bool:
    """Whether stream document ``i`` is held out (one in every ``1/fraction``, evenly spread)."""
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def _documents(rows, column: str, start: int, keep) -> Iterator[tuple[int, str]]:
    """``(i, text)`` of the stream's documents from index ``start`` on for which ``keep(i)`` holds."""
    for i, row in enumerate(rows.skip(start) if start else rows, start):
        if column not in row:
            raise ConfigError(f"data.text_column '{column}' is not in the stream (columns: {', '.join(row)}); "
                              "set data.text_column to one of them")
        if keep(i) and is_text(row[column]):
            yield i, row[column]


def _tokenized(docs: Iterator[tuple[int, str]], tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[int, list[int]]]:
    """The documents' ids (EOS-terminated), tokenized ``DOCS_PER_TOKENIZE`` at a time."""
    batch: list[tuple[int, str]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == DOCS_PER_TOKENIZE:
            yield from zip([i for i, _ in batch], token_ids([t for _, t in batch], tokenizer))
            batch = []
    if batch:
        yield from zip([i for i, _ in batch], token_ids([t for _, t in batch], tokenizer))


class StreamedContexts:
    """This rank's training contexts in stream order, ``take(k)`` at a time (``[k, context_length]``); its state
    restores the exact position. Used where the token store's ``ContextOrder`` is used otherwise."""

    def __init__(self, rows, text, tokenizer: PreTrainedTokenizerBase, rank: int = 0, world_size: int = 1):
        self.rows, self.text, self.tokenizer, self.rank, self.world_size = rows, text, tokenizer, rank, world_size
        self.bos = separators(tokenizer)[0]
        self.body = text.context_length - 1
        check_context_fits(self.body, text.context_length)  # context_length >= 2
        self._restart(0, 0, 0)

    def _mine(self, i: int) -> bool:
        """A training document (not held out) of this rank: the ``j``-th training document, ``j % world_size ==
        rank``, where ``j = i - (held-out documents before i) = i - floor(i f)``."""
        f = self.text.heldout_fraction
        return not is_heldout(i, f) and (i - math.floor(i * f)) % self.world_size == self.rank

    def _restart(self, epoch: int, doc: int, used: int) -> None:
        self.epoch, self._pending = epoch, deque()
        self._docs = _tokenized(_documents(self.rows, self.text.text_column, doc, self._mine), self.tokenizer)
        self._yielded_any = epoch > 0 or doc > 0
        self._start_doc, self._skip, self._next = doc, used, doc

    def _next_doc(self) -> bool:
        for i, ids in self._docs:
            skip, self._skip = (self._skip, 0) if i == self._start_doc else (0, 0)
            self._pending.append([i, ids, skip])
            self._next = i + 1
            self._yielded_any = True
            return True
        return False

    def _one(self) -> torch.Tensor:
        out: list[int] = []
        while len(out) < self.body:
            if not self._pending and not self._next_doc():
                if not self._yielded_any:
                    raise ConfigError(f"data.path '{self.text.path}' streams no training text for rank {self.rank} "
                                      f"of {self.world_size}")
                self._restart(self.epoch + 1, 0, 0)
                continue
            front = self._pending[0]
            taken = front[1][front[2] : front[2] + self.body - len(out)]
            out.extend(taken)
            front[2] += len(taken)
            if front[2] == len(front[1]):
                self._pending.popleft()
        return torch.tensor([self.bos, *out], dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        """The next ``k`` contexts (a new epoch starts from the first document when the stream ends)."""
        return torch.stack([self._one() for _ in range(k)])

    def state_dict(self) -> dict:
        if self._pending:
            i, _, used = self._pending[0]
            return {"epoch": self.epoch, "doc": i, "used": used}
        return {"epoch": self.epoch, "doc": self._next, "used": 0}  # nothing pending: after the last document read

    def load_state_dict(self, state: dict) -> None:
        self._restart(state["epoch"], state["doc"], state["used"])


def streamed_heldout(rows, text, tokenizer: PreTrainedTokenizerBase, n_contexts: int) -> torch.Tensor:
    """Up to ``n_contexts`` held-out contexts: held-out documents (``is_heldout``) from the start of the stream,
    tokenized only until ``n_contexts`` contexts are filled."""
    bos, body = separators(tokenizer)[0], text.context_length - 1
    parts: list[int] = []
    docs = _documents(rows, text.text_column, 0, lambda i: is_heldout(i, text.heldout_fraction))
    for _, ids in _tokenized(docs, tokenizer):
        parts.extend(ids)
        if len(parts) >= n_contexts * body:
            break
    return cut_contexts(torch.tensor(parts[: n_contexts * body], dtype=torch.long), bos, text.context_length)
