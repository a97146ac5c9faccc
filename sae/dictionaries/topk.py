"""TopK dictionaries: keep the ``k`` largest pre-activations per input (Gao et al. 2024), no L1 penalty, AuxK.

Training (``train_terms``) never forms a dense code matrix with gradient: the codes are ``(values, indices)`` pairs,
decoded with an embedding bag, and both backward passes touch only the ``k`` chosen atoms per input, so the one
dense product of a step is the encoder's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae.dictionaries import sparse
from sae.dictionaries.base import Dictionary, encoder_affine, random_atoms, register, unit_rows
from sae.dictionaries.sparse import scratch


def keep_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest entries of each row (after ReLU)."""
    values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def _rows_of(indices: torch.Tensor) -> torch.Tensor:
    """The ``crow`` of a CSR matrix with ``indices.shape[1]`` entries in each of its ``indices.shape[0]`` rows."""
    batch, k = indices.shape
    return torch.arange(0, batch * k + 1, k, device=indices.device)


def _pattern(indices: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """The sparse CSR ``[batch, n]`` matrix with ``weights[b, j]`` at column ``indices[b, j]`` of row ``b``."""
    return sparse.csr(_rows_of(indices), indices.reshape(-1), weights.reshape(-1), n)


def _scatter_rows(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, d]``: row ``i`` is the sum of ``weights[b, j] * rows[b]`` over every ``(b, j)`` with
    ``indices[b, j] == i`` (``sae.dictionaries.sparse.transpose_product``: ``batch · k · d`` multiply-adds)."""
    return sparse.transpose_product(_rows_of(indices), indices.reshape(-1), weights.reshape(-1), rows, n)


class SparseTopK(torch.autograd.Function):
    """The ``k`` largest of ``ReLU(pre)`` per row as ``(values, indices)``, where ``pre = x @ weight.T + bias``
    was computed by the caller (without gradient); the backward reaches ``x``, ``weight`` and ``bias`` through
    the chosen entries only."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int):
        # ReLU after the selection: the same kept values (ReLU is monotone) without a pass over ``pre``; only
        # which zero-valued entries are "kept" may differ, and those decode to nothing and get no gradient
        values, indices = pre.topk(k, dim=-1, sorted=False)
        indices, order = indices.sort(dim=-1)  # columns in order: the codes are a valid CSR matrix (``codes``)
        values = values.gather(-1, order).clamp_min_(0)
        ctx.save_for_backward(x, weight, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_indices):
        x, weight, indices, values = ctx.saved_tensors
        grad = grad * (values > 0)
        grad_x = (
            F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum") if ctx.needs_input_grad[1] else None
        )
        grad_weight = _scatter_rows(indices, grad, x, len(weight)) if ctx.needs_input_grad[2] else None
        grad_bias = grad.new_zeros(len(weight)).index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return None, grad_x, grad_weight, grad_bias, None


def sparse_topk(pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int):
    """``(values, indices)`` of the top ``k`` of ``ReLU(pre)``, ``pre = x @ weight.T + bias`` given detached; the
    indices ascending within each row."""
    return SparseTopK.apply(pre.detach(), x, weight, bias, k)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_j values[:, j] · weight[indices[:, j]]``: ``densify(indices, values) @ weight`` without the dense codes,
    forward and backward in O(batch · k · d) (``sae.dictionaries.sparse.decode``). The indices may come in any order
    within a row; a CSR matrix needs them ascending, so they are sorted here (``sparse_topk``'s already are)."""
    ordered, order = indices.sort(dim=-1)
    return sparse.decode(_rows_of(ordered), ordered.reshape(-1), values.gather(-1, order).reshape(-1), weight)


def densify(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros(len(values), n).scatter_(-1, indices, values)


def sparse_codes(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The detached codes as a sparse CSR ``[batch, n]`` matrix (``indices`` ascending within each row), what
    ``densify`` gives without a pass over ``[batch, n]``."""
    return _pattern(indices, values.detach(), n)


@register
class TopKDictionary(Dictionary):
    """codes = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); x_hat = W_dec^T codes + b_dec.

    AuxK: dead features (as the trainer reports them) reconstruct the residual error through their own top
    ``k_aux`` pre-activations; that error, divided by the residual's variance and weighted by ``aux_coeff``,
    is the ``aux`` loss, so dead features get gradient and come back (``k_aux`` None: ``d_in / 2``). The settings
    have no defaults here: the one default of each is ``conf/sae/topk.yaml``'s.
    """

    variant = "topk"
    # Anthropic's re-seeding: a small encoder row and bias 0 (AuxK trains a re-seeded latent until it competes)
    reseed_encoder_scale, reseed_median_bias = 0.2, False

    def __init__(self, d_in: int, n_features: int, *, k: int, aux_coeff: float, k_aux: int | None):
        super().__init__(d_in, n_features)
        self.k, self.aux_coeff = k, aux_coeff
        self.k_aux = k_aux if k_aux is not None else max(1, d_in // 2)
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc.T + self.encoder_bias()

    def encoder_bias(self) -> torch.Tensor:
        return encoder_affine(self.W_enc, self.b_enc, self.b_dec)

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(self.pre_activations(x), self.k)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        bias, atoms = self.encoder_bias(), self.decoder_weight()
        with torch.no_grad():  # the bias added inside the product: one pass fewer
            pre = torch.addmm(bias, x, self.W_enc.T, out=scratch(len(x), self.n_features, x))
        values, indices = sparse_topk(pre, x, self.W_enc, bias, self.k)
        return self._sparse_terms(pre, x, bias, atoms, values, indices, dead)

    def _sparse_terms(self, pre: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, atoms: torch.Tensor,
                      values: torch.Tensor, indices: torch.Tensor,
                      dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``train_terms`` of the TopK family from its selection (``values`` at ``indices`` per row, ascending): the
        sparse reconstruction, AuxK on its residual (which overwrites ``pre``), the detached codes as a sparse CSR
        matrix (``sae.dictionaries.base.firing``), no sparsity penalty."""
        x_hat = sparse_decode(indices, values, atoms) + self.b_dec
        aux = self._aux_loss(pre, x, bias, atoms, x - x_hat.detach(), dead)
        codes = sparse_codes(indices, values, self.n_features)
        return {"x_hat": x_hat, "codes": codes, "sparsity": x.new_zeros(()), "aux": aux}

    def _aux_loss(self, pre: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, atoms: torch.Tensor,
                  residual: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """AuxK with a fixed ``k_aux`` whatever the number of dead latents, so that no step asks the device how many
        there are (a host synchronisation): the live latents' pre-activations are masked to -inf, so a selected
        live (or non-positive) latent has code 0 and no gradient, and with no dead latent the term is 0 (on the CPU,
        where asking costs nothing, it is then not computed). The live latents are masked in ``pre`` itself."""
        if dead is None or self.aux_coeff == 0 or (dead.device.type == "cpu" and not dead.any()):
            return pre.new_zeros(())
        k_aux = min(self.k_aux, self.n_features)
        values, indices = sparse_topk(pre.masked_fill_(~dead, float("-inf")), x, self.W_enc, bias, k_aux)
        residual_hat = sparse_decode(indices, values, atoms)
        variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        aux = self.aux_coeff * (residual_hat - residual).pow(2).sum() / variance
        return torch.where(dead.any(), aux, aux.new_zeros(()))

    def hparams(self) -> dict:
        return {"k": self.k, "aux_coeff": self.aux_coeff, "k_aux": self.k_aux}
