"""Random directions: ``d_in`` unit vectors drawn uniformly on the sphere (a basis, almost surely)."""

from __future__ import annotations

import torch

from sae.baselines.base import LinearBasis, register_baseline


@register_baseline
class RandomDirections(LinearBasis):
    variant = "random"

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(z.shape[1], z.shape[1], generator=gen, dtype=torch.float64).to(z.device)
