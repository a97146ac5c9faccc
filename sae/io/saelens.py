"""SAELens interop: read a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``) as a Dictionary, write ours as one.

SAELens computes codes = act((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc) and x_hat = codes @ W_dec + b_dec,
with ``W_enc`` ``[d_in, d_sae]`` and ``W_dec`` ``[d_sae, d_in]`` in the model's units. Ours keeps unit-norm atoms and
a scalar ``scale``, so on import the decoder's row norms move into the codes: with all rows of one norm (as in every
export of ours) the codes are SAELens's own; otherwise code i is multiplied by its row's norm over the mean norm (a
ReLU SAE's reconstruction is unchanged; a TopK SAE with unequal norms is refused, as its selection would change).
JumpReLU (``threshold`` per feature) and Gated (``b_gate``, ``b_mag``, ``r_mag``) SAEs load the same way, their
thresholds and biases rescaled with their codes (``sae.saelens_variants``).

Export: ``python -m sae.io.saelens <run dir> <out dir>``. BatchTopK and Matryoshka dictionaries export in their
inference form, as SAELens saves its own: a JumpReLU whose every feature has the global threshold.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.dictionaries import Dictionary
from sae.dictionaries.relu import ReLUDictionary
from sae.dictionaries.topk import TopKDictionary
from sae.errors import ConfigError, exit_on_config_error
from sae.io.atomic import write_json
from sae.io.saelens_variants import EXPORTERS, IMPORTERS
from sae.io.saving import load, read_meta

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
TENSORS = {"jumprelu": ("b_enc", "threshold"), "gated": ("b_gate", "b_mag", "r_mag")}  # beyond W_enc, W_dec, b_dec
SITE_HOOKS = {"resid": "hook_resid_post", "mlp": "mlp.hook_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
FOLDED_NORMALISATIONS = ("none", "expected_average_only_in", None)  # SAELens folds the latter into the weights on save


def is_saelens_dir(directory: str | Path) -> bool:
    return (Path(directory) / CFG).is_file() and (Path(directory) / WEIGHTS).is_file()


def hook_from_name(hook_name: str) -> dict:
    """Our ``{"layer", "site"}`` for a TransformerLens hook name (``blocks.3.hook_resid_pre`` is block 2's output)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    sites = {v: k for k, v in SITE_HOOKS.items()}
    if match and match[2] in sites:
        return {"layer": int(match[1]), "site": sites[match[2]]}
    if match and match[2] == "hook_resid_pre" and int(match[1]) > 0:
        return {"layer": int(match[1]) - 1, "site": "resid"}
    raise ConfigError(f"SAELens hook_name '{hook_name}' has no equivalent here (supported: blocks.<i>.{'|'.join(sites)}, hook_resid_pre)")


def _top_k(cfg: dict) -> int | None:
    if cfg.get("architecture") == "topk" or cfg.get("activation_fn_str") == "topk":
        return int(cfg.get("k") or cfg.get("activation_fn_kwargs", {})["k"])
    return None


def _check_supported(cfg: dict, directory: Path) -> None:
    if cfg.get("architecture", "standard") not in ("standard", "topk", *IMPORTERS):
        raise ConfigError(f"{directory}: SAELens architecture '{cfg['architecture']}' is not supported "
                          f"({', '.join(('standard', 'topk', *IMPORTERS))})")
    if cfg.get("activation_fn_str", "relu") not in ("relu", "topk"):
        raise ConfigError(f"{directory}: SAELens activation '{cfg['activation_fn_str']}' is not supported (relu or topk)")
    if cfg.get("normalize_activations") not in FOLDED_NORMALISATIONS:
        raise ConfigError(f"{directory}: normalize_activations='{cfg['normalize_activations']}' is not supported (none)")


def _meta(cfg: dict) -> dict:
    """Our ``sae.json`` fields for a SAELens config (model, hook and data; override them on evaluate's command line)."""
    info = {**cfg.get("metadata", {}), **cfg}
    return {
        "model": {"name_or_path": info.get("model_name"), "dtype": "float32"},
        "hook": hook_from_name(info["hook_name"]),
        # SAELens records no held-out split: the text is read as this project reads a hub dataset's train split
        "data": {"source": "hub", "path": info.get("dataset_path"), "context_length": info.get("context_size", 256),
                 "text_column": "text", "split": "train", "heldout_fraction": 0.1},
        "saelens": cfg,
    }


@torch.no_grad()
def load_saelens(directory: str | Path) -> tuple[Dictionary, dict]:
    """The SAELens dictionary in ``directory`` as one of ours, and its ``sae.json``-style metadata."""
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CFG).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{directory / CFG} is not valid JSON ({err}): the SAELens directory is corrupt") from None
    _check_supported(cfg, directory)
    try:
        w = {k: v.float() for k, v in load_file(str(directory / WEIGHTS)).items()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ConfigError(f"{directory / WEIGHTS} cannot be read ({type(err).__name__}): the file is corrupt") from None
    architecture = cfg.get("architecture", "standard")
    missing = [k for k in ("W_enc", "W_dec", "b_dec", *TENSORS.get(architecture, ("b_enc",))) if k not in w]
    if missing:
        raise ConfigError(f"{directory / WEIGHTS} lacks {', '.join(missing)}: not a complete SAELens '{architecture}' dictionary")
    norms = w["W_dec"].norm(dim=1)
    scale = norms[norms > 0].mean()
    ratio = norms / scale
    k = _top_k(cfg)
    if k is not None and (ratio[norms > 0] - 1).abs().max() > 1e-3:
        raise ConfigError(f"{directory}: a TopK SAE whose decoder rows differ in norm cannot be loaded exactly")
    d_in, d_sae = w["W_enc"].shape
    if cfg.get("architecture") in IMPORTERS:
        dictionary = IMPORTERS[cfg["architecture"]](w, norms, ratio, cfg.get("apply_b_dec_to_input", True))
    else:
        b_enc = w["b_enc"] if cfg.get("apply_b_dec_to_input", True) else w["b_enc"] + w["b_dec"] @ w["W_enc"]
        # training settings have no meaning for an imported dictionary: recorded as off
        dictionary = (ReLUDictionary(d_in, d_sae, l1_coeff=0.0) if k is None
                      else TopKDictionary(d_in, d_sae, k=k, aux_coeff=0.0, k_aux=None))
        dictionary.W_enc.copy_(w["W_enc"].T * norms[:, None])
        dictionary.b_enc.copy_(b_enc * ratio)
    dictionary.scale.copy_(scale)
    dictionary.b_dec.copy_(w["b_dec"] / scale)
    dictionary.W_dec.copy_(w["W_dec"] / norms.clamp_min(1e-12)[:, None])
    meta = {"variant": dictionary.variant, "d_in": d_in, "n_features": d_sae, "hparams": dictionary.hparams(), **_meta(cfg)}
    return dictionary.eval(), meta


def _encoder_weight(dictionary: Dictionary) -> torch.Tensor:
    if isinstance(dictionary, ReLUDictionary):
        return dictionary.encoder_weight()
    if isinstance(dictionary, TopKDictionary):
        return dictionary.W_enc
    raise ConfigError(f"variant '{dictionary.variant}' has no SAELens equivalent (relu, relu_tied, topk, {', '.join(EXPORTERS)} export)")


@torch.no_grad()
def export_saelens(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the dictionary of ``run_dir`` as a SAELens directory (model units, ``normalize_activations: none``)."""
    dictionary, meta = load(run_dir), read_meta(run_dir)
    scale = dictionary.scale
    if dictionary.variant in EXPORTERS:
        architecture, weights = EXPORTERS[dictionary.variant](dictionary)
        k = None
    else:
        weights = {"W_enc": (_encoder_weight(dictionary).T / scale).contiguous(), "b_enc": dictionary.b_enc.detach().clone()}
        k = getattr(dictionary, "k", None)
        architecture = "standard" if k is None else "topk"
    weights = {
        **weights,
        "W_dec": (dictionary.decoder_weight() * scale).contiguous(),
        "b_dec": (dictionary.b_dec * scale).contiguous(),
    }
    cfg = {
        "architecture": architecture,
        "d_in": dictionary.d_in,
        "d_sae": dictionary.n_features,
        "activation_fn_str": "relu" if k is None else "topk",
        "activation_fn_kwargs": {} if k is None else {"k": k},
        **({} if k is None else {"k": k}),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "dtype": "float32",
        "device": "cpu",
        "model_name": meta["model"]["name_or_path"],
        "hook_name": f"blocks.{meta['hook']['layer']}.{SITE_HOOKS[meta['hook']['site']]}",
        "hook_layer": meta["hook"]["layer"],
        "hook_head_index": None,
        "context_size": meta["data"]["context_length"],
        "dataset_path": meta["data"]["path"],
        "prepend_bos": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: t.float().cpu() for name, t in weights.items()}, str(out_dir / WEIGHTS))
    write_json(out_dir / CFG, cfg)
    return out_dir


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a trained dictionary to a SAELens directory.")
    parser.add_argument("run_dir", help="a directory with sae.json and sae.safetensors")
    parser.add_argument("out_dir", help="where to write cfg.json and sae_weights.safetensors")
    args = parser.parse_args(argv)
    print(export_saelens(args.run_dir, args.out_dir))


if __name__ == "__main__":
    main()
