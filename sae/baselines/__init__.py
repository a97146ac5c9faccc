"""Baselines: decompositions with a dictionary's encode/decode interface (PCA, ICA, random directions, neurons).

Add one by writing a module here with a ``@register_baseline``-ed ``LinearBasis`` subclass that defines ``atoms``.
"""

from sae.baselines import ica, neurons, pca, random_directions  # noqa: F401  (importing registers the baselines)
from sae.baselines.base import BASELINES, LinearBasis, register_baseline, top_k_by_magnitude

__all__ = ["BASELINES", "LinearBasis", "register_baseline", "top_k_by_magnitude", "fit"]


def fit(kind: str, x, seed: int = 0) -> LinearBasis:
    """The named baseline fitted to raw activations ``x`` ``[n, d_in]``."""
    from sae.errors import ConfigError

    if kind not in BASELINES:
        raise ConfigError(f"unknown baseline '{kind}'; choose from {', '.join(BASELINES)}")
    return BASELINES[kind].fit(x, seed)
