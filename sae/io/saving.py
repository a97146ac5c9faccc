"""A dictionary on disk: ``sae.safetensors`` (weights) + ``sae.json`` (how to rebuild it and how it was trained)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.baselines import BASELINES
from sae.dictionaries import VARIANTS, Dictionary, build
from sae.errors import ConfigError
from sae.io.atomic import atomic_path, write_json

WEIGHTS, META = "sae.safetensors", "sae.json"
FORMAT = "sae/1"


def save_dictionary(dictionary: Dictionary, directory: str | Path, metadata: dict) -> None:
    """Write weights and ``sae.json`` (architecture, normalisation, plus ``metadata``: model, hook, data, loss...)."""
    _check_rebuildable(dictionary)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in dictionary.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT,
        "variant": dictionary.variant,
        "d_in": dictionary.d_in,
        "n_features": dictionary.n_features,
        "hparams": dictionary.hparams(),
        "normalisation": {
            "scale": float(dictionary.scale),
            "how": "encode divides activations by `scale`, decode multiplies by it; `scale` is the root mean "
            "squared distance of training activations from their mean, so normalised activations have "
            "total variance 1",
        },
        **metadata,
    }
    write_json(directory / META, meta)


def _check_rebuildable(dictionary: Dictionary) -> None:
    """Refuse a dictionary that ``load`` could not rebuild from its ``variant`` name (e.g. an imported SAELens
    TopK that ranks by unnormalised pre-activations): written anyway, it would fail only when read back."""
    registered = BASELINES.get(dictionary.variant) or VARIANTS.get(dictionary.variant)
    if type(dictionary) is not registered:
        raise ConfigError(f"a {type(dictionary).__name__} cannot be saved as sae.safetensors + sae.json: "
                          f"it is not the registered '{dictionary.variant}' class; keep the directory it was "
                          "imported from (sae.load reads it again)")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise ConfigError(f"no dictionary in '{directory}': {META} is missing (expected a training run directory)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): the file is corrupt; train the dictionary again or "
                          "restore the file") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} holds no JSON object: the file is corrupt")
    return meta


def _rebuild(meta: dict) -> Dictionary:
    """An empty dictionary or baseline of the architecture ``meta`` describes."""

    if meta["variant"] in BASELINES:
        return BASELINES[meta["variant"]](meta["d_in"], meta["n_features"], **meta["hparams"])
    return build(meta["variant"], meta["d_in"], meta["n_features"], **meta["hparams"])


def load(directory: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Rebuild a dictionary (or a saved baseline) from its directory; ``encode``/``decode`` work in the model's own
    units."""
    meta = read_meta(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"'{directory}' has {META} but no {WEIGHTS}: the run did not finish writing it")
    dictionary = _rebuild(meta)
    dictionary.load_state_dict(load_file(str(weights)))
    return dictionary.to(device).eval()
