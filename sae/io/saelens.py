"""SAELens interop: read a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``) as a Dictionary, write ours
as one.

SAELens computes codes = act((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc) and x_hat = codes @ W_dec + b_dec,
with ``W_enc`` ``[d_in, d_sae]`` and ``W_dec`` ``[d_sae, d_in]`` in the model's units. Ours keeps unit-norm atoms and
a scalar ``scale`` (the decoder rows' mean norm), so on import each row's norm moves into its code: **our code i is
SAELens' code i times ``ratio[i]`` = row i's norm over the mean norm** (with all rows of one norm, as in every export
of ours, the codes are SAELens' own); reconstructions are SAELens' exactly. TopK: SAELens ranks its pre-activations
before that rescaling, so a TopK file whose rows differ in norm loads as ``RankedTopKDictionary`` (it ranks our
pre-activations divided by ``ratio``: the same k atoms); with ``rescale_acts_by_decoder_norm: true`` SAELens ranks
and reports codes already times the row norms, so ours are its codes over ``scale`` and a plain TopK ranks alike.
``normalize_activations: expected_average_only_in`` marks weights that work on activations multiplied by
``norm_scaling_factor`` (SAELens folds that factor into the weights when it loads a release it knows, and when it
saves after training): they are folded here the same way (``_fold_activation_scaling``), the factor read from the
cfg, as SAELens records none in the file itself. JumpReLU (``threshold`` per feature) and Gated (``b_gate``,
``b_mag``, ``r_mag``) SAEs load the same way, their thresholds and biases rescaled with their codes
(``sae.io.saelens_variants``).

Export: ``python -m sae.io.saelens <run dir> <out dir>`` (written into a temporary directory renamed into place).
BatchTopK and Matryoshka dictionaries export in their inference form, as SAELens saves its own: a JumpReLU whose
every feature has the global threshold.
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
from sae.io.atomic import staged_directory, write_json
from sae.io.saelens_variants import EXPORTERS, IMPORTERS, RankedTopKDictionary
from sae.io.saving import load, read_meta

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
TENSORS = {"jumprelu": ("b_enc", "threshold"), "gated": ("b_gate", "b_mag", "r_mag")}  # beyond W_enc, W_dec, b_dec
SITE_HOOKS = {
    "resid": "hook_resid_post",
    "mlp": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}
FOLDED_NORMALISATIONS = ("none", None)
UNFOLDED = "expected_average_only_in"  # weights for activations times ``norm_scaling_factor``, folded on import


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
    raise ConfigError(
        f"SAELens hook_name '{hook_name}' has no equivalent here "
        f"(supported: blocks.<i>.{'|'.join(sites)}, hook_resid_pre)"
    )


def _top_k(cfg: dict) -> int | None:
    if cfg.get("architecture") == "topk" or cfg.get("activation_fn_str") == "topk":
        return int(cfg.get("k") or cfg.get("activation_fn_kwargs", {})["k"])
    return None


def _check_supported(cfg: dict, directory: Path) -> None:
    if cfg.get("architecture", "standard") not in ("standard", "topk", *IMPORTERS):
        raise ConfigError(f"{directory}: SAELens architecture '{cfg['architecture']}' is not supported "
                          f"({', '.join(('standard', 'topk', *IMPORTERS))})")
    if cfg.get("activation_fn_str", "relu") not in ("relu", "topk"):
        raise ConfigError(
            f"{directory}: SAELens activation '{cfg['activation_fn_str']}' is not supported (relu or topk)"
        )
    if cfg.get("normalize_activations") not in (*FOLDED_NORMALISATIONS, UNFOLDED):
        raise ConfigError(f"{directory}: normalize_activations='{cfg['normalize_activations']}' is not supported "
                          f"(none, {UNFOLDED})")


def _fold_activation_scaling(cfg: dict, w: dict[str, torch.Tensor], directory: Path) -> None:
    """Fold SAELens' ``norm_scaling_factor`` into weights still saved for scaled activations, as SAELens does at
    load: ``W_enc`` times the factor, ``W_dec`` and ``b_dec`` over it (codes unchanged, reconstructions in model
    units)."""
    if cfg.get("normalize_activations") != UNFOLDED:
        return
    factor = cfg.get("norm_scaling_factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ConfigError(
            f"{directory / CFG} says normalize_activations='{UNFOLDED}': its weights expect activations multiplied by "
            f"SAELens' norm_scaling_factor, which it does not record (got {factor!r}); add \"norm_scaling_factor\": "
            "<value> to cfg.json (SAELens' pretrained_saes.yaml lists it for its releases; sqrt(d_in) over the mean "
            "activation norm for one trained by SAELens)")
    w["W_enc"] = w["W_enc"] * factor
    w["W_dec"] = w["W_dec"] / factor
    w["b_dec"] = w["b_dec"] / factor


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
        raise ConfigError(
            f"{directory / WEIGHTS} lacks {', '.join(missing)}: not a complete SAELens '{architecture}' dictionary"
        )
    _fold_activation_scaling(cfg, w, directory)
    norms = w["W_dec"].norm(dim=1)
    scale = norms[norms > 0].mean()
    ratio = norms / scale
    d_in, d_sae = w["W_enc"].shape
    if cfg.get("architecture") in IMPORTERS:
        dictionary = IMPORTERS[cfg["architecture"]](w, norms, ratio, cfg.get("apply_b_dec_to_input", True))
    else:
        b_enc = w["b_enc"] if cfg.get("apply_b_dec_to_input", True) else w["b_enc"] + w["b_dec"] @ w["W_enc"]
        dictionary = _standard_or_topk(cfg, d_in, d_sae, ratio, directory)
        dictionary.W_enc.copy_(w["W_enc"].T * norms[:, None])
        dictionary.b_enc.copy_(b_enc * ratio)
    dictionary.scale.copy_(scale)
    dictionary.b_dec.copy_(w["b_dec"] / scale)
    dictionary.W_dec.copy_(w["W_dec"] / norms.clamp_min(1e-12)[:, None])
    meta = {
        "variant": dictionary.variant,
        "d_in": d_in,
        "n_features": d_sae,
        "hparams": dictionary.hparams(),
        **_meta(cfg),
    }
    return dictionary.eval(), meta


def _standard_or_topk(cfg: dict, d_in: int, d_sae: int, ratio: torch.Tensor, directory: Path) -> Dictionary:
    """The empty dictionary for a ``standard`` or ``topk`` file; training settings mean nothing for an imported
    dictionary and are recorded as off. A TopK file ranks as SAELens does (see the module docstring)."""
    k = _top_k(cfg)
    if k is None:
        return ReLUDictionary(d_in, d_sae, l1_coeff=0.0)
    if cfg.get("rescale_acts_by_decoder_norm", False) or (ratio - 1).abs().max() <= 1e-6:
        return TopKDictionary(d_in, d_sae, k=k, aux_coeff=0.0, k_aux=None)
    if not (ratio > 0).all():
        raise ConfigError(f"{directory}: a TopK SAE with a zero decoder row ranks that feature by a code it never "
                          "decodes, which cannot be reproduced here")
    return RankedTopKDictionary(d_in, d_sae, k=k, rank_scale=ratio)


def _encoder_weight(dictionary: Dictionary) -> torch.Tensor:
    if isinstance(dictionary, ReLUDictionary):
        return dictionary.encoder_weight()
    if isinstance(dictionary, TopKDictionary):
        return dictionary.W_enc
    raise ConfigError(
        f"variant '{dictionary.variant}' has no SAELens equivalent "
        f"(relu, relu_tied, topk, {', '.join(EXPORTERS)} export)"
    )


@torch.no_grad()
def export_saelens(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the dictionary of ``run_dir`` as a SAELens directory (model units, ``normalize_activations: none``)."""
    dictionary, meta = load(run_dir), read_meta(run_dir)
    scale = dictionary.scale
    if dictionary.variant in EXPORTERS:
        architecture, weights = EXPORTERS[dictionary.variant](dictionary)
        k = None
    else:
        weights = {
            "W_enc": (_encoder_weight(dictionary).T / scale).contiguous(),
            "b_enc": dictionary.b_enc.detach().clone(),
        }
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
    if out_dir.exists() and not (out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {CFG, WEIGHTS}):
        raise ConfigError(f"'{out_dir}' exists and is not a SAELens directory of ours (only {CFG} and {WEIGHTS}); "
                          "give a new or empty directory")
    # both files appear together or not at all: an earlier export there is replaced only when this one is whole
    with staged_directory(out_dir) as tmp:
        save_file({name: t.float().cpu() for name, t in weights.items()}, str(tmp / WEIGHTS))
        write_json(tmp / CFG, cfg)
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
