"""``evaluate.py analysis=patching task=<ioi|pairs>``: feature patching of every dictionary under ``run`` and of the
baselines (``analysis.baselines``) fitted at the same hooks, on the prompt pairs of a task.

Per model (a group of dictionaries trained on one model and text, one LM session), per hook the dictionaries cover
and per method at that hook, the pairs' clean runs are cached once (``PatchingProblem``) and the curves of greedy
pruning and of the attribution order are traced. Outputs under ``out``: ``patching/curves.csv``,
``plots/patching_<hook>.png``, ``patching/task.json`` (the pairs kept and dropped, the settings, the wall times) and,
written last, ``patching/summary.csv``. Results of an earlier run are removed before anything runs, so a run that
fails never leaves an old summary beside new curves.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sae.circuits.curves import summarise, write_curves, write_summary
from sae.circuits.patching import CurveSettings, PatchingProblem, patching_curves
from sae.circuits.plots import plot_patching_hooks
from sae.circuits.tasks import Task, build_task
from sae.errors import ConfigError
from sae.evaluation.entries import Entry, baseline_problems, fit_baselines, groups, session_for
from sae.io.atomic import write_json
from sae.lm.model import resolve_device

TASK_KINDS = ("ioi", "pairs")


def _settings(settings: DictConfig) -> dict:
    return OmegaConf.to_container(settings, resolve=True)


def _hook_list(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={value!r} must be a list of hook names such as [layers.3.resid] (or null)")
    return list(value)


def settings_problems(settings: DictConfig) -> list[str]:
    """What is wrong with ``analysis=patching``'s settings (reported with every other problem, before any model
    runs)."""
    values = _settings(settings)
    problems = baseline_problems(values.get("baselines") or [], "analysis.baselines")
    for check in (lambda: CurveSettings.from_config(values), lambda: _hook_list(values.get("hooks"), "analysis.hooks"),
                  lambda: _hook_list((values.get("greedy") or {}).get("layers"), "analysis.greedy.layers")):
        try:
            check()
        except (ConfigError, TypeError, ValueError) as err:
            problems.append(f"analysis.{err}" if not str(err).startswith("analysis.") else str(err))
    fraction = values.get("target_fraction")
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        problems.append(f"analysis.target_fraction={fraction} must be in (0, 1]")
    if not isinstance(values.get("batch_size"), int) or values["batch_size"] < 1:
        problems.append(f"analysis.batch_size={values.get('batch_size')} must be an integer >= 1")
    candidates = (values.get("greedy") or {}).get("max_candidates")
    if candidates is not None and (not isinstance(candidates, int) or candidates < 1):
        problems.append(f"analysis.greedy.max_candidates={candidates} must be an integer >= 1 (or null: all)")
    return problems


def task_settings(cfg: DictConfig) -> dict:
    """The ``task`` group's settings; one line when none is chosen or its kind is unknown."""
    task = cfg.get("task")
    if task is None:
        raise ConfigError(
            "analysis=patching needs a task: task=ioi [task.vocabulary=<json>] or task=pairs task.path=<jsonl>"
        )
    values = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else task
    if not isinstance(values, dict) or values.get("kind") not in TASK_KINDS:
        raise ConfigError(f"unknown task {task!r}; use task=ioi or task=pairs (conf/task/)")
    return values


def model_label(name_or_path: str) -> str:
    """The model's name as figures and tables show it; the project's stand-in models (under fixtures/) say so."""
    path = Path(str(name_or_path))
    return f"{path.name} (stand-in)" if "fixtures" in path.parts else path.name


OUTPUTS = ["patching", "plots/patching_*.png"]  # what this study writes under out (sae.evaluation.studies)


def clear_stale(out: Path) -> None:
    """Remove an earlier patching run's results under ``out`` (only this study's files)."""
    shutil.rmtree(out / "patching", ignore_errors=True)
    for old in (out / "plots").glob("patching_*.png") if (out / "plots").is_dir() else []:
        old.unlink()


def _hooks(entries: list[Entry], chosen: list[str]) -> list:
    covered = list(dict.fromkeys(e.hook for e in entries))
    missing = sorted(set(chosen) - {h.name for h in covered})
    if missing:
        raise ConfigError(f"analysis.hooks: no dictionary at {missing}; the dictionaries cover "
                          f"{[h.name for h in covered]}")
    return [h for h in covered if not chosen or h.name in chosen]


def _check_greedy_layers(analysis: dict, settings: CurveSettings, studied: set[str]) -> None:
    """A hook in ``analysis.greedy.layers`` that is not studied would silently run no greedy at all: one line."""
    greedy_at = _hook_list((analysis.get("greedy") or {}).get("layers"), "analysis.greedy.layers")
    missing = sorted(set(greedy_at) - studied)
    if "greedy" in settings.orderings and missing:
        raise ConfigError(f"analysis.greedy.layers: {missing} not among the hooks studied {sorted(studied)}")


def _method(entry: Entry) -> str:
    return entry.name if entry.kind == "dictionary" else entry.kind


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _group_rows(cfg: DictConfig, group: list[Entry], task: Task, settings: CurveSettings, timings: list) -> list[dict]:
    """Every curve of one model's dictionaries and baselines on ``task``."""
    analysis = _settings(cfg.analysis)
    meta = group[0].meta
    label = model_label(meta["model"]["name_or_path"])
    session = session_for(meta, resolve_device(cfg.device), cfg.seed)
    greedy_at = _hook_list((analysis.get("greedy") or {}).get("layers"), "analysis.greedy.layers")
    rows: list[dict] = []
    for hook in _hooks(group, _hook_list(analysis.get("hooks"), "analysis.hooks")):
        at_hook = [e for e in group if e.hook == hook]
        if analysis.get("baselines"):
            sample = session.sample([hook], cfg.baseline_tokens)[hook.name]
            at_hook += fit_baselines(sample, list(analysis["baselines"]), hook, at_hook[0].meta, cfg.seed)
        here = settings
        if greedy_at and hook.name not in greedy_at:
            here = dataclasses.replace(settings, orderings=tuple(o for o in settings.orderings if o != "greedy"))
        for entry in at_hook:
            if not here.orderings:
                continue
            start = time.perf_counter()
            problem = PatchingProblem(session.model, session.special_ids, hook, entry.dictionary, task.pairs,
                                      int(analysis["batch_size"]))
            rows += patching_curves(problem, here, method=_method(entry), hook=hook.name, model=label,
                                    progress=_log)
            seconds = time.perf_counter() - start
            timings.append({"model": label, "method": _method(entry), "hook": hook.name,
                            "orderings": list(here.orderings), "live_features": int(problem.live().sum()),
                            "seconds": round(seconds, 1)})
            _log(f"patching: {label} {_method(entry)} at {hook.name}: {seconds:.1f} s")
    return rows


def study(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Patch every dictionary in ``entries`` (``sae.evaluation.entries.validate``'s) and the baselines on the task's
    pairs; write the curves, the plots, the task record and the summary under ``out``. Returns the summary rows."""
    analysis = _settings(cfg.analysis)
    settings = CurveSettings.from_config(analysis)
    task_cfg = task_settings(cfg)
    by_model = groups(entries)
    tasks = [
        build_task(task_cfg, session_for(g[0].meta, "cpu", cfg.seed).tokenizer) for g in by_model
    ]  # no weights yet
    studied = {h.name for group in by_model for h in _hooks(group, _hook_list(analysis.get("hooks"), "analysis.hooks"))}
    _check_greedy_layers(analysis, settings, studied)
    out = Path(cfg.out)
    clear_stale(out)
    rows, timings, start = [], [], time.perf_counter()
    for group, task in zip(by_model, tasks):
        _log(f"patching: task {task.name} ({task.split}): {len(task.pairs)} pairs, {task.dropped} dropped "
             "(prompts of unequal token length)")
        rows += _group_rows(cfg, group, task, settings, timings)
    if not rows:
        raise ConfigError("analysis=patching: nothing to patch (analysis.orderings is empty?)")
    fraction = float(analysis["target_fraction"])
    summary = summarise(rows, fraction)
    labels = sorted({r["model"] for r in rows})
    title = f"{', '.join(labels)}; task {tasks[0].name} ({tasks[0].split}, {len(tasks[0].pairs)} pairs)"
    write_curves(out / "patching" / "curves.csv", rows)
    plots = plot_patching_hooks(rows, out / "plots", title, "all", fraction)
    write_json(out / "patching" / "task.json", {"tasks": [t.summary() for t in tasks], "settings": analysis,
                                                "timings": timings, "seconds": round(time.perf_counter() - start, 1)})
    write_summary(out / "patching" / "summary.csv", summary)  # last: a summary means the run finished
    print(f"wrote {out / 'patching' / 'curves.csv'} ({len(rows)} rows), {out / 'patching' / 'summary.csv'} and "
          f"{len(plots)} plot(s) under {out / 'plots'}")
    return summary
