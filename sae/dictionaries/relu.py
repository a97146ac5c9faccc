"""ReLU dictionaries with an L1 penalty: ``relu`` (untied encoder) and ``relu_tied`` (the paper's default)."""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, encoder_affine, random_atoms, plus_rows, register, scalars, stacked, unit_rows, unstacked


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
        return torch.relu(x @ weight.T + encoder_affine(weight, self.b_enc, self.b_dec))

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def hparams(self) -> dict:
        return {"l1_coeff": self.l1_coeff}

    def fuse_key(self) -> tuple:
        """Any ReLU dictionaries of one width and size fuse: ``l1_coeff`` is a per-member scalar of the group."""
        return ()

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return unstacked(self.stacked_train_terms([self], x.unsqueeze(0), None))

    @classmethod
    def stacked_encoder_weight(cls, dictionaries: list["ReLUDictionary"], atoms: torch.Tensor) -> torch.Tensor:
        return stacked(dictionaries, "W_enc")

    @classmethod
    def stacked_train_terms(cls, dictionaries, x, dead=None):
        """Encode and decode with one batched product each (``bmm``; the biases added by ``plus_rows``). The sparsity term is each member's
        ``l1_coeff`` times the batch mean of the L1 norm: the plain sum, since ReLU codes are never negative (the same
        value and gradient, one pass over the codes fewer each way). ``dead`` is not used (no auxiliary term)."""
        b_dec = stacked(dictionaries, "b_dec")
        atoms = unit_rows(stacked(dictionaries, "W_dec"))
        weight = cls.stacked_encoder_weight(dictionaries, atoms)
        bias = encoder_affine(weight, stacked(dictionaries, "b_enc"), b_dec)
        codes = torch.relu(plus_rows(torch.bmm(x, weight.transpose(1, 2)), bias))
        x_hat = plus_rows(torch.bmm(codes, atoms), b_dec)
        sparsity = scalars(dictionaries, "l1_coeff", x) * codes.sum(-1).mean(-1)
        return {"x_hat": x_hat, "codes": codes.detach(), "sparsity": sparsity, "aux": x.new_zeros(len(x))}


@register
class TiedReLUDictionary(ReLUDictionary):
    """The paper's autoencoder: the encoder is the transpose of the (unit-norm) decoder."""

    variant = "relu_tied"

    def __init__(self, d_in: int, n_features: int, *, l1_coeff: float):
        super().__init__(d_in, n_features, l1_coeff=l1_coeff)
        del self.W_enc

    def encoder_weight(self) -> torch.Tensor:
        return self.decoder_weight()

    @classmethod
    def stacked_encoder_weight(cls, dictionaries, atoms):
        return atoms
