"""``evaluate.py analysis=features``: feature records, ``monosemanticity.csv`` and the static dashboard for every
dictionary under ``run`` and the baselines (``features.baselines``) fitted at the same hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from sae.dashboard import write_dashboard
from sae.evaluate import Entry, eval_contexts, fit_baselines, group_key, make_datamodule, write_csv
from sae.features import Collector, Settings
from sae.model import load_tokenizer, resolve_device
from sae.monosemanticity import SCORES, summarise
from sae.plots import plot_feature
from sae.saving import write_json


def _method(entry: Entry, n_dictionaries: int, n_hooks: int) -> str:
    """``dictionary`` (with its name when there are several), or the baseline's kind (with its hook when several)."""
    if entry.kind == "dictionary":
        return "dictionary" if n_dictionaries == 1 else f"dictionary_{entry.name.replace('/', '_')}"
    return entry.kind if n_hooks == 1 else f"{entry.kind}_{entry.hook.name}"


def collectors(entries: list[Entry], cfg: DictConfig, n_dictionaries: int) -> Iterator[tuple[str, Entry, Collector]]:
    """A Collector per dictionary (all sharing one model and text) and per baseline fitted at its hook."""
    settings = Settings(**cfg.features.settings, seed=cfg.seed)
    device = resolve_device(cfg.device)
    meta = entries[0].meta
    hooks = list(dict.fromkeys(e.hook for e in entries))
    dm = make_datamodule(meta, hooks, device, cfg.seed)
    contexts = eval_contexts(dm, meta)
    for hook in hooks:
        at_hook = [e for e in entries if e.hook == hook]
        if cfg.features.baselines:
            at_hook += fit_baselines(dm.sample(cfg.baseline_tokens)[hook.name], list(cfg.features.baselines), hook, meta, cfg.seed)
        for entry in at_hook:
            collector = Collector(dm.model, entry.dictionary, hook, contexts, dm.special_ids, settings)
            yield _method(entry, n_dictionaries, len(hooks)), entry, collector


def summary_row(method: str, entry: Entry, collector: Collector) -> dict:
    scores = summarise(collector.scores, collector.live, collector.density)
    return {"method": method, **scores, "name": entry.name, "layer": entry.hook.layer, "site": entry.hook.site}


def analyse_features(cfg: DictConfig, entries: list[Entry]) -> list[dict]:
    """Analyse the dictionaries ``entries`` (``sae.evaluate.validate``'s); write ``monosemanticity.csv``,
    ``features/`` and ``dashboard/`` under ``out``."""
    out = Path(cfg.out)
    tokenizer = load_tokenizer(entries[0].meta["model"]["name_or_path"])
    rows, methods = [], {}
    groups = [[e for e in entries if group_key(e) == key] for key in dict.fromkeys(map(group_key, entries))]
    analysed = (c for group in groups for c in collectors(group, cfg, len(entries)))
    for method, entry, collector in analysed:
        records = collector.records(method)
        methods[method] = {"name": entry.name, "hook": entry.hook.name, "features": records}
        (out / "features").mkdir(parents=True, exist_ok=True)
        write_json(out / "features" / f"{method}.json", methods[method])
        rows.append(summary_row(method, entry, collector))
    names = token_names(tokenizer, methods)
    write_dashboard(out / "dashboard", methods, names, rows)
    _figures(out / "figures", methods, names, cfg.features.figures)
    write_csv(out / "monosemanticity.csv", rows, ["method", *SCORES])
    print(f"wrote {out / 'monosemanticity.csv'} ({len(rows)} rows) and {out / 'dashboard' / 'index.html'}")
    return rows


def token_names(tokenizer, methods: dict) -> dict[int, str]:
    """Display text of every token id any record mentions."""
    ids: set[int] = set()
    for method in methods.values():
        for rec in method["features"]:
            ids.update(t for ex in rec.get("top", []) + [e for q in rec.get("quantiles", []) for e in q["examples"]] for t in ex["tokens"])
            ids.update(t for table in ("direct", "causal") for side in ("up", "down") for t, _ in rec.get(table, {}).get(side, []))
            ids.update(t for t, _ in rec.get("top_tokens", []))
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def _figures(directory: Path, methods: dict, names: dict[int, str], n: int) -> None:
    """PNGs of the ``n`` most monosemantic live features of each method."""
    for method, data in methods.items():
        live = sorted((r for r in data["features"] if r["live"]), key=lambda r: -r["top_token_share"])
        for rec in live[:n]:
            plot_feature(rec, names, directory / method / f"{rec['index']}.png", f"{method} feature {rec['index']} ({data['hook']})")
