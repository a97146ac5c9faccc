"""``evaluate.py analysis=features``: feature records, ``monosemanticity.csv`` and the static dashboard for every
dictionary under ``run`` and the baselines (``analysis.baselines``) fitted at the same hooks."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from sae.evaluation.entries import Entry, baseline_problems, eval_tokens, fit_baselines, groups, session_for
from sae.evaluation.studies import settings_of
from sae.features.config import FeaturesSettings
from sae.features.dashboard import feature_page, index_page
from sae.features.monosemanticity import SCORES, summarise
from sae.features.plots import plot_feature
from sae.features.records import Collector, Settings
from sae.io.atomic import atomic_path, write_csv
from sae.lm.model import resolve_device

EXPLANATIONS = Path("autointerp") / "explanations.json"  # under `out`: written by analysis=autointerp, read by path
SETTING_MINIMA = {"top_k": 1, "window": 0, "quantiles": 1, "per_quantile": 0, "min_count": 1, "causal_contexts": 0,
                  "logit_tokens": 1, "hist_tokens": 1, "bins": 1, "sample": 1,
                  "causal_features": 0}  # the least each analysis.settings.* may be


def settings_problems(settings: FeaturesSettings) -> list[str]:
    """What is wrong with ``analysis=features``'s settings (their types Hydra has checked)."""
    problems = baseline_problems(settings.baselines, "analysis.baselines")
    return problems + [f"analysis.settings.{k}={v} must be >= {low}" for k, v in asdict(settings.settings).items()
                       if k in SETTING_MINIMA and v is not None and v < (low := SETTING_MINIMA[k])]


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
    ``features/`` and ``dashboard/`` under ``out``. Records are written as they are made (one feature at a time):
    only the index's columns and the figures' candidates stay in memory."""
    out = Path(cfg.out)
    rows, methods, names = [], {}, {}
    published = Path(cfg.get("published") or out)  # where earlier studies' results are (out is this one's staging)
    analysed = (c for group in groups(entries) for c in collectors(group, cfg, len(entries)))
    for method, entry, collector in analysed:
        data = {"name": entry.name, "hook": entry.hook.name}
        explained = read_explanations(published, {method: data}).get(method, {})
        records = (collector.record(f) for f in tqdm(range(collector.n_features), desc=f"features {method}"))
        data["features"] = write_records(out, method, data, records, collector.session.tokenizer, names, explained)
        methods[method] = data
        rows.append(summary_row(method, entry, collector))
    (out / "dashboard" / "index.html").write_text(index_page(methods, names, rows))
    _figures(out / "figures", methods, names, settings_of(cfg).figures)
    write_csv(out / "monosemanticity.csv", rows, ["method", *SCORES])
    print(f"wrote monosemanticity.csv ({len(rows)} rows) and dashboard/index.html")
    return rows


INDEX_KEYS = ("index", "density", "top_token_share", "token_entropy", "live")


def write_records(out: Path, method: str, data: dict, records: Iterable[dict], tokenizer, names: dict[int, str],
                  explained: dict[int, tuple[str, str]]) -> list[dict]:
    """Write each record to ``features/<method>.json`` (one feature a line, the file one JSON object) and its
    dashboard page as it comes; return what the index and the figures need: the index's columns of every feature
    (``top`` only as a marker that it has a page) and the whole record of those with a causal effect."""
    pages = out / "dashboard" / method
    pages.mkdir(parents=True, exist_ok=True)
    kept = []
    with atomic_path(out / "features" / f"{method}.json") as tmp, open(tmp, "w") as fh:
        fh.write(json.dumps({"name": data["name"], "hook": data["hook"]})[:-1] + ', "features": [\n')
        for i, rec in enumerate(records):
            fh.write(("" if i == 0 else ",\n") + json.dumps(rec))
            light = publish_page(rec, method, data["hook"], pages, tokenizer, names, explained)
            kept.append(rec if "causal" in rec else light)
        fh.write("\n]}\n")
    return kept


def publish_page(rec: dict, method: str, hook: str, pages: Path, tokenizer, names: dict[int, str],
                 explained: dict[int, tuple[str, str]]) -> dict:
    """Write ``rec``'s dashboard page when the feature fired (naming its tokens into ``names``); return its entry
    of the index (its columns; an empty ``top`` marks that it has a page)."""
    add_token_names(tokenizer, names, rec)
    if "top" in rec:
        page = feature_page(method, hook, rec, names, explained.get(rec["index"]))
        (pages / f"{rec['index']}.html").write_text(page)
    light = {k: rec[k] for k in INDEX_KEYS} | {"top_tokens": rec.get("top_tokens", [])[:3]}
    return light | ({"top": []} if "top" in rec else {})


def iter_records(path: Path) -> tuple[dict, Iterator[dict]]:
    """A ``features/<method>.json``'s name and hook, and its records one at a time (``write_records``' layout)."""
    fh = open(path)
    head = json.loads(fh.readline().removesuffix(' "features": [\n').rstrip(",") + "}")

    def records() -> Iterator[dict]:
        with fh:
            for line in fh:
                line = line.rstrip().rstrip(",")
                if line not in ("", "]}"):
                    yield json.loads(line)

    return head, records()


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
    this study; ``target`` is its staging directory, published over ``source``). Records are read one at a time."""
    with open(source / "monosemanticity.csv", newline="") as fh:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    methods, names = {}, {}
    for path in sorted((source / "features").glob("*.json")):
        data, records = iter_records(path)
        explained = read_explanations(target, {path.stem: data}).get(path.stem, {})
        pages = target / "dashboard" / path.stem
        pages.mkdir(parents=True, exist_ok=True)
        data["features"] = []
        for rec in records:
            data["features"].append(publish_page(rec, path.stem, data["hook"], pages, tokenizer, names, explained))
        methods[path.stem] = data
    (target / "dashboard" / "index.html").write_text(index_page(methods, names, rows))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def record_token_ids(rec: dict) -> set[int]:
    """Every token id a record mentions (its contexts, logit tables and top tokens)."""
    ids = {t for ex in rec.get("top", []) + [e for q in rec.get("quantiles", []) for e in q["examples"]]
           for t in ex["tokens"]}
    tables = (rec.get(table, {}).get(side, []) for table in ("direct", "causal") for side in ("up", "down"))
    ids.update(t for entries in tables for t, _ in entries)
    return ids | {t for t, _ in rec.get("top_tokens", [])}


def add_token_names(tokenizer, names: dict[int, str], rec: dict) -> None:
    """Add to ``names`` the display text of the token ids ``rec`` mentions that it lacks."""
    names.update({i: tokenizer.decode([i]) for i in record_token_ids(rec) - names.keys()})


def _figures(directory: Path, methods: dict, names: dict[int, str], n: int) -> None:
    """PNGs of the ``n`` most monosemantic live features of each method, among those with a causal effect."""
    for method, data in methods.items():
        measured = (r for r in data["features"] if r["live"] and "causal" in r)
        live = sorted(measured, key=lambda r: -r["top_token_share"])
        for rec in live[:n]:
            plot_feature(
                rec,
                names,
                directory / method / f"{rec['index']}.png",
                f"{method} feature {rec['index']} ({data['hook']})",
            )
