"""Held-out metrics on toy data: reconstruction and sparsity on fresh samples, and recovery of the planted features."""

from __future__ import annotations

import torch

from sae.data.toy import ToyData
from sae.evaluation.metrics import mmcs, reconstruction_metrics, recovered_fraction


@torch.no_grad()
def toy_metrics(dictionary, toy: ToyData, n: int, seed: int = 12345) -> dict:
    """Held-out metrics on ``n`` fresh toy samples (as for an LM, without the spliced-LM part), with MMCS and
    recovery against the ground truth."""
    x = toy.sample(n, torch.Generator().manual_seed(seed))
    atoms = dictionary.decoder_weight()
    return {
        **reconstruction_metrics(dictionary, x),
        "mmcs": mmcs(toy.features, atoms),
        "frac_recovered": recovered_fraction(toy.features, atoms),
    }
