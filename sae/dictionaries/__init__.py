"""Dictionary variants. Add one by writing a module here with a ``@register``-ed class and a YAML in conf/sae/."""

import inspect

from sae.dictionaries import batchtopk, gated, jumprelu, matryoshka, relu, topk  # noqa: F401  (importing registers the variants)
from sae.dictionaries.base import VARIANTS, Dictionary, encode_parts, register

__all__ = ["VARIANTS", "Dictionary", "encode_parts", "register", "build"]


def build(variant: str, d_in: int, n_features: int, **hparams) -> Dictionary:
    """A fresh dictionary of the named variant."""
    from sae.errors import ConfigError

    if variant not in VARIANTS:
        raise ConfigError(f"unknown dictionary variant '{variant}'; choose sae={'|'.join(VARIANTS)}")
    cls = VARIANTS[variant]
    wanted = [n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY]
    missing, unknown = [n for n in wanted if n not in hparams], sorted(set(hparams) - set(wanted))
    if missing or unknown:
        raise ConfigError(f"variant '{variant}' takes the settings {wanted} (defaults: conf/sae/{variant}.yaml); "
                          f"missing {missing}, unknown {unknown}")
    return cls(d_in, n_features, **hparams)
