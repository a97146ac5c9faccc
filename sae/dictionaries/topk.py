"""TopK dictionaries: keep the ``k`` largest pre-activations per input (Gao et al. 2024), no L1 penalty."""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, random_atoms, register, unit_rows


@register
class TopKDictionary(Dictionary):
    """codes = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); x_hat = W_dec^T codes + b_dec."""

    variant = "topk"

    def __init__(self, d_in: int, n_features: int, k: int = 32):
        super().__init__(d_in, n_features)
        self.k = k
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def hparams(self) -> dict:
        return {"k": self.k}
