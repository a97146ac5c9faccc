"""Which dictionaries an evaluation or a study works on: found under ``run``, loaded, checked, grouped by the model
and text they were trained on (one LM session per group), and the baselines fitted beside them.

Bad input is found here, before any model runs, and every problem is reported in one line.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from sae.baselines import fit
from sae.dictionaries import Dictionary
from sae.errors import ConfigError
from sae.evaluation.comparison import matched_k
from sae.io.checkpoints import read_status
from sae.io.saelens import is_saelens_dir, load_saelens
from sae.io.saving import META, load, read_meta
from sae.lm.hooks import HookPoint, check_hook, site_width
from sae.lm.model import check_context_length, load_config
from sae.lm.session import LMSession, TextSettings


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
        raise ConfigError(
            f"no dictionary under '{run}': expected {META} (ours) or cfg.json + sae_weights.safetensors (SAELens)"
        )
    return found


def _with_overrides(meta: dict, cfg: DictConfig) -> dict:
    """``meta`` with the non-null ``model.*``, ``data.*``, ``stream.*`` and ``eval_tokens`` of the command line
    applied."""
    def merged(key: str) -> dict:
        return {**(meta.get(key) or {}), **{k: v for k, v in cfg[key].items() if v is not None}}

    data = merged("data")
    if cfg.eval_tokens is not None:
        data["eval_tokens"] = cfg.eval_tokens
    return {**meta, "model": merged("model"), "data": data, "stream": merged("stream")}


def check_finished(directory: Path) -> None:
    """Raise ConfigError if the training run that wrote ``directory`` (its own ``status.json``, or its set's, one
    level up) has not finished: a set killed while saving holds some members and not others, and a run that failed
    after saving may hold a dictionary it never evaluated. Directories without one (SAELens', older runs) pass."""
    for run_dir in (directory, directory.parent):
        state = read_status(run_dir)
        if state is not None:
            if state != "finished":
                raise ConfigError(f"{directory}: the run in {run_dir} has not finished (status: {state}); resume it "
                                  "with train.py ... resume=true, then evaluate it")
            return


def load_entry(directory: Path, run: Path, cfg: DictConfig) -> Entry:
    """A discovered dictionary with its metadata (command-line overrides applied); named by its path under ``run``."""
    check_finished(directory)
    dictionary, meta = load_saelens(directory) if is_saelens_dir(directory) else (load(directory), read_meta(directory))
    name = directory.relative_to(run).as_posix()
    return Entry(run.resolve().name if name == "." else name, "dictionary", dictionary, _with_overrides(meta, cfg))


def check_entry(entry: Entry) -> None:
    """Raise ConfigError if the entry's model, hook or data cannot be used, or its width does not match the hook."""
    model, data = entry.meta["model"], entry.meta["data"]
    if entry.meta.get("ground_truth") is not None or entry.meta.get("hook") is None:
        raise ConfigError(f"{entry.name}: trained on toy data (no LM, no hook point), which evaluate.py cannot splice "
                          "into a model; its held-out toy metrics (MMCS included) are in its metrics.json")
    if not model.get("name_or_path"):
        raise ConfigError(f"{entry.name}: no model recorded; set model.name_or_path=...")
    if not data.get("path"):
        raise ConfigError(f"{entry.name}: no text recorded; set data.source=files data.path=...")
    try:
        TextSettings.from_record(data)
    except ConfigError as err:
        raise ConfigError(f"{entry.name}: {err}") from None
    config = load_config(model["name_or_path"])
    check_hook(entry.hook, getattr(config, "num_hidden_layers", None) or config.n_layer)
    check_context_length(data["context_length"], config, f"{entry.name}: data.context_length")
    width = site_width(config, entry.hook.site)
    if entry.dictionary.d_in != width:
        raise ConfigError(
            f"{entry.name}: the dictionary's width d_in={entry.dictionary.d_in} does not match {entry.hook.name} of "
            f"'{model['name_or_path']}' (width {width}); evaluate it with the model it was trained on"
        )


def validate(cfg: DictConfig, problems: list[str] | None = None) -> list[Entry]:
    """Check the settings every study shares and every dictionary under ``cfg.run`` before any model runs; the
    study's own ``problems`` are reported in the same line. Returns the dictionaries to work on."""
    problems = list(problems or [])
    if cfg.baseline_tokens <= 0:
        problems.append(f"baseline_tokens={cfg.baseline_tokens} must be > 0")
    if cfg.eval_tokens is not None and cfg.eval_tokens <= 0:
        problems.append(f"eval_tokens={cfg.eval_tokens} must be > 0 (or null: each dictionary's data.eval_tokens)")
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


def baseline_problems(kinds, key: str) -> list[str]:
    """A study's ``baselines`` setting, checked against the registered baselines."""
    from sae.baselines import BASELINES

    unknown = [n for n in kinds if n not in BASELINES]
    return [f"unknown baselines {unknown}; choose from {key}=[{','.join(BASELINES)}]"] if unknown else []


def group_key(entry: Entry) -> str:
    return json.dumps({"model": entry.meta["model"], "data": entry.meta["data"]}, sort_keys=True)


def groups(entries: list[Entry]) -> list[list[Entry]]:
    """The entries grouped by the model and text they were trained on, in order of first appearance."""
    keys = list(dict.fromkeys(map(group_key, entries)))
    return [[e for e in entries if group_key(e) == key] for key in keys]


def session_for(meta: dict, device: torch.device | str, seed: int) -> LMSession:
    """The training run's LM and text (same held-out split, same token store), on ``device``."""
    model, data = meta["model"], meta["data"]
    stream = meta.get("stream") or {}
    lm_batch_size = stream.get("lm_batch_size") or data.get("lm_batch_size") or 32  # older sae.json kept it in data
    return LMSession(model["name_or_path"], TextSettings.from_record(data), model_dtype=model.get("dtype") or "float32",
                     lm_batch_size=lm_batch_size, seed=seed, device=device, token_store_dir=data.get("token_store_dir"),
                     tokenize_procs=data.get("tokenize_procs"))


def eval_tokens(meta: dict) -> int:
    return meta["data"].get("eval_tokens") or 65536


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
