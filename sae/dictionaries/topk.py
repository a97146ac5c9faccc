"""TopK dictionaries: keep the ``k`` largest pre-activations per input (Gao et al. 2024), no L1 penalty, AuxK."""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, random_atoms, register, unit_rows


def keep_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of each row (after ReLU)."""
    values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


@register
class TopKDictionary(Dictionary):
    """codes = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); x_hat = W_dec^T codes + b_dec.

    AuxK: dead features (as the trainer reports them) reconstruct the residual error through their own top
    ``k_aux`` pre-activations; that error, divided by the residual's variance and weighted by ``aux_coeff``,
    is the ``aux`` loss, so dead features get gradient and come back.
    """

    variant = "topk"

    def __init__(self, d_in: int, n_features: int, k: int = 32, aux_coeff: float = 1 / 32, k_aux: int | None = None):
        super().__init__(d_in, n_features)
        self.k, self.aux_coeff = k, aux_coeff
        self.k_aux = k_aux if k_aux is not None else max(1, d_in // 2)
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(self.pre_activations(x), self.k)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pre = self.pre_activations(x)
        codes = keep_topk(pre, self.k)
        x_hat = self.decode_normalised(codes)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        aux = self._aux_loss(pre, x - x_hat.detach(), dead)
        zero = x.new_zeros(())
        return {"loss": mse + aux, "mse": mse, "sparsity": zero, "aux": aux, "codes": codes, "x_hat": x_hat}

    def _aux_loss(self, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        if dead is None or self.aux_coeff == 0 or not dead.any():
            return pre.new_zeros(())
        k_aux = min(self.k_aux, int(dead.sum()))
        aux_codes = keep_topk(pre.masked_fill(~dead, float("-inf")), k_aux)
        residual_hat = aux_codes @ self.decoder_weight()
        variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.aux_coeff * (residual_hat - residual).pow(2).sum() / variance

    def hparams(self) -> dict:
        return {"k": self.k, "aux_coeff": self.aux_coeff, "k_aux": self.k_aux}
