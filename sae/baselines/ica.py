"""ICA: symmetric FastICA (logcosh contrast) on PCA-whitened activations, in torch so it runs where the data is."""

from __future__ import annotations

import warnings

import torch

from sae.baselines.base import LinearBasis, register_baseline

MAX_ITER = 200  # scikit-learn's defaults, as the paper used
TOL = 1e-4
MIN_VARIANCE = 1e-6  # whitening drops directions with less than this fraction of the largest variance


def whitening(z: torch.Tensor) -> torch.Tensor:
    """``K`` ``[r, d]`` such that ``z @ K.T`` has identity covariance (``r``: the directions with non-negligible
    variance)."""
    z = z.double()
    variances, vectors = torch.linalg.eigh(z.T @ z / len(z))
    keep = variances > MIN_VARIANCE * variances.max()
    return (vectors[:, keep] / variances[keep].sqrt()).T


def symmetric_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """``(W W^T)^{-1/2} W``: the nearest matrix with orthonormal rows."""
    values, vectors = torch.linalg.eigh(w @ w.T)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T @ w


def fast_ica(white: torch.Tensor, seed: int, max_iter: int = MAX_ITER, tol: float = TOL) -> torch.Tensor:
    """Unmixing ``W`` ``[r, r]`` with orthonormal rows for whitened data ``[n, r]`` (Hyvärinen's fixed point, tanh).

    Warns, as scikit-learn does, when ``max_iter`` iterations end before the rows change by less than ``tol``.
    """
    r = white.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w = symmetric_decorrelation(torch.randn(r, r, generator=gen, dtype=white.dtype).to(white.device))
    for _ in range(max_iter):
        g = torch.tanh(white @ w.T)
        new = symmetric_decorrelation(g.T @ white / len(white) - (1 - g.pow(2)).mean(0)[:, None] * w)
        change = ((new * w).sum(1).abs() - 1).abs().max().item()
        w = new
        if change < tol:
            return w
    warnings.warn(
        f"FastICA did not converge in {max_iter} iterations (last change {change:.2g}, tol {tol:g})", stacklevel=2
    )
    return w


@register_baseline
class ICA(LinearBasis):
    variant = "ica"

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        """The mixing matrix's columns: the directions each independent component adds to the activation."""
        k = whitening(z)
        w = fast_ica((z.double() @ k.T).float(), seed).double()
        return torch.linalg.pinv(w @ k).T
