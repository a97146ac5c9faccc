"""The training objective from a variant's ``train_terms``: the bridge from the terms to the older ``loss`` dict.

A variant that defines ``train_terms(x, dead) -> {"x_hat", "codes", "sparsity", "aux"}`` (normalised units:
``x_hat`` the reconstruction with gradient, ``codes`` the detached dense codes for firing counts, ``sparsity`` its
penalty already times its coefficient, ``aux`` any auxiliary term) gets ``loss`` from this mixin, so a trainer that
still calls ``loss`` and one that calls ``train_terms`` train it alike. Kept apart from ``base`` so it can go once
every trainer calls ``train_terms``.
"""

from __future__ import annotations

import torch

TERMS = ("x_hat", "codes", "sparsity", "aux")


def objective(terms: dict[str, torch.Tensor], x: torch.Tensor, sparsity_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``mse`` = batch mean of ``||x_hat - x||^2`` summed over dimensions; ``loss = mse + w * sparsity + aux``."""
    mse = (terms["x_hat"] - x).pow(2).sum(-1).mean()
    return {**terms, "mse": mse, "loss": mse + sparsity_weight * terms["sparsity"] + terms["aux"]}


class LossFromTerms:
    """Mixin (list it before the ``Dictionary`` base): ``loss`` as ``objective`` of the variant's ``train_terms``."""

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return objective(self.train_terms(x, dead), x)
