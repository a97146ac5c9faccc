"""How concentrated a feature's activation mass is on single tokens, per feature and summarised per method."""

from __future__ import annotations

import torch

SCORES = ("top_token_share", "token_entropy", "frac_top_token_over_half", "live_features", "features", "mean_density")


def token_scores(mass: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per feature, from ``mass`` ``[n_tokens_in_vocab, n_features]`` (summed activation per token id).

    ``top_token_share``: the share of the activation mass on the feature's top token (1 = one token only);
    ``token_entropy``: the entropy (nats) of the mass distribution over tokens (0 = one token only).
    Features with no mass get share 0 and entropy NaN.
    """
    token, feature = mass.nonzero(as_tuple=True)
    return pair_scores(feature, mass[token, feature], mass.shape[1])


def pair_scores(feature: torch.Tensor, mass: torch.Tensor, n_features: int) -> dict[str, torch.Tensor]:
    """``token_scores`` from the sparse mass: one entry per (token id, ``feature``) with its summed activation."""
    mass = mass.double()
    total = torch.zeros(n_features, dtype=torch.float64).index_add_(0, feature, mass)
    p = mass / total[feature].clamp_min(1e-12)
    terms = -(p * p.clamp_min(1e-30).log())
    entropy = torch.zeros(n_features, dtype=torch.float64).index_add_(0, feature, terms).clamp_min(0)
    share = torch.zeros(n_features, dtype=torch.float64).scatter_reduce_(0, feature, p, "amax")
    return {"top_token_share": share.float(), "token_entropy": torch.where(total > 0, entropy, torch.nan).float()}


def summarise(scores: dict[str, torch.Tensor], live: torch.Tensor, density: torch.Tensor) -> dict[str, float]:
    """Means over ``live`` features (those firing often enough to judge), in ``SCORES`` order."""
    share, entropy = scores["top_token_share"][live], scores["token_entropy"][live]
    nan = float("nan")
    return {
        "top_token_share": share.mean().item() if live.any() else nan,
        "token_entropy": entropy.mean().item() if live.any() else nan,
        "frac_top_token_over_half": (share > 0.5).float().mean().item() if live.any() else nan,
        "live_features": int(live.sum()),
        "features": len(live),
        "mean_density": density.mean().item(),
    }
