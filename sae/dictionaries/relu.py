"""ReLU dictionaries with an L1 penalty: ``relu`` (untied encoder) and ``relu_tied`` (the paper's default)."""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries import sparse
from sae.dictionaries.base import Dictionary, encoder_affine, random_atoms, register, unit_rows

SPARSE_BELOW = 1 / 32
"""The codes' density under which a training step on the CPU decodes and backpropagates them as a sparse matrix:
below it the sparse products' ``nnz · d`` work beats the dense ones' ``batch · n_features · d`` despite their lower
speed per operation (``experiments/peer_training_benchmark.py --relu-l0`` measures both sides)."""


class _DenseEncode(torch.autograd.Function):
    """``codes = ReLU(x @ weight.T + bias)``, computed by the caller without gradient, with autograd's gradient to
    ``weight`` and ``bias`` (none to ``x``)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes, x)
        return codes

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, x = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, codes, 0.0)
        grad_weight = grad.T @ x if ctx.needs_input_grad[2] else None
        return None, None, grad_weight, grad.sum(0) if ctx.needs_input_grad[3] else None


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
        self._was_sparse = False  # the last training step's codes were sparse (``train_terms``' buffer only)

    def encoder_weight(self) -> torch.Tensor:
        return self.W_enc

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.encoder_weight()
        # the bias added inside the product and ReLU in place: two fewer passes over [batch, n_features]
        return torch.relu_(torch.addmm(encoder_affine(weight, self.b_enc, self.b_dec), x.reshape(-1, self.d_in),
                                       weight.T)).reshape(*x.shape[:-1], self.n_features)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The base class's terms, computed for the codes' density: an L1-trained dictionary's codes are half dense
        at initialisation and a small fraction of a percent once trained, where the step's four dense products
        (decode, its two gradients, the encoder's weight gradient) are almost all multiplications by zero. On the
        CPU the encoder's product is made first, without gradient; codes denser than ``SPARSE_BELOW`` then take the
        dense step (the same products as autograd's), sparser ones a sparse step whose only dense product is that
        one (``sae.dictionaries.sparse``). The choice depends on this batch alone, so a resumed run repeats it.
        On a GPU, under autocast, or for activations that need a gradient: autograd's dense step."""
        if x.device.type != "cpu" or x.requires_grad or torch.is_autocast_enabled("cpu"):
            return super().train_terms(x, dead)
        weight = self.encoder_weight()
        bias = encoder_affine(weight, self.b_enc, self.b_dec)
        with torch.no_grad():
            # the last step's density picks the buffer, never the result: a sparse step reuses one, a dense one
            # keeps its codes for the backward pass
            shared = self._was_sparse
            pre = sparse.scratch(len(x), self.n_features, x) if shared else x.new_empty(len(x), self.n_features)
            codes = torch.addmm(bias, x, weight.T, out=pre).relu_()
            self._was_sparse = bool(torch.count_nonzero(codes) <= SPARSE_BELOW * codes.numel())
        if not self._was_sparse:
            codes = _DenseEncode.apply(codes.clone() if shared else codes, x, weight, bias)
            return {"x_hat": self.decode_normalised(codes), "codes": codes.detach(),
                    "sparsity": self.sparsity_loss(codes), "aux": x.new_zeros(())}
        codes = codes.to_sparse_csr()
        values = sparse.encode(codes, x, weight, bias)
        crow, col = codes.crow_indices(), codes.col_indices()
        x_hat = sparse.decode(crow, col, values, self.decoder_weight()) + self.b_dec
        return {"x_hat": x_hat, "codes": sparse.csr(crow, col, values.detach(), self.n_features),
                "sparsity": self.l1_coeff * values.sum() / len(x), "aux": x.new_zeros(())}

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
