"""ReLU dictionaries with an L1 penalty: ``relu`` (untied encoder) and ``relu_tied`` (the paper's default)."""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, encoder_affine, random_atoms, register, unit_rows


@register
class ReLUDictionary(Dictionary):
    """codes = ReLU(W_enc (x - b_dec) + b_enc); x_hat = W_dec^T codes + b_dec, with unit-norm rows of W_dec.

    ``l1_coeff`` has no default here: the one default is ``conf/sae/<variant>.yaml``'s."""

    variant = "relu"

    def __init__(self, d_in: int, n_features: int, *, l1_coeff: float):
        super().__init__(d_in, n_features)
        self.l1_coeff = l1_coeff
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))

    def encoder_weight(self) -> torch.Tensor:
        return self.W_enc

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.encoder_weight()
        # the bias added inside the product and ReLU in place: two fewer passes over [batch, n_features]
        return torch.relu_(torch.addmm(encoder_affine(weight, self.b_enc, self.b_dec), x.reshape(-1, self.d_in),
                                       weight.T)).reshape(*x.shape[:-1], self.n_features)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def sparsity_loss(self, codes: torch.Tensor) -> torch.Tensor:
        """``l1_coeff`` times the batch mean of the L1 norm: the plain sum, since ReLU codes are never negative
        (the same value and gradient, one pass over the codes fewer each way)."""
        return self.l1_coeff * codes.sum(-1).mean()

    def hparams(self) -> dict:
        return {"l1_coeff": self.l1_coeff}


@register
class TiedReLUDictionary(ReLUDictionary):
    """The paper's autoencoder: the encoder is the transpose of the (unit-norm) decoder."""

    variant = "relu_tied"

    def __init__(self, d_in: int, n_features: int, *, l1_coeff: float):
        super().__init__(d_in, n_features, l1_coeff=l1_coeff)
        del self.W_enc

    def encoder_weight(self) -> torch.Tensor:
        return self.decoder_weight()
