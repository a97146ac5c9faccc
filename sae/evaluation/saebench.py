"""Files SAEBench reads: its eval-output JSON (``eval_type_id``, ``eval_config``, ``eval_result_metrics``, ...),
one file per dictionary and eval type, as SAEBench's ``eval_results/<eval type>/<sae>_eval_results.json``.

The layout follows SAEBench's published schemas (adamkarvonen/SAEBench 0.6.0,
``sae_bench/evals/<type>/eval_output_schema_<type>.json``); the values are ours, computed by this project's code.
"""

from __future__ import annotations

import math
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.io.atomic import write_json
from sae.io.saelens import SITE_HOOKS


def producer() -> str:
    """Stands where SAEBench records its commit: says these results were written by this project, not SAEBench."""
    try:
        return f"sae {version('sae')} (not SAEBench)"
    except PackageNotFoundError:
        return "sae (not SAEBench)"


def sae_cfg_dict(meta: dict, d_in: int, d_sae: int, variant: str) -> dict:
    """The SAELens-style configuration SAEBench stores beside the results (``sae_cfg_dict``)."""
    hook = meta["hook"]
    return {"architecture": variant, "d_in": d_in, "d_sae": d_sae, "model_name": meta["model"]["name_or_path"],
            "hook_name": f"blocks.{hook['layer']}.{SITE_HOOKS[hook['site']]}", "hook_layer": hook["layer"],
            "context_size": (meta.get("data") or {}).get("context_length")}


def envelope(eval_type: str, eval_config: dict, metrics: dict, details: list, name: str, release: str | None,
             cfg_dict: dict, unstructured: dict | None = None) -> dict:
    """One SAEBench eval output: the fields every eval type shares around its config, metrics and details."""
    return {
        "eval_type_id": eval_type,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": producer(),
        "sae_lens_id": name,
        "sae_lens_release_id": release,
        "sae_lens_version": None,
        "sae_cfg_dict": cfg_dict,
        "eval_result_unstructured": unstructured,
    }


def result_path(directory: Path, name: str) -> Path:
    """``<directory>/<name>_eval_results.json``, the dictionary's path under ``run`` flattened."""
    return directory / f"{name.replace('/', '_')}_eval_results.json"


def write_result(directory: Path, name: str, output: dict) -> Path:
    path = result_path(directory, name)
    write_json(path, output)
    return path


# -- core metrics, by SAEBench's definitions (sae_bench/evals/core/main.py, 0.6.0) ---------------------------------
# Each is computed from sums accumulated in the held-out pass (sae.evaluation.metrics.Tally adds a batch at a time);
# where SAEBench's code computes something other than its name says, this follows the code (so the numbers compare
# with SAEBench's published ones) and the docs (docs/studies/metrics.md) say so.


class CoreSums:
    """Running sums over held-out batches of ordinary-text tokens for SAEBench's reconstruction, shrinkage and
    sparsity metrics (model units; codes as ``Dictionary.encode`` returns them, the same as a SAELens export's)."""

    def __init__(self, n_features: int):
        self.n = 0
        self.norm_in = self.norm_out = self.ratio = self.cossim = self.l0 = self.l1 = 0.0
        self.mse_per_batch = self.ev_legacy = self.sum_sq = self.sum_resid = 0.0
        self.sq_per_dim: torch.Tensor | float = 0.0
        self.rrb: list[float] = []
        self.fired = torch.zeros(n_features, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """One batch (SAEBench averages some terms per batch); its codes here or, in row parts, by ``add_codes``."""
        if codes is not None:
            self.add_codes(codes)
        x, x_hat = x.double(), x_hat.double()
        n, resid = len(x), (x - x_hat).pow(2).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += n
        self.norm_in += norm_in.sum().item()
        self.norm_out += norm_out.sum().item()
        self.ratio += (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum().item()
        # 0 where x_hat = 0 (SAEBench's own division gives NaN there)
        self.cossim += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-30).sum().item()
        self.rrb.append((norm_out.pow(2).mean() / (x * x_hat).sum(-1).mean()).item())
        self.mse_per_batch += (resid / n).sum().item()  # SAEBench divides each token's error by the batch's tokens
        self.ev_legacy += (1 - resid / (x - x.mean(0)).pow(2).sum(-1)).sum().item()
        self.sum_sq += x.pow(2).sum().item()
        self.sum_resid += resid.sum().item()
        self.sq_per_dim = self.sq_per_dim + x.pow(2).sum(0)

    @torch.no_grad()
    def add_codes(self, codes: torch.Tensor) -> None:
        """The code terms (L0, L1, firing counts): sums over rows, so a batch's codes may come in row parts. The L1
        is summed in float64 a slice of rows at a time (a float64 copy of all ``[n, n_features]`` codes is 1 GiB for
        8,192 positions at 16,384 features)."""
        self.l0 += (codes != 0).sum().item()
        self.l1 += sum(part.double().sum().item() for part in codes.split(max(1, 2**20 // codes.shape[-1])))
        self.fired += (codes > 0).sum(0).double().cpu()

    def metrics(self) -> dict:
        """``reconstruction_quality``, ``shrinkage``, ``sparsity`` and the density part of ``misc_metrics``."""
        n = self.n
        # SAEBench's total variance: E||x||^2 minus the square of the mean over dimensions of E[x_d^2] (its code
        # concatenates the per-dimension means and averages them to a scalar), not E||x||^2 - ||E x||^2
        total = self.sum_sq / n - ((self.sq_per_dim / n).mean().item()) ** 2
        density = self.fired / n
        return {
            "reconstruction_quality": {"explained_variance": 1 - (self.sum_resid / n) / total,
                                       "explained_variance_legacy": self.ev_legacy / n,
                                       "mse": self.mse_per_batch / n, "cossim": self.cossim / n},
            "shrinkage": {"l2_norm_in": self.norm_in / n, "l2_norm_out": self.norm_out / n, "l2_ratio": self.ratio / n,
                          "relative_reconstruction_bias": sum(self.rrb) / len(self.rrb)},
            "sparsity": {"l0": self.l0 / n, "l1": self.l1 / n},
            "density": density_metrics(density),
        }


def density_metrics(density: torch.Tensor) -> dict:
    """SAEBench's ``misc_metrics`` from the per-feature firing frequencies."""
    total = density.sum().item()
    return {
        "frac_alive": (density > 0).double().mean().item(),
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "freq_over_10_percent": (density > 0.1).double().mean().item(),
        "normalized_freq_over_1_percent": density[density > 0.01].sum().item() / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": density[density > 0.1].sum().item() / total if total > 0 else 0.0,
    }


def preservation(hook: dict, ce_spliced: float, kl_spliced: float) -> dict:
    """``model_behavior_preservation`` and ``model_performance_preservation``: scores against zero ablation,
    ``(ablated - spliced) / (ablated - clean)`` for CE and ``(KL_ablated - KL_spliced) / KL_ablated`` for KL.
    ``hook``: the held-out metrics a hook's dictionaries share (``ce_clean``, ``ce_zero_ablation``,
    ``kl_zero_ablation``)."""
    clean, zero, kl_zero = hook["ce_clean"], hook["ce_zero_ablation"], hook["kl_zero_ablation"]
    return {
        "model_behavior_preservation": {"kl_div_score": (kl_zero - kl_spliced) / kl_zero,
                                        "kl_div_with_ablation": kl_zero, "kl_div_with_sae": kl_spliced},
        "model_performance_preservation": {"ce_loss_score": (zero - ce_spliced) / (zero - clean),
                                           "ce_loss_with_ablation": zero, "ce_loss_with_sae": ce_spliced,
                                           "ce_loss_without_sae": clean},
    }


def max_other_cosine(rows: torch.Tensor, block_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Each row's largest cosine similarity with any other row, a block of rows at a time: the whole float64
    ``[n, n]`` matrix is 8.6 GB at 32,768 features, a block at most ``block_bytes``."""
    unit = F.normalize(rows.double(), dim=-1)
    n = len(unit)
    step = max(1, block_bytes // (8 * n))
    best = []
    for start in range(0, n, step):
        cos = unit[start: start + step] @ unit.T
        own = torch.arange(start, start + len(cos))
        cos[own - start, own] = -math.inf
        best.append(cos.max(-1).values)
    return torch.cat(best)


def weight_metrics(dictionary) -> dict:
    """``average_max_encoder_cosine_sim`` and ``average_max_decoder_cosine_sim`` (null where the dictionary has no
    encoder matrix, e.g. a gated one read through another name)."""
    with torch.no_grad():
        decoder = dictionary.decoder_weight()
        encoder = dictionary.encoder_weight() if hasattr(dictionary, "encoder_weight") else getattr(
            dictionary, "W_enc", None)
        return {"average_max_decoder_cosine_sim": max_other_cosine(decoder).mean().item(),
                "average_max_encoder_cosine_sim": None if encoder is None else max_other_cosine(encoder).mean().item()}


def core_output(name: str, meta: dict, dictionary, metrics: dict) -> dict:
    """One dictionary's ``eval.json`` metrics (``metrics["saebench"]``) as SAEBench's core eval output."""
    core = metrics["saebench"]
    misc = {**core["density"], **weight_metrics(dictionary)}
    categories = {k: v for k, v in core.items() if k != "density"}
    categories["token_stats"] = {"total_tokens_eval_reconstruction": metrics["n_predictions"],
                                 "total_tokens_eval_sparsity_variance": metrics["n_tokens"]}
    categories["misc_metrics"] = misc
    config = {"model_name": str(meta["model"]["name_or_path"]), "llm_dtype": str(meta["model"].get("dtype") or
                                                                                 "float32"),
              "dataset": str(meta["data"].get("path")), "context_size": int(meta["data"]["context_length"]),
              "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True, "compute_sparsity_metrics": True,
              "compute_variance_metrics": True, "compute_featurewise_density_statistics": False,
              "compute_featurewise_weight_based_metrics": False, "exclude_special_tokens_from_reconstruction": True,
              "verbose": False}
    cfg = sae_cfg_dict(meta, dictionary.d_in, dictionary.n_features, dictionary.variant)
    return envelope("core", config, _finite(categories), [], name, None, cfg,
                    {"ours": {k: metrics[k] for k in ("fvu", "mse", "cosine", "l2_ratio", "ce_loss_recovered",
                                                      "kl_spliced") if k in metrics}})


def _finite(obj):
    """``obj`` with every non-finite float (SAEBench's 0/0 cases: a reconstruction of exactly zero) as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj if not isinstance(obj, float) or math.isfinite(obj) else None
