"""Fused sets: the dictionaries of a set that share a shape train as one stacked group.

Members of one variant, input width and number of atoms whose ``Dictionary.fuse_key`` agree (the hyperparameters
that set a shape or a code path, e.g. TopK's ``k``) form a group whatever their hooks. A group's step stacks the
members' inputs (``[G, batch, d_in]``) and parameters (``[G, ...]``, ``sae.dictionaries.base.stacked``) and runs the
variant's ``stacked_train_terms``: one batched product per product of the step, and one loss and backward for the
group, so the step costs a few large kernels instead of ``G`` times many small ones. Scalar hyperparameters
(``l1_coeff``, ``aux_coeff``) are per-member ``[G]`` tensors.

Exactness: a dictionary's own ``train_terms`` is its variant's ``stacked_train_terms`` for a group of one, each
member's loss touches only its slice of the stacks, whose backward hands each member's parameter its own gradient,
the bias gradients are summed member by member (``sae.dictionaries.base.plus_rows``), and the parameters stay
stored per member (one fused Adam over all of them, as before), so a member trains to the weights it gets alone
(bitwise in one thread; with several threads, or on a GPU, a batched product may split its sums otherwise than a
single one: then to float rounding), and saving, checkpoints, resampling and the firing counters do not change.

What fuses: ``relu``, ``relu_tied`` and ``topk`` under ``objective=mse`` (the end-to-end objectives splice each
member into the LM on its own); every other variant trains unfused in a set. To fuse a variant: give it a
``fuse_key`` and a ``stacked_train_terms`` (``sae/dictionaries/relu.py`` is the short example), and make its
``train_terms`` the group of one. ``train.fuse=false`` turns fusing off.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sae.dictionaries import Dictionary
from sae.training.objectives import terms_loss


class Member(Protocol):
    """What a group step needs of a set's member (``sae.training.module.TrainedDictionary``)."""

    dictionary: Dictionary

    def training_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def dead_mask(self) -> torch.Tensor: ...

    def training_loss(self, batch: dict[str, torch.Tensor], sparsity_weight: float) -> tuple[torch.Tensor, dict]: ...

    def step_metrics(self, loss: torch.Tensor, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict: ...


def fusion_groups(dictionaries: list[Dictionary], fuse: bool = True) -> list[list[int]]:
    """The set's members (indices into ``dictionaries``) grouped by variant, width, size and ``fuse_key``, in order of
    first appearance; a member that does not fuse (or every member, when ``fuse`` is false) is a group of one."""
    groups: dict[object, list[int]] = {}
    for i, d in enumerate(dictionaries):
        key = d.fuse_key() if fuse else None
        groups.setdefault(i if key is None else (type(d), d.d_in, d.n_features, key), []).append(i)
    return list(groups.values())


def group_losses(members: list[Member], batch: dict[str, torch.Tensor], sparsity_weight: float) -> list[tuple[torch.Tensor, dict]]:
    """Each member's loss and metrics on ``batch`` (what ``Member.training_loss`` gives alone) from one stacked step."""
    dictionaries = [member.dictionary for member in members]
    x = torch.stack([member.training_input(batch) for member in members])
    dead = torch.stack([member.dead_mask() for member in members])
    losses, out = terms_loss(type(dictionaries[0]).stacked_train_terms(dictionaries, x, dead), x, sparsity_weight)
    return [(losses[g], member.step_metrics(losses[g], {key: value[g] for key, value in out.items()}, x[g]))
            for g, member in enumerate(members)]


def set_losses(members: list[Member], groups: list[list[int]], batch: dict[str, torch.Tensor],
               sparsity_weight: float) -> list[tuple[torch.Tensor, dict]]:
    """Every member's loss and metrics under ``objective=mse``, in the members' order: each group of several in one
    stacked step, a group of one alone."""
    results: list = [None] * len(members)
    for group in groups:
        if len(group) == 1:
            results[group[0]] = members[group[0]].training_loss(batch, sparsity_weight)
            continue
        for i, result in zip(group, group_losses([members[i] for i in group], batch, sparsity_weight)):
            results[i] = result
    return results
