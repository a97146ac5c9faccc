"""The shape every baseline shares: a linear basis fitted in closed form, optionally sparsified to the top k codes."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from sae.dictionaries.base import Dictionary, unit_rows

BASELINES: dict[str, type[LinearBasis]] = {}


def register_baseline(cls: type[LinearBasis]) -> type[LinearBasis]:
    """Class decorator: make a baseline fittable by its ``variant`` name (``baselines=[<name>]`` in evaluate)."""
    BASELINES[cls.variant] = cls
    return cls


def top_k_by_magnitude(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` codes of largest magnitude in each row, zero the rest."""
    indices = codes.abs().topk(min(k, codes.shape[-1]), dim=-1, sorted=False).indices
    return torch.zeros_like(codes).scatter_(-1, indices, codes.gather(-1, indices))


class LinearBasis(Dictionary):
    """Atoms ``W_dec`` (unit rows) with the encoder their pseudo-inverse: codes = (x/scale - b_dec) @ W_enc^T.

    With ``k`` set, only the ``k`` codes of largest magnitude are kept (the paper's top-k sparsified baselines).
    A full-rank basis without ``k`` reconstructs exactly. ``fit`` builds one from raw activations ``[n, d_in]``.
    """

    centred: ClassVar[bool] = True  # b_dec is the data mean (False: the basis acts on raw activations)

    def __init__(self, d_in: int, n_features: int, k: int | None = None):
        super().__init__(d_in, n_features)
        self.k = k
        self.register_buffer("W_enc", torch.zeros(n_features, d_in))
        self.register_buffer("W_dec", torch.zeros(n_features, d_in))

    @classmethod
    @torch.no_grad()
    def fit(cls, x: torch.Tensor, seed: int = 0) -> LinearBasis:
        """A basis fitted to raw activations ``x`` ``[n, d_in]``, on ``x``'s device.

        Without gradients: ``b_dec`` is a parameter, so ``z`` would otherwise carry a graph through every FastICA
        iteration (kept until the fit ends: 16 GB for an MLP hook of width 512 on 32k activations)."""
        basis = cls(x.shape[1], x.shape[1]).to(x.device)
        basis.init_from_data(x)
        if not cls.centred:
            basis.b_dec.data.zero_()
        basis.set_atoms(cls.atoms(x / basis.scale - basis.b_dec, seed))
        return basis

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        """``[n_features, d_in]`` directions for normalised, (centred) activations ``z``."""
        raise NotImplementedError

    @torch.no_grad()
    def set_atoms(self, atoms: torch.Tensor) -> None:
        self.W_dec = unit_rows(atoms.double()).float()
        self.W_enc = torch.linalg.pinv(self.W_dec.double()).T.float()
        self.n_features = len(atoms)

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        codes = (x - self.b_dec) @ self.W_enc.T
        return codes if self.k is None else top_k_by_magnitude(codes, self.k)

    def decoder_weight(self) -> torch.Tensor:
        return self.W_dec

    def hparams(self) -> dict:
        return {"k": self.k}

    def with_top_k(self, k: int) -> LinearBasis:
        """A copy that keeps only the ``k`` largest-magnitude codes per input."""
        sparse = copy.deepcopy(self)
        sparse.k = k
        return sparse
