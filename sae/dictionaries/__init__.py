"""Dictionary variants. Add one by writing a module here with a ``@register``-ed class and a YAML in conf/sae/."""

from sae.dictionaries import batchtopk, gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (importing registers the variants)
from sae.dictionaries.base import VARIANTS, Dictionary, register

__all__ = ["VARIANTS", "Dictionary", "register", "build"]


def build(variant: str, d_in: int, n_features: int, **hparams) -> Dictionary:
    """A fresh dictionary of the named variant."""
    from sae.errors import ConfigError

    if variant not in VARIANTS:
        raise ConfigError(f"unknown dictionary variant '{variant}'; choose sae={'|'.join(VARIANTS)}")
    return VARIANTS[variant](d_in, n_features, **hparams)
