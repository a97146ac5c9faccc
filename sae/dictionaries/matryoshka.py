"""Matryoshka BatchTopK dictionaries (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the dictionary,
each trained to reconstruct the input on its own.

The codes are BatchTopK's (one batch selection over the whole dictionary). Besides the full reconstruction, the
first ``m`` atoms alone reconstruct the input for every prefix size ``m`` in ``prefixes`` (fractions of the
dictionary), using the codes the selection gave them; the objective is the *sum* of the squared errors of every
prefix and the full dictionary, as in the paper, so early atoms must carry the most general features and later
ones refine them instead of absorbing them. The inner prefixes' errors go in ``aux`` (with AuxK), the full one is
the trainer's ``mse``. Inference is BatchTopK's: one global threshold estimated during training
(``sae.dictionaries.batchtopk``).
"""

from __future__ import annotations

import torch

from sae.dictionaries.base import register
from sae.dictionaries.batchtopk import BatchTopKDictionary
from sae.dictionaries.topk import sparse_decode
from sae.errors import ConfigError


def prefix_widths(prefixes: list[float], n_features: int) -> list[int]:
    """The inner prefix sizes (in atoms) for ``prefixes`` given as fractions of ``n_features``; refuses fractions
    outside (0, 1), or ones that are not strictly increasing once rounded to whole atoms."""
    if any(not 0 < f < 1 for f in prefixes):
        raise ConfigError(f"sae.prefixes={list(prefixes)} must be fractions of the dictionary in (0, 1) "
                          "(the whole dictionary is always the last prefix)")
    widths = [max(1, round(f * n_features)) for f in prefixes]
    if any(b <= a for a, b in zip(widths, widths[1:])) or (widths and widths[-1] >= n_features):
        raise ConfigError(f"sae.prefixes={list(prefixes)} give prefix sizes {widths} of {n_features} atoms, which "
                          "must be strictly increasing and below the dictionary size")
    return widths


def prefix_errors(indices: torch.Tensor, values: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor,
                  x: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Σ over ``widths`` m of the batch mean of ``||x - (Σ_{i<m} c_i d_i + b_dec)||^2``: the codes of sparse
    ``(indices, values)`` restricted to the first ``m`` atoms."""
    total = x.new_zeros(())
    for width in widths:
        x_hat = sparse_decode(indices, values * (indices < width), atoms) + b_dec
        total = total + (x_hat - x).pow(2).sum(-1).mean()
    return total


@register
class MatryoshkaDictionary(BatchTopKDictionary):
    """BatchTopK whose prefixes of ``prefixes`` × ``n_features`` atoms each reconstruct the input as well."""

    variant = "matryoshka"

    def __init__(self, d_in: int, n_features: int, *, k: float, aux_coeff: float, k_aux: int | None,
                 threshold_lr: float, prefixes: list[float]):
        prefixes = [float(f) for f in prefixes]  # a plain list: the config may hand over a ListConfig
        widths = prefix_widths(prefixes, n_features)
        super().__init__(d_in, n_features, k=k, aux_coeff=aux_coeff, k_aux=k_aux, threshold_lr=threshold_lr)
        self.prefixes, self.widths = prefixes, widths

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pre, bias, atoms, values, indices = self.select(x)
        terms = self._sparse_terms(pre, x, bias, atoms, values, indices, dead)
        terms["aux"] = terms["aux"] + prefix_errors(indices, values, atoms, self.b_dec, x, self.widths)
        return terms

    def hparams(self) -> dict:
        return {**super().hparams(), "prefixes": self.prefixes}
