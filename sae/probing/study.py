"""``evaluate.py analysis=probing``: k-sparse probing of every dictionary under ``run``, of the baselines fitted at
the same hooks and of the raw activations there, on each task of ``analysis.tasks``.

Per task: the texts are read once (all hooks in one cut-off LM pass per batch), each method's latents pooled per
text; then per split seed the balanced one-vs-rest problems, per k the k latents chosen on the training split by
class-mean difference and a logistic regression. Writes ``probing.csv``, ``probing.json`` (every split's
accuracy), ``plots/probing.png`` and, with ``analysis.saebench``, ``saebench/sparse_probing/<dictionary>.json``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sae.errors import ConfigError
from sae.evaluation.entries import Entry, baseline_problems, fit_baselines, groups, session_for
from sae.evaluation.studies import settings_of
from sae.io.atomic import write_csv, write_json
from sae.lm.model import resolve_device
from sae.lm.text import separators
from sae.probing.config import ProbingSettings
from sae.probing.plots import plot_probing
from sae.probing.pooling import Method, pooled_latents, tokenize
from sae.probing.probe import interval, ks_for, probe_accuracy, problems
from sae.probing.saebench import write_sparse_probing
from sae.probing.tasks import Task, load_task, spec_problems, subsample

COLUMNS = ["method", "hook", "task", "k", "accuracy", "ci_low", "ci_high", "sd", "n_seeds", "n_train", "n_test",
           "width", "pooling"]
OUTPUTS = ["probing.csv", "probing.json", "plots/probing.png", "saebench/sparse_probing"]


def settings_problems(s: ProbingSettings) -> list[str]:
    """Every problem with the settings, found before any model loads (task files exist; lines are read later)."""
    out = baseline_problems(s.baselines, "analysis.baselines")
    if importlib.util.find_spec("sklearn") is None:
        out.append('analysis=probing needs scikit-learn: pip install -e ".[probing]"')
    if not s.tasks:
        out.append("analysis.tasks is empty: give JSONL files of {text, label} lines or hub task names, "
                   "'analysis.tasks=[my_task.jsonl]'")
    for spec in s.tasks:
        out += spec_problems(spec)
    if any(k < 1 for k in s.ks) or not (s.ks or s.dense):
        out.append(f"analysis.ks={s.ks} must be integers >= 1 (with analysis.dense=true, [] probes all latents only)")
    out += [f"analysis.{name}={getattr(s, name)} must be >= 1" for name in
            ("seeds", "max_tokens", "batch_size", "max_iter", "hub_per_class") if getattr(s, name) < 1]
    if s.max_per_class is not None and s.max_per_class < 2:
        out.append(f"analysis.max_per_class={s.max_per_class} must be >= 2 (or null: every text)")
    if not 0 < s.test_fraction < 1:
        out.append(f"analysis.test_fraction={s.test_fraction} must be in (0, 1)")
    if s.C <= 0:
        out.append(f"analysis.C={s.C} must be > 0")
    if s.pooling not in ("mean", "max"):
        out.append(f"analysis.pooling={s.pooling}: expected mean or max")
    return out


def dictionary_name(entry: Entry, entries: list[Entry]) -> str:
    """``dictionary`` when each hook has one (a line across layers), else ``dictionary_<name>``."""
    per_hook = max(sum(e.hook == h for e in entries) for h in {e.hook for e in entries})
    return "dictionary" if per_hook == 1 else f"dictionary_{entry.name.replace('/', '_')}"


def entry_method(name: str, entry: Entry, device: torch.device) -> Method:
    dictionary = entry.dictionary.to(device).eval()
    return Method(name, entry.hook, dictionary.encode, dictionary.n_features, entry)


def methods_for(group: list[Entry], settings: ProbingSettings, samples: dict, seed: int,
                device: torch.device) -> list[Method]:
    """The dictionaries, then at each hook the baselines fitted there and the raw activations."""
    out = [entry_method(dictionary_name(e, group), e, device) for e in group]
    for hook in dict.fromkeys(e.hook for e in group):
        meta = next(e.meta for e in group if e.hook == hook)
        if settings.baselines:
            for b in fit_baselines(samples[hook.name].to(device), list(settings.baselines), hook, meta, seed):
                out.append(entry_method(b.kind, b, device))
        if settings.raw:
            out.append(Method("raw", hook, lambda x: x, next(e.dictionary.d_in for e in group if e.hook == hook)))
    return out


def score(task: Task, latents: dict, methods: list[Method], settings: ProbingSettings) -> tuple[list, list]:
    """``probing.csv``'s rows for one task, and every split's accuracy (``probing.json``)."""
    splits = [problems(task.labels, settings.test_fraction, seed) for seed in range(settings.seeds)]
    rows, details = [], []
    for m in tqdm(methods, desc=f"probes on {task.name}"):
        x = latents[(m.name, m.hook.name)]
        for k in ks_for(m.width, list(settings.ks), settings.dense):
            per_seed = [float(np.mean([probe_accuracy(x, p, k, settings.C, settings.max_iter) for p in split]))
                        for split in splits]
            mean, low, high, sd = interval(per_seed)
            rows.append({"method": m.name, "hook": m.hook.name, "task": task.name, "k": k, "accuracy": mean,
                         "ci_low": low, "ci_high": high, "sd": sd, "n_seeds": len(per_seed),
                         "n_train": len(splits[0][0].train), "n_test": len(splits[0][0].test), "width": m.width,
                         "pooling": settings.pooling, "layer": m.hook.layer, "n_problems": len(splits[0])})
            details.append({"method": m.name, "hook": m.hook.name, "task": task.name, "k": k, "per_seed": per_seed})
    return rows, details


def study(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Probe every dictionary, baseline and raw basis on every task; write the outputs under ``out``."""
    settings: ProbingSettings = settings_of(cfg)
    out, device = Path(cfg.out), resolve_device(cfg.device)
    tasks = [subsample(load_task(spec, settings.hub_per_class), settings.max_per_class, cfg.seed)
             for spec in settings.tasks]
    rows, details, all_methods = [], [], []
    for group in groups(entries):
        session = session_for(group[0].meta, device, cfg.seed)
        special = session.special_ids
        ids = {t.name: tokenize(t.texts, session.tokenizer, settings.max_tokens, special, f"task {t.name}")
               for t in tasks}  # every task's texts checked before the model loads
        hooks = list(dict.fromkeys(e.hook for e in group))
        samples = session.sample(hooks, cfg.baseline_tokens) if settings.baselines else {}
        methods = methods_for(group, settings, samples, cfg.seed, device)
        all_methods += methods
        _, pad = separators(session.tokenizer)
        for task in tasks:
            latents = pooled_latents(session.model, methods, ids[task.name], special, pad, settings.batch_size,
                                     settings.pooling, desc=f"reading {task.name}")
            task_rows, task_details = score(task, latents, methods, settings)
            rows += task_rows
            details += task_details
    if not rows:
        raise ConfigError("no probe was trained: every method is narrower than the smallest k; lower analysis.ks")
    write_csv(out / "probing.csv", rows, COLUMNS)
    write_json(out / "probing.json", {"settings": OmegaConf.to_container(cfg.analysis, resolve=True),
                                      "tasks": {t.name: {"n_texts": len(t.texts), "classes": t.classes} for t in tasks},
                                      "splits": details})
    label = settings.label or f"LM {Path(str(entries[0].meta['model']['name_or_path'])).name}"
    plot_probing(rows, out / "plots" / "probing.png", f"{label}; {settings.pooling}-pooled; 95% t-intervals over "
                 f"{settings.seeds} splits")
    if settings.saebench:
        write_sparse_probing(out / "saebench" / "sparse_probing", rows, all_methods, settings, tasks)
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['task']:>16} {r['hook']:>18} {r['method']:>12} k={r['k']!s:>5} "
              f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
