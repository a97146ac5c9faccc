"""Per-feature statistics kept while streaming over held-out text, in memory that grows with the features and the
examples kept per feature, never with the tokens read: a running top-k (merge each batch's candidates into it) and
the activation mass per (token id, feature) as sparse counts.

Entries are triplets (feature, key, index): ``index`` is a global position, increasing from one batch to the next.
"""

from __future__ import annotations

import torch


def rank_in_group(sorted_groups: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its run of equal values in the sorted ``sorted_groups`` (0 for the first of a run)."""
    first = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    return torch.arange(len(sorted_groups)) - first


def order_by(feature: torch.Tensor, key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The permutation sorting entries by feature, then key (largest first), then index (smallest first)."""
    order = index.argsort(stable=True)
    order = order[key[order].argsort(descending=True, stable=True)]
    return order[feature[order].argsort(stable=True)]


class RunningTopK:
    """Per feature, the ``k`` entries of largest ``key`` seen so far (ties: the smaller ``index``), each with a
    ``value``; exactly the top k of all entries ever added, whatever the batches."""

    def __init__(self, n_features: int, k: int):
        self.n_features, self.k = n_features, k
        self.feature = torch.empty(0, dtype=torch.long)
        self.key, self.value = torch.empty(0), torch.empty(0)
        self.index = torch.empty(0, dtype=torch.long)
        self.threshold = torch.full((n_features,), -torch.inf)  # a full feature's k-th key: a new entry must beat it

    def add(self, feature: torch.Tensor, key: torch.Tensor, index: torch.Tensor, value: torch.Tensor | None = None):
        """Merge a batch's entries (``index`` above every index added before)."""
        value = key if value is None else value
        beats = key > self.threshold[feature]  # equal to a full feature's k-th: loses on its later index
        feature = torch.cat([self.feature, feature[beats]])
        key, value = torch.cat([self.key, key[beats]]), torch.cat([self.value, value[beats]])
        index = torch.cat([self.index, index[beats]])
        order = order_by(feature, key, index)
        keep = order[rank_in_group(feature[order]) < self.k]
        self.feature, self.key, self.value, self.index = feature[keep], key[keep], value[keep], index[keep]
        self._set_threshold()

    def _set_threshold(self) -> None:
        counts = torch.bincount(self.feature, minlength=self.n_features)
        ends = counts.cumsum(0) - 1
        full = counts >= self.k
        self.threshold = torch.full((self.n_features,), -torch.inf, dtype=self.key.dtype)
        self.threshold[full] = self.key[ends[full]]

    def of(self, f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature ``f``'s (key, value, index), largest key first."""
        lo, hi = torch.searchsorted(self.feature, torch.tensor([f, f + 1])).tolist()
        return self.key[lo:hi], self.value[lo:hi], self.index[lo:hi]


class TokenMass:
    """Each feature's summed activation per token id, kept sparse: one entry per (token id, feature) that ever
    fired, so at most the vocabulary x the features, whatever the number of tokens read. New entries wait in a list
    until they are as many as the stored pairs (at least ``min_flush``), then are summed in: at most twice the
    pairs' memory, and each entry sorted a bounded number of times on average."""

    def __init__(self, n_features: int, min_flush: int = 1 << 16):
        self.n_features, self.min_flush = n_features, min_flush
        self.keys, self.mass = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0

    def add(self, feature: torch.Tensor, token: torch.Tensor, value: torch.Tensor) -> None:
        self.pending.append((token * self.n_features + feature, value.double()))
        self.n_pending += len(feature)
        if self.n_pending >= max(self.min_flush, len(self.keys)):
            self._coalesce()

    def _coalesce(self) -> None:
        keys = torch.cat([self.keys, *(k for k, _ in self.pending)])
        mass = torch.cat([self.mass, *(m for _, m in self.pending)])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.mass = torch.zeros(len(self.keys), dtype=torch.float64).index_add_(0, inverse, mass)
        self.pending, self.n_pending = [], 0

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature, token, mass) of every pair that fired, sorted by token id then feature."""
        self._coalesce()
        return self.keys % self.n_features, self.keys // self.n_features, self.mass
