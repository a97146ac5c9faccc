"""PCA: the eigenvectors of the activations' covariance, largest variance first."""

from __future__ import annotations

import torch

from sae.baselines.base import LinearBasis, register_baseline


@register_baseline
class PCA(LinearBasis):
    variant = "pca"

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        z = z.double()
        _, vectors = torch.linalg.eigh(z.T @ z / len(z))
        return vectors.T.flip(0)
