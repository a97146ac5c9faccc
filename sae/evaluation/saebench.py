"""Files SAEBench reads: its eval-output JSON (``eval_type_id``, ``eval_config``, ``eval_result_metrics``, ...),
one file per dictionary and eval type, as SAEBench's ``eval_results/<eval type>/<sae>_eval_results.json``.

The layout follows SAEBench's published schemas (adamkarvonen/SAEBench 0.6.0,
``sae_bench/evals/<type>/eval_output_schema_<type>.json``); the values are ours, computed by this project's code.
"""

from __future__ import annotations

import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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
