"""Codes as a sparse CSR matrix ``[batch, n_features]`` (``crow``, ``col``, ``values``) in training: decoding them and
the backward passes of the encoder and decoder in O(non-zeros · d) instead of O(batch · n_features · d).

The TopK family's codes are the case of ``k`` non-zeros per row (``sae.dictionaries.topk``); a ReLU dictionary's,
once training has made them sparse, have any number per row (``sae.dictionaries.relu``). Column indices are
ascending within each row, as a CSR matrix requires (cuSPARSE assumes it).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` tensor of ``like``'s dtype, on the CPU the same memory at every call.

    For the ``[batch, n_features]`` pre-activations of a training step, the largest tensor it makes: on the CPU a
    fresh one of that size is a new mapping from the system, and writing it first costs a page fault every 4 KiB
    (at 32,768 features and batch 4,096, 512 MiB: about a sixth of the encoder's product). One buffer per device and
    dtype serves every dictionary (a set's members take their steps one after the other); it grows to the largest
    size asked and lives as long as the process. Its contents are valid until the next call: the caller must not
    keep it. Elsewhere (a GPU's caching allocator already reuses memory) a fresh tensor."""
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    key = (like.device, like.dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        _SCRATCH.pop(key, None)  # free the smaller one first
        buffer = _SCRATCH[key] = like.new_empty(rows * cols)
    return buffer[: rows * cols].view(rows, cols)


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The ``[len(crow) - 1, n]`` sparse CSR matrix of ``values`` at ``col``, rows delimited by ``crow``."""
    return torch.sparse_csr_tensor(crow, col, values, (len(crow) - 1, n), check_invariants=False)


def transpose_product(crow: torch.Tensor, col: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                      n: int) -> torch.Tensor:
    """``[n, d]``: ``csr(crow, col, weights, n).T @ rows`` (row ``i`` sums ``weights[e] · rows[b]`` over the entries
    ``e`` of row ``b`` at column ``i``).

    The transposed matrix is built directly as a CSR matrix ``[n, batch]`` (entries sorted by column, then by row:
    a stable sort, so its own columns are sorted within each row) and multiplied with ``rows``: ``nnz · d``
    multiply-adds, without the COO matrix's coalescing sort and copies."""
    order = col.argsort(stable=True)
    counts = torch.bincount(col, minlength=n)
    crow_t = torch.zeros(n + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(counts, 0, out=crow_t[1:])
    entry_rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff(),
                                         output_size=len(col))
    return torch.sparse.mm(csr(crow_t, entry_rows[order], weights[order], len(rows)), rows)


def sampled_dots(crow: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[nnz]``: ``rows[b] · weight[col[e]]`` for each entry ``e`` of row ``b``: a product sampled at the pattern."""
    pattern = csr(crow, col, rows.new_zeros(len(col)), len(weight))
    return torch.sparse.sampled_addmm(pattern, rows, weight.T).values()


def decode(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``csr(crow, col, values) @ weight`` with gradients to ``values`` and ``weight`` through the non-zeros only."""
    return _Decode.apply(crow, col, values, weight)


def encode(codes: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The values of ``codes = ReLU(x @ weight.T + bias)`` (a detached CSR matrix, computed by the caller) with the
    gradient to ``weight`` and ``bias``: ReLU passes it at the non-zeros alone, so both backward products are sparse.
    ``x`` (the activations) gets none."""
    return _Encode.apply(codes.crow_indices(), codes.col_indices(), codes.values(), x, weight, bias)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crow, col, values, weight):
        ctx.save_for_backward(crow, col, values, weight)
        return F.embedding_bag(col, weight, crow[:-1], per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        crow, col, values, weight = ctx.saved_tensors
        grad_values = sampled_dots(crow, col, grad, weight) if ctx.needs_input_grad[2] else None
        grad_weight = transpose_product(crow, col, values, grad, len(weight)) if ctx.needs_input_grad[3] else None
        return None, None, grad_values, grad_weight


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crow, col, values, x, weight, bias):
        ctx.save_for_backward(crow, col, x)
        ctx.n = len(weight)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        crow, col, x = ctx.saved_tensors
        grad_weight = transpose_product(crow, col, grad, x, ctx.n) if ctx.needs_input_grad[4] else None
        grad_bias = grad.new_zeros(ctx.n).index_add_(0, col, grad) if ctx.needs_input_grad[5] else None
        return None, None, None, None, grad_weight, grad_bias
