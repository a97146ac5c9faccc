"""The interface every dictionary (and every later decomposition) shares, and the variant registry."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

VARIANTS: dict[str, type[Dictionary]] = {}
CODE_PART_BYTES = 64 * 2**20  # float32 codes ``encode_parts`` holds at once, whatever the dictionary's width


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: make a variant buildable by its ``variant`` name (``sae=<name>`` in the config)."""
    VARIANTS[cls.variant] = cls
    return cls


class Dictionary(nn.Module):
    """A sparse dictionary over ``d_in``-dimensional activations with ``n_features`` unit-norm atoms.

    ``encode``/``decode`` work in the model's own units on ``[..., d_in]`` tensors; inside, activations are
    divided by the scalar ``scale`` (set by ``init_from_data`` so that held-in activations have unit mean squared
    distance from their mean). Training works on normalised activations through ``train_terms``.
    """

    variant: ClassVar[str] = ""
    reseed_encoder_scale: ClassVar[float] = 1.0  # see ``reinit_atoms_``
    reseed_median_bias: ClassVar[bool] = True

    def __init__(self, d_in: int, n_features: int):
        super().__init__()
        self.d_in, self.n_features = d_in, n_features
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))

    # --- what a variant defines -------------------------------------------------------------------------
    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decoder_weight(self) -> torch.Tensor:
        """``[n_features, d_in]`` atoms of unit norm."""
        raise NotImplementedError

    def sparsity_loss(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.new_zeros(())

    def hparams(self) -> dict:
        """Constructor arguments beyond ``d_in`` and ``n_features``, as saved in ``sae.json``."""
        return {}

    @torch.no_grad()
    def normalise_atoms_(self) -> None:
        """Set the stored decoder rows back to unit norm (the trainer calls this after every optimiser step).

        ``decoder_weight`` normalises ``W_dec``'s rows in the forward pass, so the gradient of a row has no
        component along it; but Adam's update is not along the gradient, and every step lengthens the rows a little
        (1.12–1.18× in 3,000 steps), which quietly lowers the learning rate of the directions. Rescaling a row does
        not change the function: for a variant whose atoms are the unit rows of ``W_dec`` this is the reference
        implementations' renormalisation. A variant whose decoder rows carry a norm of their own overrides it."""
        w = getattr(self, "W_dec", None)
        if isinstance(w, nn.Parameter):
            w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def atom_parameters(self) -> list[nn.Parameter]:
        """Parameters with one row per atom (reset together when atoms are resampled)."""
        return [p for p in (getattr(self, n, None) for n in ("W_dec", "W_enc", "b_enc")) if p is not None]

    @torch.no_grad()
    def reinit_atoms_(self, idx: torch.Tensor, directions: torch.Tensor) -> None:
        """Point atoms ``idx`` along ``directions`` (normalised activations) and give them a fresh encoder.

        The decoder row becomes the unit direction, an untied encoder row the same direction at
        ``reseed_encoder_scale`` times the mean norm of the live encoder rows, and the encoder bias the live atoms'
        median (``reseed_median_bias``, so the new atom fires about as selectively as a typical one) or 0. A tied
        encoder row is the unit atom itself.
        """
        unit = unit_rows(directions)
        alive = torch.ones(self.n_features, dtype=torch.bool, device=unit.device)
        alive[idx] = False
        self.W_dec[idx] = unit
        if "W_enc" in self._parameters:
            norm = self.W_enc[alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0)
            self.W_enc[idx] = unit * self.reseed_encoder_scale * norm
        median = self.b_enc[alive].median() if alive.any() else 0.0
        self.b_enc[idx] = median if self.reseed_median_bias else 0.0

    # --- shared -----------------------------------------------------------------------------------------
    def decode_normalised(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.decoder_weight() + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., n_features]`` for activations ``[..., d_in]`` in the model's units."""
        return self.encode_normalised(x / self.scale)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` in the model's units."""
        return self.decode_normalised(codes) * self.scale

    @torch.no_grad()
    def decode_sparse(self, codes: torch.Tensor) -> torch.Tensor:
        """``decode(codes)`` (no gradient) as a sparse product: its cost follows the non-zero codes, not every
        feature (a TopK dictionary's k of its features; the held-out metrics decode this way)."""
        return (torch.sparse.mm(codes.to_sparse_csr(), self.decoder_weight()) + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What training needs of this dictionary on normalised activations ``x`` ``[batch, d_in]``.

        ``x_hat``: the reconstruction (with gradient); ``codes``: the codes (detached, for firing counts: dense, or a
        sparse CSR matrix for the TopK family; ``firing`` reads both);
        ``sparsity``: the variant's penalty with its coefficient (``l1_coeff`` times the batch mean of the codes' L1
        norm for ReLU variants; the trainer ramps it in); ``aux``: an auxiliary term that may use the mask of
        ``dead`` features (AuxK for TopK, else 0). The objective (``sae.training.objectives``) turns these into the
        loss.
        """
        codes = self.encode_normalised(x)
        return {"x_hat": self.decode_normalised(codes), "codes": codes.detach(), "sparsity": self.sparsity_loss(codes),
                "aux": x.new_zeros(())}

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set ``scale`` and ``b_dec`` from a sample ``[n, d_in]`` of raw activations."""
        mean = x.mean(0)
        self.scale.copy_((x - mean).pow(2).sum(-1).mean().sqrt().clamp_min(1e-8))
        self.b_dec.copy_(mean / self.scale)


def firing(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fired, l0)`` of a batch of codes ``[batch, n_features]``, dense or sparse CSR (``train_terms``' codes): how
    many inputs each feature is non-zero on (``[n_features]``, integer) and the mean number of non-zero codes per
    input."""
    if codes.layout == torch.sparse_csr:
        on = codes.values() != 0
        fired = torch.zeros(codes.shape[1], dtype=torch.long, device=codes.device)
        return fired.index_add_(0, codes.col_indices(), on.long()), on.sum(dtype=torch.float32) / codes.shape[0]
    active = codes != 0
    return active.sum(0), active.sum(-1, dtype=torch.float32).mean()


def encoder_affine(weight: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The bias of ``x @ weight.T + bias`` equal to ``(x - b_dec) @ weight.T + b_enc``.

    Folding ``b_dec`` into the bias spares the backward pass a ``[batch, n_features] @ [n_features, d_in]``
    product: the input needs no gradient, and ``b_dec``'s comes from this vector alone.
    """
    return b_enc - weight @ b_dec


class UnitRows(torch.autograd.Function):
    """``w / max(||w||, 1e-8)`` row by row, with autograd's own gradient of that formula computed in three passes
    over ``w``'s shape instead of autograd's chain through the division and the norm (at 32,768 atoms of width 512 the
    chain cost a TopK step more than its sparse decoder did)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        norm = w.norm(dim=-1, keepdim=True)
        unit = w / norm.clamp_min(1e-8)
        ctx.save_for_backward(unit, norm)
        return unit

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        unit, norm = ctx.saved_tensors
        # d(w/|w|) = (g - u (u·g)) / |w|; where the norm is clamped the factor is a constant: g / 1e-8
        along = torch.linalg.vecdot(grad, unit).unsqueeze(-1).masked_fill_(norm < 1e-8, 0)
        return torch.addcmul(grad, unit, along, value=-1).div_(norm.clamp_min(1e-8))


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``w``'s rows scaled to unit norm (rows of norm below 1e-8 divided by 1e-8)."""
    return UnitRows.apply(w)


def random_atoms(n_features: int, d_in: int) -> torch.Tensor:
    return unit_rows(torch.randn(n_features, d_in))


def encode_parts(dictionary: Dictionary, x: torch.Tensor, max_bytes: int | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, codes)`` over parts of ``x``'s first dimension, each part's float32 codes within ``max_bytes``
    (default ``CODE_PART_BYTES``).

    A study encoding a whole LM batch at once holds ``[batch, seq, n_features]`` codes, and the encoder's
    intermediates beside them: at 32,768 features 64 contexts of 128 tokens are 1 GiB each, so the peak grows with
    the width times the batch. Parts keep it at a few times ``max_bytes`` whatever the width."""
    per_row = 4 * dictionary.n_features * math.prod(x.shape[1:-1])
    step = max(1, (max_bytes or CODE_PART_BYTES) // per_row)
    for start in range(0, len(x), step):
        yield start, dictionary.encode(x[start: start + step])
