"""The neuron basis: the identity, so codes are the activation's own coordinates (for ``hook.site=mlp``, the MLP's
neurons)."""

from __future__ import annotations

import torch

from sae.baselines.base import LinearBasis, register_baseline


@register_baseline
class Neurons(LinearBasis):
    variant = "neurons"
    centred = False  # codes are the raw coordinates (divided by the scalar scale), not their deviation from the mean

    @staticmethod
    def atoms(z: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
