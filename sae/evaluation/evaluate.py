"""``evaluate.py analysis=metrics``: held-out metrics of every dictionary under ``run`` and of the baselines fitted at
the same hooks: ``eval.json`` each, one ``eval.csv``, ``comparison.csv`` and plots.

Everything goes under ``out`` (default ``<run>/eval``): ``eval.csv``, ``plots/``, and one directory per row,
``<out>/<name>/`` with its ``eval.json`` (baselines also keep their fitted weights there, as ``sae.safetensors`` +
``sae.json``). Bad input is found before any model runs, so a failed evaluation leaves no ``eval.csv``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sae.evaluation.comparison import compare, markdown
from sae.evaluation.config import MetricsSettings
from sae.evaluation.entries import Entry, baseline_problems, eval_tokens, fit_baselines, groups, session_for, sparsified
from sae.evaluation.heldout import heldout_metrics_many
from sae.evaluation.metrics import l0
from sae.evaluation.perplexity import objective_of, plot_ce_vs_l0, ppl_table
from sae.evaluation.plots import _model_label, plot_all
from sae.evaluation.saebench import core_output, write_result
from sae.evaluation.studies import settings_of
from sae.io.atomic import write_csv, write_json
from sae.io.saving import save_dictionary
from sae.lm.hooks import HookPoint
from sae.lm.model import resolve_device
from sae.lm.session import LMSession

COLUMNS = ["name", "kind", "layer", "site", "l0", "fvu", "ce_loss_recovered", "kl_spliced"]
# what this study writes under ``out`` (sae.evaluation.studies removes the old ones when a new evaluation is published,
# so a dictionary or baseline the new one no longer has leaves no eval.json, comparison.csv or plot behind)
OUTPUTS = ["eval.csv", "comparison.csv", "**/eval.json", "baselines", "plots/frontier.png", "plots/by_layer.png",
           "plots/ce_vs_l0.png", "plots/density", "saebench/core"]


def settings_problems(settings: MetricsSettings) -> list[str]:
    return baseline_problems(settings.baselines, "analysis.baselines")


def evaluate_hook(
    session: LMSession, hook: HookPoint, dictionaries: list[Entry], cfg: DictConfig
) -> list[tuple[Entry, dict]]:
    """Metrics of the dictionaries at one hook and of the baselines fitted (and sparsified) there."""
    meta = dictionaries[0].meta
    contexts = session.eval_contexts(eval_tokens(meta))
    entries, heldout, kinds = list(dictionaries), None, list(settings_of(cfg).baselines)
    if kinds:
        x = session.sample([hook], cfg.baseline_tokens)[hook.name]
        dense = fit_baselines(x, kinds, hook, meta, cfg.seed)
        heldout = session.read([hook], contexts)[hook.name]
        l0s = [l0(e.dictionary.to(heldout.device).encode(heldout)).item() for e in dictionaries]
        entries += dense + sparsified(dense, l0s)
    metrics = heldout_metrics_many(session.model, {e.name: e.dictionary for e in entries}, hook, contexts,
                                   session.special_ids, activations=heldout)
    return [(e, metrics[e.name]) for e in entries]


def _row(entry: Entry, metrics: dict) -> dict:
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    k = getattr(entry.dictionary, "k", None)  # codes kept per input: TopK dictionaries and top-k baselines
    return {"name": entry.name, "kind": entry.kind, "layer": entry.hook.layer, "site": entry.hook.site, "k": k,
            "objective": objective_of(entry.meta), **scalars}


def write_entry(out: Path, entry: Entry, metrics: dict) -> None:
    """``<out>/<name>/eval.json`` (and a baseline's weights beside it)."""
    directory = out / entry.name
    if entry.kind != "dictionary":
        save_dictionary(entry.dictionary, directory, entry.meta)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "eval.json", {"name": entry.name, "kind": entry.kind, "model": entry.meta["model"],
                                         "hook": entry.meta["hook"], "data": entry.meta["data"], "metrics": metrics})


def evaluate(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Evaluate ``entries`` (and the requested baselines); return the ``eval.csv`` rows."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    results: list[tuple[Entry, dict]] = []
    for group in groups(entries):
        session = session_for(group[0].meta, device, cfg.seed)
        for hook in dict.fromkeys(e.hook for e in group):
            results += evaluate_hook(session, hook, [e for e in group if e.hook == hook], cfg)
    for entry, metrics in results:
        write_entry(out, entry, metrics)
        if entry.kind == "dictionary" and "saebench" in metrics:  # SAEBench's core eval output, its definitions
            write_result(out / "saebench" / "core", entry.name, core_output(entry.name, entry.meta, entry.dictionary,
                                                                            metrics))
    rows = [_row(e, m) for e, m in results]
    plot_all(out / "plots", rows, results)
    plot_ce_vs_l0(rows, out / "plots" / "ce_vs_l0.png", _model_label(results))
    print(ppl_table(rows))
    if settings_of(cfg).baselines:
        matched = compare(rows)
        write_csv(out / "comparison.csv", matched, list(matched[0]))
        print(markdown(matched))
    write_csv(out / "eval.csv", rows, COLUMNS)
    print(f"wrote eval.csv ({len(rows)} rows) and plots/")
    return rows
