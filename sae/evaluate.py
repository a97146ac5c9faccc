"""Evaluate dictionaries (ours or SAELens's) and baselines on held-out text: ``eval.json`` each, one ``eval.csv``, plots.

Everything goes under ``out`` (default ``<run>/eval``): ``eval.csv``, ``plots/``, and one directory per row,
``<out>/<name>/`` with its ``eval.json`` (baselines also keep their fitted weights there, as ``sae.safetensors`` +
``sae.json``). Bad input is found before any model runs, so a failed evaluation leaves no ``eval.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from sae.baselines import BASELINES, fit
from sae.comparison import compare, markdown, matched_k
from sae.datamodule import ActivationDataModule
from sae.dictionaries import Dictionary
from sae.errors import ConfigError
from sae.hooks import HookPoint, check_hook, site_width
from sae.metrics import heldout_metrics_many, hook_activations, l0
from sae.model import load_config, load_model, resolve_device
from sae.saelens import is_saelens_dir, load_saelens
from sae.saving import META, load, read_meta, save_dictionary, write_json

COLUMNS = ["name", "kind", "layer", "site", "l0", "fvu", "ce_loss_recovered", "kl_spliced"]
DATAMODULE_KEYS = ("text_column", "split", "context_length", "heldout_fraction", "lm_batch_size")


@dataclass
class Entry:
    """One row of the evaluation: a dictionary or a baseline, with the model, hook and data it is evaluated with."""

    name: str
    kind: str  # dictionary | pca | ica | random | neurons, with _topk for the sparsified baselines
    dictionary: Dictionary
    meta: dict

    @property
    def hook(self) -> HookPoint:
        return HookPoint(self.meta["hook"]["layer"], self.meta["hook"]["site"])


def discover(run: Path) -> list[Path]:
    """Every dictionary directory under ``run`` (ours: ``sae.json``; SAELens: ``cfg.json`` + weights), not baselines."""
    if not run.is_dir():
        raise ConfigError(f"run='{run}' is not a directory; give a run, dictionary, sweep or SAELens directory")
    ours = [p.parent for p in run.rglob(META) if "baseline" not in read_meta(p.parent)]
    found = sorted(set(ours) | {p.parent for p in run.rglob("cfg.json") if is_saelens_dir(p.parent)})
    if not found:
        raise ConfigError(f"no dictionary under '{run}': expected {META} (ours) or cfg.json + sae_weights.safetensors (SAELens)")
    return found


def _with_overrides(meta: dict, cfg: DictConfig) -> dict:
    """``meta`` with the non-null ``model.*``, ``data.*`` and ``eval_tokens`` of the command line applied."""
    model = {**meta.get("model", {}), **{k: v for k, v in cfg.model.items() if v is not None}}
    data = {**meta.get("data", {}), **{k: v for k, v in cfg.data.items() if v is not None}}
    if cfg.eval_tokens is not None:
        data["eval_tokens"] = cfg.eval_tokens
    return {**meta, "model": model, "data": data}


def load_entry(directory: Path, run: Path, cfg: DictConfig) -> Entry:
    """A discovered dictionary with its metadata (command-line overrides applied); named by its path under ``run``."""
    dictionary, meta = load_saelens(directory) if is_saelens_dir(directory) else (load(directory), read_meta(directory))
    name = directory.relative_to(run).as_posix()
    return Entry(run.resolve().name if name == "." else name, "dictionary", dictionary, _with_overrides(meta, cfg))


def check_entry(entry: Entry) -> None:
    """Raise ConfigError if the entry's model, hook or data cannot be used, or its width does not match the hook."""
    model, data = entry.meta["model"], entry.meta["data"]
    if not model.get("name_or_path"):
        raise ConfigError(f"{entry.name}: no model recorded; set model.name_or_path=...")
    if not data.get("path"):
        raise ConfigError(f"{entry.name}: no text recorded; set data.source=files data.path=...")
    config = load_config(model["name_or_path"])
    check_hook(entry.hook, getattr(config, "num_hidden_layers", None) or config.n_layer)
    width = site_width(config, entry.hook.site)
    if entry.dictionary.d_in != width:
        raise ConfigError(
            f"{entry.name}: the dictionary's width d_in={entry.dictionary.d_in} does not match {entry.hook.name} of "
            f"'{model['name_or_path']}' (width {width}); evaluate it with the model it was trained on"
        )


ANALYSES = ("metrics", "features")
SETTING_MINIMA = {"top_k": 1, "window": 0, "quantiles": 1, "per_quantile": 0, "min_count": 1, "causal_contexts": 0,
                  "logit_tokens": 1, "hist_tokens": 1, "bins": 1}  # the least each features.settings.* may be


def validate(cfg: DictConfig) -> list[Entry]:
    """Check the config and every dictionary under ``cfg.run`` before any model runs; every problem found is
    reported in one ConfigError. Returns the dictionaries to evaluate."""
    problems: list[str] = []
    if cfg.analysis not in ANALYSES:
        problems.append(f"unknown analysis '{cfg.analysis}'; use analysis=metrics (eval.csv) or analysis=features (dashboard)")
    key = "features.baselines" if cfg.analysis == "features" else "baselines"
    unknown = [n for n in (cfg.features.baselines if key == "features.baselines" else cfg.baselines) if n not in BASELINES]
    if unknown:
        problems.append(f"unknown baselines {unknown}; choose from {key}=[{','.join(BASELINES)}]")
    if cfg.baseline_tokens <= 0:
        problems.append(f"baseline_tokens={cfg.baseline_tokens} must be > 0")
    if cfg.eval_tokens is not None and cfg.eval_tokens <= 0:
        problems.append(f"eval_tokens={cfg.eval_tokens} must be > 0 (or null: each dictionary's data.eval_tokens)")
    if cfg.analysis == "features":
        problems += [f"features.settings.{k}={v} must be >= {low}" for k, v in cfg.features.settings.items()
                     if k in SETTING_MINIMA and v < (low := SETTING_MINIMA[k])]
    if cfg.device != "auto" and str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device} but no CUDA device is available; use device=cpu (or auto)")
    entries: list[Entry] = []
    run = Path(cfg.run)
    try:
        found = discover(run)
    except ConfigError as err:
        problems.append(str(err))
        found = []
    for directory in found:
        try:
            entry = load_entry(directory, run, cfg)
            check_entry(entry)
            entries.append(entry)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    return entries


def group_key(entry: Entry) -> str:
    return json.dumps({"model": entry.meta["model"], "data": entry.meta["data"]}, sort_keys=True)


def make_datamodule(meta: dict, hooks: list[HookPoint], device: torch.device, seed: int) -> ActivationDataModule:
    """The training run's text pipeline (same held-out split) with its LM loaded on ``device``."""
    model, data = meta["model"], meta["data"]
    extra = {k: data[k] for k in DATAMODULE_KEYS if data.get(k) is not None}
    dm = ActivationDataModule(model["name_or_path"], hooks, data.get("source", "files"), data["path"],
                              model_dtype=model.get("dtype", "float32"), seed=seed, **extra)
    dm.model = load_model(model["name_or_path"], model.get("dtype", "float32"), device)
    dm.setup()
    return dm


def eval_contexts(dm: ActivationDataModule, meta: dict) -> torch.Tensor:
    """The first held-out contexts, enough for ``data.eval_tokens`` tokens."""
    return dm.heldout_contexts[: max(1, math.ceil(meta["data"].get("eval_tokens", 65536) / dm.context_length))]


def fit_noting_warnings(kind: str, x: torch.Tensor, hook: HookPoint, seed: int):
    """``fit``, with each warning of the fit (FastICA not converging) printed once per hook, naming it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        basis = fit(kind, x, seed)
    for w in caught:
        print(f"warning: {kind} at {hook.name}: {w.message}", file=sys.stderr)
    return basis


def fit_baselines(x: torch.Tensor, kinds: list[str], hook: HookPoint, meta: dict, seed: int) -> list[Entry]:
    """Each baseline fitted on training activations ``x`` at ``hook``."""
    base = {"model": meta["model"], "hook": meta["hook"], "data": meta["data"]}
    return [
        Entry(f"baselines/{hook.name}/{kind}", kind, fit_noting_warnings(kind, x, hook, seed),
              {**base, "baseline": kind, "fit_tokens": len(x)})
        for kind in kinds
    ]


def sparsified(baselines: list[Entry], l0s: list[float]) -> list[Entry]:
    """Each baseline kept to its top k codes, one k per distinct rounded L0 of the dictionaries at this hook."""
    ks = sorted({matched_k(v) for v in l0s})
    return [
        Entry(f"{b.name}_topk{k}", f"{b.kind}_topk", b.dictionary.with_top_k(k), b.meta)
        for b in baselines for k in ks
        if k < b.dictionary.n_features
    ]


def evaluate_hook(dm: ActivationDataModule, hook: HookPoint, dictionaries: list[Entry], cfg: DictConfig) -> list[tuple[Entry, dict]]:
    """Metrics of the dictionaries at one hook and of the baselines fitted (and sparsified) there."""
    meta = dictionaries[0].meta
    contexts = eval_contexts(dm, meta)
    entries, heldout = list(dictionaries), None
    if cfg.baselines:
        x = dm.sample(cfg.baseline_tokens)[hook.name]
        dense = fit_baselines(x, list(cfg.baselines), hook, meta, cfg.seed)
        heldout = hook_activations(dm.model, hook, contexts, dm.special_ids)
        l0s = [l0(e.dictionary.to(heldout.device).encode(heldout)).item() for e in dictionaries]
        entries += dense + sparsified(dense, l0s)
    metrics = heldout_metrics_many(dm.model, {e.name: e.dictionary for e in entries}, hook, contexts, dm.special_ids,
                                   activations=heldout)
    return [(e, metrics[e.name]) for e in entries]


def _row(entry: Entry, metrics: dict) -> dict:
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    k = getattr(entry.dictionary, "k", None)  # codes kept per input: TopK dictionaries and top-k baselines
    return {"name": entry.name, "kind": entry.kind, "layer": entry.hook.layer, "site": entry.hook.site, "k": k, **scalars}


def write_entry(out: Path, entry: Entry, metrics: dict) -> None:
    """``<out>/<name>/eval.json`` (and a baseline's weights beside it)."""
    directory = out / entry.name
    if entry.kind != "dictionary":
        save_dictionary(entry.dictionary, directory, entry.meta)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "eval.json", {"name": entry.name, "kind": entry.kind, "model": entry.meta["model"],
                                         "hook": entry.meta["hook"], "data": entry.meta["data"], "metrics": metrics})


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    """All rows in one CSV (the key ``columns`` first), written atomically."""
    fields = columns + sorted({k for r in rows for k in r} - set(columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    Path(f"{path}.tmp").write_text(buffer.getvalue())
    os.replace(f"{path}.tmp", path)


def evaluate(cfg: DictConfig) -> list[dict]:
    """Evaluate every dictionary under ``cfg.run`` (and the requested baselines); return the ``eval.csv`` rows.

    ``analysis=features`` analyses their features instead (``sae.analysis``).
    """
    entries = validate(cfg)
    if cfg.analysis == "features":
        from sae.analysis import analyse_features

        return analyse_features(cfg, entries)
    from sae.plots import plot_all

    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    results: list[tuple[Entry, dict]] = []
    for key in dict.fromkeys(group_key(e) for e in entries):
        group = [e for e in entries if group_key(e) == key]
        hooks = list(dict.fromkeys(e.hook for e in group))
        dm = make_datamodule(group[0].meta, hooks, device, cfg.seed)
        for hook in hooks:
            results += evaluate_hook(dm, hook, [e for e in group if e.hook == hook], cfg)
    for entry, metrics in results:
        write_entry(out, entry, metrics)
    rows = [_row(e, m) for e, m in results]
    plot_all(out / "plots", rows, results)
    if cfg.baselines:
        matched = compare(rows)
        write_csv(out / "comparison.csv", matched, list(matched[0]))
        print(markdown(matched))
    write_csv(out / "eval.csv", rows)
    print(f"wrote {out / 'eval.csv'} ({len(rows)} rows) and {out / 'plots'}")
    return rows
