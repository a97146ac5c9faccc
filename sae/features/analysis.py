"""``evaluate.py analysis=features``: feature records, ``monosemanticity.csv`` and the static dashboard for every
dictionary under ``run`` and the baselines (``analysis.baselines``) fitted at the same hooks."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from sae.evaluation.entries import Entry, baseline_problems, eval_tokens, fit_baselines, groups, session_for
from sae.evaluation.studies import settings_of
from sae.features.config import FeaturesSettings
from sae.features.dashboard import write_dashboard
from sae.features.monosemanticity import SCORES, summarise
from sae.features.plots import plot_feature
from sae.features.records import Collector, Settings
from sae.io.atomic import write_csv, write_json
from sae.lm.model import resolve_device

EXPLANATIONS = Path("autointerp") / "explanations.json"  # under `out`: written by analysis=autointerp, read by path
SETTING_MINIMA = {"top_k": 1, "window": 0, "quantiles": 1, "per_quantile": 0, "min_count": 1, "causal_contexts": 0,
                  "logit_tokens": 1, "hist_tokens": 1, "bins": 1}  # the least each analysis.settings.* may be


def settings_problems(settings: FeaturesSettings) -> list[str]:
    """What is wrong with ``analysis=features``'s settings (their types Hydra has checked)."""
    problems = baseline_problems(settings.baselines, "analysis.baselines")
    return problems + [f"analysis.settings.{k}={v} must be >= {low}" for k, v in asdict(settings.settings).items()
                       if k in SETTING_MINIMA and v < (low := SETTING_MINIMA[k])]


def method_name(entry: Entry, n_dictionaries: int, n_hooks: int) -> str:
    """The dashboard's folder name for an entry (analysis=circuits links to it): ``dictionary`` (with its name when
    there are several), or the baseline's kind (with its hook when several)."""
    if entry.kind == "dictionary":
        return "dictionary" if n_dictionaries == 1 else f"dictionary_{entry.name.replace('/', '_')}"
    return entry.kind if n_hooks == 1 else f"{entry.kind}_{entry.hook.name}"


def collectors(entries: list[Entry], cfg: DictConfig, n_dictionaries: int) -> Iterator[tuple[str, Entry, Collector]]:
    """A Collector per dictionary (all sharing one model and text) and per baseline fitted at its hook."""
    analysis: FeaturesSettings = settings_of(cfg)
    settings = Settings(**asdict(analysis.settings), seed=cfg.seed)
    meta = entries[0].meta
    hooks = list(dict.fromkeys(e.hook for e in entries))
    session = session_for(meta, resolve_device(cfg.device), cfg.seed)
    contexts = session.eval_contexts(eval_tokens(meta))
    for hook in hooks:
        at_hook = [e for e in entries if e.hook == hook]
        if analysis.baselines:
            sample = session.sample([hook], cfg.baseline_tokens)[hook.name]
            at_hook += fit_baselines(sample, analysis.baselines, hook, meta, cfg.seed)
        for entry in at_hook:
            collector = Collector(session, entry.dictionary, hook, contexts, settings)
            yield method_name(entry, n_dictionaries, len(hooks)), entry, collector


def summary_row(method: str, entry: Entry, collector: Collector) -> dict:
    scores = summarise(collector.scores, collector.live, collector.density)
    return {"method": method, **scores, "name": entry.name, "layer": entry.hook.layer, "site": entry.hook.site}


def analyse_features(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Analyse the dictionaries ``entries`` (``sae.evaluation.entries.validate``'s); write ``monosemanticity.csv``,
    ``features/`` and ``dashboard/`` under ``out``."""
    out = Path(cfg.out)
    rows, methods, tokenizer = [], {}, None
    analysed = (c for group in groups(entries) for c in collectors(group, cfg, len(entries)))
    for method, entry, collector in analysed:
        tokenizer = collector.session.tokenizer
        records = collector.records(method)
        methods[method] = {"name": entry.name, "hook": entry.hook.name, "features": records}
        (out / "features").mkdir(parents=True, exist_ok=True)
        write_json(out / "features" / f"{method}.json", methods[method])
        rows.append(summary_row(method, entry, collector))
    names = token_names(tokenizer, methods)
    published = Path(cfg.get("published") or out)  # where earlier studies' results are (out is this one's staging)
    write_dashboard(out / "dashboard", methods, names, rows, read_explanations(published, methods))
    _figures(out / "figures", methods, names, settings_of(cfg).figures)
    write_csv(out / "monosemanticity.csv", rows, ["method", *SCORES])
    print(f"wrote monosemanticity.csv ({len(rows)} rows) and dashboard/index.html")
    return rows


def read_explanations(out: Path, methods: dict) -> dict[str, dict[int, tuple[str, str]]]:
    """The automatic explanations under ``out`` (analysis=autointerp's ``autointerp/explanations.json``: entry name
    -> feature index -> text), by this study's method names; empty when there are none."""
    path = out / EXPLANATIONS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    by = saved.get("explainer", "?") + (f"; {saved['label']}" if saved.get("label") else "")
    return {method: {int(i): (text, by) for i, text in saved["entries"].get(data["name"], {}).items()}
            for method, data in methods.items()}


def redraw_dashboard(source: Path, target: Path, tokenizer) -> None:
    """Write ``target/dashboard/`` again from the ``features/*.json`` and ``monosemanticity.csv`` saved under
    ``source``, with the automatic explanations under ``target`` (analysis=autointerp calls it when it runs after
    this study; ``target`` is its staging directory, published over ``source``)."""
    methods = {p.stem: json.loads(p.read_text()) for p in sorted((source / "features").glob("*.json"))}
    with open(source / "monosemanticity.csv", newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    write_dashboard(
        target / "dashboard", methods, token_names(tokenizer, methods), rows, read_explanations(target, methods)
    )


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def token_names(tokenizer, methods: dict) -> dict[int, str]:
    """Display text of every token id any record mentions."""
    ids: set[int] = set()
    for method in methods.values():
        for rec in method["features"]:
            ids.update(
                t
                for ex in rec.get("top", []) + [e for q in rec.get("quantiles", []) for e in q["examples"]]
                for t in ex["tokens"]
            )
            ids.update(
                t
                for table in ("direct", "causal")
                for side in ("up", "down")
                for t, _ in rec.get(table, {}).get(side, [])
            )
            ids.update(t for t, _ in rec.get("top_tokens", []))
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def _figures(directory: Path, methods: dict, names: dict[int, str], n: int) -> None:
    """PNGs of the ``n`` most monosemantic live features of each method."""
    for method, data in methods.items():
        live = sorted((r for r in data["features"] if r["live"]), key=lambda r: -r["top_token_share"])
        for rec in live[:n]:
            plot_feature(
                rec,
                names,
                directory / method / f"{rec['index']}.png",
                f"{method} feature {rec['index']} ({data['hook']})",
            )
