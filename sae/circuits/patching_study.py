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

from omegaconf import DictConfig

from sae.circuits.config import FORWARD_PASSES_NOTICE, IoiTaskSettings, PairsTaskSettings, PatchingSettings
from sae.circuits.curves import summarise, write_curves, write_summary
from sae.circuits.patching import CurveSettings, PatchingProblem, patching_curves
from sae.circuits.plots import plot_patching_hooks
from sae.circuits.tasks import Task, build_task
from sae.errors import ConfigError
from sae.evaluation.entries import Entry, baseline_problems, fit_baselines, groups, session_for
from sae.evaluation.studies import settings_of
from sae.io.atomic import write_json
from sae.lm.model import model_label, resolve_device


def settings_problems(settings: PatchingSettings) -> list[str]:
    """What is wrong with ``analysis=patching``'s settings (reported with every other problem, before any model runs;
    their types Hydra has checked)."""
    problems = baseline_problems(settings.baselines, "analysis.baselines")
    try:
        CurveSettings.from_settings(settings)
    except ConfigError as err:
        problems.append(str(err))
    if not 0 < settings.target_fraction <= 1:
        problems.append(f"analysis.target_fraction={settings.target_fraction} must be in (0, 1]")
    if settings.batch_size < 1:
        problems.append(f"analysis.batch_size={settings.batch_size} must be an integer >= 1")
    return problems


def task_settings(cfg: DictConfig):
    """The ``task`` group's settings object (``sae.circuits.config``); one line when none is chosen."""
    task = settings_of(cfg, "task")
    if task is None:
        raise ConfigError(
            "analysis=patching needs a task: task=ioi [task.vocabulary=<json>] or task=pairs task.path=<jsonl>"
        )
    if not isinstance(task, (IoiTaskSettings, PairsTaskSettings)):
        raise ConfigError(f"unknown task {task!r}; use task=ioi or task=pairs (conf/task/)")
    return task


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


def _check_greedy_layers(greedy_at: list[str] | None, settings: CurveSettings, studied: set[str]) -> None:
    """A hook in ``analysis.greedy.layers`` that is not studied would silently run no greedy at all: one line."""
    missing = sorted(set(greedy_at or []) - studied)
    if "greedy" in settings.orderings and missing:
        raise ConfigError(f"analysis.greedy.layers: {missing} not among the hooks studied {sorted(studied)}")


def _method(entry: Entry) -> str:
    return entry.name if entry.kind == "dictionary" else entry.kind


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _group_rows(cfg: DictConfig, analysis: PatchingSettings, group: list[Entry], task: Task, settings: CurveSettings,
                timings: list) -> list[dict]:
    """Every curve of one model's dictionaries and baselines on ``task``."""
    meta = group[0].meta
    label = model_label(meta["model"]["name_or_path"])
    session = session_for(meta, resolve_device(cfg.device), cfg.seed)
    greedy_at = analysis.greedy.layers or []
    rows: list[dict] = []
    for hook in _hooks(group, analysis.hooks or []):
        at_hook = [e for e in group if e.hook == hook]
        if analysis.baselines:
            sample = session.sample([hook], cfg.baseline_tokens)[hook.name]
            at_hook += fit_baselines(sample, list(analysis.baselines), hook, at_hook[0].meta, cfg.seed)
        here = settings
        if greedy_at and hook.name not in greedy_at:
            here = dataclasses.replace(settings, orderings=tuple(o for o in settings.orderings if o != "greedy"))
        for entry in at_hook:
            if not here.orderings:
                continue
            start = time.perf_counter()
            problem = PatchingProblem(session.model, session.special_ids, hook, entry.dictionary, task.pairs,
                                      analysis.batch_size)
            rows += patching_curves(problem, here, method=_method(entry), hook=hook.name, model=label,
                                    progress=_log)
            seconds = time.perf_counter() - start
            timings.append({"model": label, "method": _method(entry), "hook": hook.name,
                            "orderings": list(here.orderings), "live_features": int(problem.live().sum()),
                            "seconds": round(seconds, 1)})
            _log(f"patching: {label} {_method(entry)} at {hook.name}: {seconds:.1f} s")
    return rows


def _notice_cost(analysis: PatchingSettings, settings: CurveSettings, by_model: list[list[Entry]],
                 tasks: list[Task]) -> None:
    """One line at the start when the run's estimated forward passes exceed ``FORWARD_PASSES_NOTICE`` (each
    dictionary's width standing in for its live features, which are not known before the model runs)."""
    total = 0
    for group, task in zip(by_model, tasks):
        batches = len({p.length for p in task.pairs}) + len(task.pairs) // analysis.batch_size
        methods = len(analysis.baselines)
        for hook in _hooks(group, analysis.hooks or []):
            here = [e for e in group if e.hook == hook]
            greedy = not analysis.greedy.layers or hook.name in analysis.greedy.layers
            s = settings if greedy else dataclasses.replace(settings, orderings=tuple(
                o for o in settings.orderings if o != "greedy"))
            width = max(e.dictionary.n_features for e in here)
            total += sum(s.forward_passes(e.dictionary.n_features, batches) for e in here)
            total += methods * s.forward_passes(width, batches)
    if total > FORWARD_PASSES_NOTICE:
        bound = "analysis.greedy.max_candidates or analysis.greedy.thresholds.n (or drop greedy from " \
            "analysis.orderings)" if "greedy" in settings.orderings else "analysis.attribution.points or analysis.hooks"
        _log(f"patching: about {total:,} batched forward passes estimated (up to); bound them with {bound}")


def study(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Patch every dictionary in ``entries`` (``sae.evaluation.entries.validate``'s) and the baselines on the task's
    pairs; write the curves, the plots, the task record and the summary under ``out``. Returns the summary rows."""
    analysis: PatchingSettings = settings_of(cfg)
    settings = CurveSettings.from_settings(analysis)
    task_cfg = task_settings(cfg)
    by_model = groups(entries)
    tasks = [
        build_task(task_cfg, session_for(g[0].meta, "cpu", cfg.seed).tokenizer) for g in by_model
    ]  # no weights yet
    studied = {h.name for group in by_model for h in _hooks(group, analysis.hooks or [])}
    _check_greedy_layers(analysis.greedy.layers, settings, studied)
    _notice_cost(analysis, settings, by_model, tasks)
    out = Path(cfg.out)
    clear_stale(out)
    rows, timings, start = [], [], time.perf_counter()
    for group, task in zip(by_model, tasks):
        _log(f"patching: task {task.name} ({task.split}): {len(task.pairs)} pairs, {task.dropped} dropped "
             "(prompts of unequal token length)")
        rows += _group_rows(cfg, analysis, group, task, settings, timings)
    if not rows:
        raise ConfigError("analysis=patching: nothing to patch (analysis.orderings is empty?)")
    fraction = analysis.target_fraction
    summary = summarise(rows, fraction)
    labels = sorted({r["model"] for r in rows})
    title = f"{', '.join(labels)}; task {tasks[0].name} ({tasks[0].split}, {len(tasks[0].pairs)} pairs)"
    write_curves(out / "patching" / "curves.csv", rows)
    plots = plot_patching_hooks(rows, out / "plots", title, "all", fraction)
    write_json(out / "patching" / "task.json", {"tasks": [t.summary() for t in tasks],
                                                "settings": dataclasses.asdict(analysis),
                                                "timings": timings, "seconds": round(time.perf_counter() - start, 1)})
    write_summary(out / "patching" / "summary.csv", summary)  # last: a summary means the run finished
    print(f"wrote {out / 'patching' / 'curves.csv'} ({len(rows)} rows), {out / 'patching' / 'summary.csv'} and "
          f"{len(plots)} plot(s) under {out / 'plots'}")
    return summary
