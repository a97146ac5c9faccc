"""``saebench/sparse_probing/<dictionary>_eval_results.json``: the probing study's results in SAEBench's
sparse-probing schema (its ``llm_*`` fields: the raw activations at the dictionary's hook; ``sae_*``: the
dictionary; the accuracy is the mean over split seeds of the mean over one-vs-rest problems)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae.evaluation.saebench import envelope, sae_cfg_dict, write_result
from sae.probing.config import ProbingSettings
from sae.probing.pooling import Method
from sae.probing.probe import DENSE
from sae.probing.tasks import Task

SAEBENCH_KS = (1, 2, 5, 10, 20, 50, 100)  # the top-k fields SAEBench's schema has


def accuracies(rows: list[dict], method: str, hook: str, task: str, prefix: str) -> dict:
    """``<prefix>_test_accuracy`` (dense) and ``<prefix>_top_<k>_test_accuracy`` of one method on one task."""
    out = {}
    for r in rows:
        if (r["method"], r["hook"], r["task"]) != (method, hook, task):
            continue
        if r["k"] == DENSE:
            out[f"{prefix}_test_accuracy"] = r["accuracy"]
        elif r["k"] in SAEBENCH_KS:
            out[f"{prefix}_top_{r['k']}_test_accuracy"] = r["accuracy"]
    return out


def averaged(details: list[dict], prefix: str) -> dict:
    keys = [k for k in details[0] if k.startswith(prefix)]
    return {k: float(np.mean([d[k] for d in details])) for k in keys}


def sparse_probing_output(method: Method, rows: list[dict], settings: ProbingSettings, tasks: list[Task]) -> dict:
    entry, hook = method.entry, method.hook.name
    details = [{"dataset_name": t.name, **accuracies(rows, "raw", hook, t.name, "llm"),
                **accuracies(rows, method.name, hook, t.name, "sae")} for t in tasks]
    config = {"random_seed": 0, "dataset_names": [t.name for t in tasks],
              "probe_train_set_size": int(np.mean([r["n_train"] for r in rows if r["hook"] == hook])),
              "probe_test_set_size": int(np.mean([r["n_test"] for r in rows if r["hook"] == hook])),
              "context_length": settings.max_tokens, "sae_batch_size": settings.batch_size,
              "llm_batch_size": settings.batch_size, "llm_dtype": str(entry.meta["model"].get("dtype") or "float32"),
              "model_name": str(entry.meta["model"]["name_or_path"]), "k_values": [k for k in settings.ks],
              "lower_vram_usage": False}
    metrics = {"llm": averaged(details, "llm"), "sae": averaged(details, "sae")}
    cfg = sae_cfg_dict(entry.meta, entry.dictionary.d_in, entry.dictionary.n_features, entry.dictionary.variant)
    unstructured = {"pooling": settings.pooling, "split_seeds": settings.seeds, "test_fraction": settings.test_fraction}
    return envelope("sparse_probing", config, metrics, details, entry.name, None, cfg, unstructured)


def write_sparse_probing(directory: Path, rows: list[dict], methods: list[Method], settings: ProbingSettings,
                         tasks: list[Task]) -> list[Path]:
    """One file per dictionary; none (and a note) without the raw activations' dense probe, which SAEBench needs."""
    if not (settings.raw and settings.dense):
        print("saebench/sparse_probing not written: SAEBench's schema needs analysis.raw=true and analysis.dense=true")
        return []
    dictionaries = [m for m in methods if m.entry is not None and m.entry.kind == "dictionary"]
    return [write_result(directory, m.entry.name, sparse_probing_output(m, rows, settings, tasks))
            for m in dictionaries]
