"""Random directions: a uniformly random orthonormal basis of ``d_in`` unit vectors (a random rotation of the neurons).

Orthonormal, not merely random: with a random non-orthogonal basis the pseudo-inverse encoder amplifies codes that
cancel (a 128 x 128 Gaussian basis is badly conditioned), so keeping the top k codes by magnitude reconstructs far
worse than the mean alone. With an orthonormal basis, as with PCA, the top k codes are the k largest contributions.
"""

from __future__ import annotations

import torch

from sae.baselines.base import LinearBasis, register_baseline


@register_baseline
class RandomDirections(LinearBasis):
    variant = "random"

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(z.shape[1], z.shape[1], generator=gen, dtype=torch.float64))
        return (q * r.diagonal().sign()).T.to(z.device)  # the sign fix makes the rotation uniform (Haar)
