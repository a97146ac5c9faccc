"""The automatic-interpretation study: records -> explanations -> scores (with both controls) -> files.

Input is an abstract feature source: any iterable of FeatureActivations (method, hook, layer, feature index,
activations and token ids over fragments), so whatever computes codes — a dictionary, a baseline, another
library — plugs in by yielding tensors. Outputs are written to a staging folder and moved into place only when
complete, the summary last: a killed study leaves no half-written result (its LLM answers stay in the cache).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae.autointerp.backends.base import SimulationUnsupported
from sae.autointerp.backends.token_lookup import TokenLookup
from sae.autointerp.cache import ResponseCache
from sae.autointerp.interpret import Explanation, Interpreter, Judgement
from sae.autointerp.prompts import passage_text
from sae.autointerp.records import (
    NEGATIVE_RULE,
    NORMALISATION_RULE,
    Decode,
    FeatureActivations,
    FeatureRecords,
    Fragment,
    RecordConfig,
    build_records,
)
from sae.autointerp.scoring import auroc, balanced_accuracy, bootstrap_ci, simulation_scores
from sae.errors import ConfigError

SCORERS = ("simulation", "detection", "fuzzing", "embedding", "intruder")
LLM_FREE = ("simulation", "detection", "fuzzing", "intruder")  # what the token-lookup control always scores
VARIANTS = ("", "shuffled_", "lookup_")  # the explainer's own explanations, the shuffled control, token lookup
SCORE_NAMES = ("simulation", "simulation_top", "simulation_random", "simulation_random_active", "detection",
               "detection_auroc", "fuzzing", "fuzzing_auroc", "embedding", "intruder")
TERCILES = ("all", "low", "mid", "high")  # scored features by density (fraction of fragments where they fire)
Group = tuple[str, str, int]  # method, hook, layer


def chance(score: str, intruder_k: int) -> float:
    """A score's value for an explanation unrelated to the feature (what the shuffled control must show)."""
    name = score.removeprefix("shuffled_").removeprefix("lookup_")
    if name.startswith("simulation"):
        return 0.0
    return 1.0 / intruder_k if name == "intruder" else 0.5


@dataclass(frozen=True)
class StudyConfig:
    records: RecordConfig = field(default_factory=RecordConfig)
    scorers: tuple[str, ...] = SCORERS[:3]
    controls: bool = True  # the shuffled-explanation and token-lookup controls
    seed: int = 0
    n_bootstrap: int = 1000
    chunk: int = 16  # features explained / scored together: one batched backend call each
    label: str | None = None  # shown on the plot and in meta.json, e.g. "explainer: a 135M stand-in"
    intruder_k: int = 4  # passages per intruder trial: k - 1 where the feature fires, one where it does not
    intruder_trials: int = 5  # intruder trials per feature

    def __post_init__(self) -> None:
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ConfigError(
                f"autointerp.scorers={list(self.scorers)}: expected a non-empty subset of {list(SCORERS)}"
            )
        if self.intruder_k < 2 or self.intruder_trials < 1:
            raise ConfigError(f"autointerp: intruder_k={self.intruder_k} must be >= 2 and intruder_trials="
                              f"{self.intruder_trials} >= 1")


@dataclass
class StudyResult:
    rows: list[dict]
    summary: list[dict]
    meta: dict
    paths: dict[str, Path]


def output_paths(out: Path) -> dict[str, Path]:
    """Where the study's files go under `out`; the summary is the last to appear."""
    return {"records": out / "autointerp" / "records.jsonl", "meta": out / "autointerp" / "meta.json",
            "csv": out / "autointerp.csv", "plot": out / "plots" / "autointerp_by_layer.png",
            "summary": out / "autointerp_summary.csv"}


def _log(message: str) -> None:
    print(f"autointerp: {message}", file=sys.stderr, flush=True)


# -- the cases each scorer judges ---------------------------------------------------------------------------------
def fuzz_cases(rec: FeatureRecords, seed: int) -> list[tuple[Fragment, list[bool], bool]]:
    """Each activating fragment twice, with the same number n of tokens marked: its n strongest firing tokens (label
    yes), and n tokens where the feature does not fire (no); n = min(firing, not firing)."""
    gen = torch.Generator().manual_seed(seed * 7919 + rec.feature)
    cases = []
    for frag in rec.positives:
        firing = sorted((i for i, a in enumerate(frag.acts) if a > 0), key=lambda i: (-frag.acts[i], i))
        quiet = [i for i, a in enumerate(frag.acts) if a <= 0]
        n = min(len(firing), len(quiet))
        if n == 0:
            continue
        right, wrong = [False] * len(frag.acts), [False] * len(frag.acts)
        for i in firing[:n]:
            right[i] = True
        for k in torch.randperm(len(quiet), generator=gen)[:n].tolist():
            wrong[quiet[k]] = True
        cases += [(frag, right, True), (frag, wrong, False)]
    return cases


def intruder_cases(rec: FeatureRecords, k: int, trials: int, seed: int) -> list[tuple[list[Fragment], int]]:
    """Trials of k passages: k - 1 activating fragments and one where the feature does not fire, at a random place."""
    gen = torch.Generator().manual_seed(seed * 104_729 + rec.feature)
    if len(rec.positives) < k - 1:
        return []
    cases = []
    for intruder in rec.negatives[:trials]:
        frags = [rec.positives[j] for j in torch.randperm(len(rec.positives), generator=gen)[: k - 1].tolist()]
        at = int(torch.randint(0, k, (1,), generator=gen))
        cases.append((frags[:at] + [intruder] + frags[at:], at))
    return cases


def _judged(judgements: Sequence[Judgement], labels: Sequence[bool]) -> dict:
    answers = [j.answer for j in judgements]
    probs = [j.p_yes for j in judgements]
    return {"labels": list(labels), "answers": answers, "p_yes": probs,
            "bacc": balanced_accuracy(labels, answers), "auroc": auroc(labels, probs)}


def _simulation(interp: Interpreter, recs: Sequence[FeatureRecords], expls: Sequence[Explanation],
                results: list[dict]) -> None:
    sets = lambda r: (r.score_top, r.score_random, r.score_random_active)  # noqa: E731
    jobs = [(e, f) for r, e in zip(recs, expls) for part in sets(r) for f in part]
    sims, k = interp.simulate(jobs), 0
    for res, r in zip(results, recs):
        got = []
        for part in sets(r):
            got.append(sims[k: k + len(part)])
            k += len(part)
        top, rand, rand_active = got
        true = lambda frags: [f.acts for f in frags]  # noqa: E731
        s = simulation_scores(true(r.score_top), top, true(r.score_random), rand)
        s_active = simulation_scores(true(r.score_top), top, true(r.score_random_active), rand_active)
        missing = sum(len(f.acts) if p is None else sum(not math.isfinite(v) for v in p)
                      for part, preds in zip(sets(r), got) for f, p in zip(part, preds))
        res.update(simulation=s["all"], simulation_top=s["top"], simulation_random=s["random"],
                   simulation_random_active=s_active["all"] if r.score_random_active else math.nan,
                   simulation_missing_tokens=missing)
        res["_simulated"] = {"top": top, "random": rand, "random_active": rand_active}


def _embedding(embedder, recs: Sequence[FeatureRecords], expls: Sequence[Explanation], results: list[dict]) -> None:
    """AUROC of the explanation's similarity to activating against non-activating fragments."""
    for res, r, e in zip(results, recs, expls):
        frags = [*r.positives, *r.negatives]
        labels = [True] * len(r.positives) + [False] * len(r.negatives)
        if e is None or e.text is None:
            res["embedding"] = math.nan
            continue
        sims = embedder.similarities(e.text, [passage_text(f.tokens) for f in frags])
        res.update(embedding=auroc(labels, sims), _embedding={"labels": labels, "similarity": sims})


def _intruder(interp: Interpreter, recs: Sequence[FeatureRecords], expls: Sequence[Explanation],
              results: list[dict], cfg: StudyConfig) -> None:
    """Fraction of trials where the intruder is picked (chance 1 / intruder_k); no answer counts as wrong."""
    cases = [intruder_cases(r, cfg.intruder_k, cfg.intruder_trials, cfg.seed) for r in recs]
    picks = interp.intruder([(e, frags) for e, c in zip(expls, cases) for frags, _ in c])
    k = 0
    for res, c in zip(results, cases):
        got = picks[k: k + len(c)]
        k += len(c)
        res["intruder"] = sum(p == at for p, (_, at) in zip(got, c)) / len(c) if c else math.nan
        res["_intruder"] = {"intruder_at": [at for _, at in c], "picked": got}


def score_variant(interp: Interpreter, recs: Sequence[FeatureRecords], expls: Sequence[Explanation],
                  scorers: Sequence[str], cfg: StudyConfig, embedder=None) -> list[dict]:
    """Every requested score of each feature under one set of explanations; batched across the features."""
    results: list[dict] = [{} for _ in recs]
    if "simulation" in scorers:
        _simulation(interp, recs, expls, results)
    if "detection" in scorers:
        cases = [[(f, True) for f in r.positives] + [(f, False) for f in r.negatives] for r in recs]
        judged = interp.detect([(e, f) for e, c in zip(expls, cases) for f, _ in c])
        k = 0
        for res, c in zip(results, cases):
            d = _judged(judged[k: k + len(c)], [lab for _, lab in c])
            k += len(c)
            res.update(detection=d["bacc"], detection_auroc=d["auroc"], _detection=d)
    if "fuzzing" in scorers:
        cases = [fuzz_cases(r, cfg.seed) for r in recs]
        judged = interp.fuzz([(e, f, m) for e, c in zip(expls, cases) for f, m, _ in c])
        k = 0
        for res, c in zip(results, cases):
            d = _judged(judged[k: k + len(c)], [lab for _, _, lab in c])
            d["marks"] = [[i for i, m in enumerate(marks) if m] for _, marks, _ in c]
            k += len(c)
            res.update(fuzzing=d["bacc"], fuzzing_auroc=d["auroc"], _fuzzing=d)
    if "embedding" in scorers and embedder is not None:
        _embedding(embedder, recs, expls, results)
    if "intruder" in scorers:
        _intruder(interp, recs, expls, results, cfg)
    for res, e in zip(results, expls):  # no explanation to judge by: undefined (counted as unparsed), not 0
        if e is not None and e.text is None and e.lookup is None:
            res.update({name: math.nan for name in SCORE_NAMES})
    return results


def shuffled(expls: Sequence[Explanation], seed: int) -> list[Explanation] | None:
    """Explanations moved to other features (a random cyclic derangement); None for a single feature."""
    if len(expls) < 2:
        return None
    order = torch.randperm(len(expls), generator=torch.Generator().manual_seed(seed)).tolist()
    out: list[Explanation | None] = [None] * len(expls)
    for i, j in enumerate(order):
        out[j] = expls[order[(i + 1) % len(order)]]
    return out  # type: ignore[return-value]


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start: start + max(1, size)]


def _scored(interp: Interpreter, recs: Sequence[FeatureRecords], expls: Sequence[Explanation],
            scorers: Sequence[str], cfg: StudyConfig, what: str = "", embedder=None) -> list[dict]:
    out: list[dict] = []
    for part in _chunks(list(range(len(recs))), cfg.chunk):
        out += score_variant(interp, [recs[i] for i in part], [expls[i] for i in part], scorers, cfg, embedder)
        if what and len(recs) > cfg.chunk:
            _log(f"  {what}: {len(out)}/{len(recs)} features scored")
    return out


def study_group(interp: Interpreter, recs: list[FeatureRecords], scorers: Sequence[str], cfg: StudyConfig,
                group_seed: int, embedder=None) -> list[dict]:
    """Explain, score, and run both controls for the features of one method at one hook."""
    what = f"{recs[0].method} at {recs[0].hook}"
    expls: list[Explanation] = []
    for part in _chunks(recs, cfg.chunk):
        expls += interp.explain(part)
        if len(recs) > cfg.chunk:
            _log(f"  {what}: {len(expls)}/{len(recs)} features explained")
    variants: dict[str, tuple[list[Explanation] | None, list[dict] | None]] = {
        "": (expls, _scored(interp, recs, expls, scorers, cfg, what, embedder))}
    if cfg.controls:
        mixed = shuffled(expls, group_seed)
        variants["shuffled_"] = (mixed, None if mixed is None else
                                 _scored(interp, recs, mixed, scorers, cfg, f"{what}, shuffled explanations",
                                         embedder))
        lookup = TokenLookup()
        lexpls = lookup.explain(recs)
        lookup_scorers = [*LLM_FREE, *(["embedding"] if "embedding" in scorers else [])]
        variants["lookup_"] = (lexpls, _scored(lookup, recs, lexpls, lookup_scorers, cfg, embedder=embedder))
    rows = []
    for i, rec in enumerate(recs):
        row = {"method": rec.method, "hook": rec.hook, "layer": rec.layer, "feature": rec.feature,
               "n_active_fragments": rec.n_active_fragments, "n_fragments": rec.n_fragments,
               "density": rec.density, "density_tercile": "", "max_act": rec.max_act,
               "explanation": expls[i].text, "explanation_parsed": expls[i].text is not None,
               "simulation_missing_tokens": variants[""][1][i].get("simulation_missing_tokens", 0), "_detail": {}}
        for prefix, (ex, scores) in variants.items():
            for name in SCORE_NAMES:
                row[prefix + name] = math.nan if scores is None else scores[i].get(name, math.nan)
            row["_detail"][prefix.rstrip("_") or "explainer"] = {
                "explanation": None if ex is None else ex[i].to_json(),
                **({} if scores is None else {k[1:]: v for k, v in scores[i].items() if k.startswith("_")})}
        row["undefined"] = " ".join(n for n in SCORE_NAMES if n in _asked(scorers) and not math.isfinite(row[n]))
        rows.append(row)
    _terciles(rows)
    return rows


def _asked(scorers: Sequence[str]) -> set[str]:
    """The score names the requested scorers produce."""
    return {n for n in SCORE_NAMES if any(n.startswith(s) for s in scorers)}


def _terciles(rows: list[dict]) -> None:
    """Label each row low / mid / high by its density's rank among the group's scored features."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["density"], rows[i]["feature"]))
    for rank, i in enumerate(order):
        rows[i]["density_tercile"] = TERCILES[1 + rank * 3 // len(rows)]


# -- outputs ------------------------------------------------------------------------------------------------------
def summarise(rows: list[dict], skipped: Mapping[Group, int], groups: Sequence[Group], cfg: StudyConfig,
              scorers: Sequence[str]) -> list[dict]:
    """Per method x hook x score x density tercile (all, low, mid, high): mean, bootstrap 95% interval, chance, and
    counts: features scored, undefined (NaN) among them, unparsed explanations, and sampled features that could not
    be scored (fewer active fragments than the minimum)."""
    by_group: dict[Group, list[dict]] = defaultdict(list)
    for row in rows:
        by_group[(row["method"], row["hook"], row["layer"])].append(row)
    asked = _asked(scorers)
    out = []
    for group in groups:
        for tercile in TERCILES:
            members = [r for r in by_group.get(group, []) if tercile == "all" or r["density_tercile"] == tercile]
            for prefix in VARIANTS:
                for name in SCORE_NAMES:
                    if name not in asked and not (prefix == "lookup_" and name in _asked(LLM_FREE)):
                        continue
                    values = [r.get(prefix + name, math.nan) for r in members]
                    ci = bootstrap_ci(values, cfg.n_bootstrap, cfg.seed)
                    out.append({"method": group[0], "hook": group[1], "layer": group[2], "score": prefix + name,
                                "tercile": tercile, **ci, "chance": chance(name, cfg.intruder_k),
                                "n_features": len(members), "n_unscorable": skipped.get(group, 0),
                                "n_unparsed": sum(not r["explanation_parsed"] for r in members),
                                "density_min": min((r["density"] for r in members), default=math.nan),
                                "density_max": max((r["density"] for r in members), default=math.nan)})
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = [k for k in rows[0] if not k.startswith("_")] if rows else []
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _records_line(row: dict, rec: FeatureRecords) -> str:
    scores = {
        k: v for k, v in row.items() if not k.startswith("_") and any(k == p + n for p in VARIANTS for n in SCORE_NAMES)
    }
    entry = {k: row[k] for k in ("method", "hook", "layer", "feature", "explanation")}
    entry.update(scores=scores, details=row["_detail"], fragments=rec.to_json())
    return json.dumps(_json_safe(entry), ensure_ascii=False)


def _commit(staged: dict[str, Path], targets: dict[str, Path]) -> None:
    """Move staged files into place, the summary last, so its presence means the whole result is there."""
    for name in sorted(staged, key=lambda n: n == "summary"):
        targets[name].parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged[name], targets[name])


def run_study(source: Iterable[FeatureActivations], interpreter: Interpreter, decode: Decode, out: Path | str,
              config: StudyConfig = StudyConfig(), overwrite: bool = False, meta: Mapping[str, Any] | None = None,
              cache: ResponseCache | None = None, embedder=None) -> StudyResult:
    """Build records for every feature the source yields, explain and score them, and write the outputs.

    Refuses to start when a previous result is there (unless `overwrite`), when no feature has enough active
    fragments, when simulation is the only scorer asked for and the backend has no prompt log-probs, or when the
    embedding scorer is asked for without an `embedder` (sae.autointerp.embedding.Embedder).
    """
    out = Path(out)
    targets = output_paths(out)
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists: pass overwrite=true (autointerp.overwrite=true) or another out dir")
    if "embedding" in config.scorers and embedder is None:
        raise ConfigError("autointerp.scorers includes embedding but no embedding model was given (embedder=...)")
    start = time.time()
    scorers, notes = _usable_scorers(interpreter, config.scorers)
    records, skipped, groups = _collect(source, config, decode)
    rows: list[dict] = []
    rec_of: dict[tuple, FeatureRecords] = {}
    for g_index, group in enumerate(groups):
        recs = records.get(group, [])
        if recs:
            t0 = time.time()
            rows += study_group(interpreter, recs, scorers, config, config.seed * 1009 + g_index, embedder)
            _log(f"{group[0]} at {group[1]}: {len(recs)} features scored, {skipped.get(group, 0)} unscorable "
                 f"({time.time() - t0:.1f} s)")
        rec_of.update({(r.method, r.hook, r.feature): r for r in recs})
    summary = summarise(rows, skipped, groups, config, scorers)
    extra = {**dict(meta or {}), **({} if embedder is None else embedder.describe())}
    full_meta = _meta(interpreter, config, scorers, notes, cache, rows, skipped, time.time() - start, extra)
    staged = _stage_and_commit(out, targets, rows, rec_of, summary, full_meta, config)
    return StudyResult(rows, summary, full_meta, staged)


def _usable_scorers(interp: Interpreter, scorers: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    if "simulation" not in scorers:
        return tuple(scorers), []
    try:
        interp.check_simulation()
    except SimulationUnsupported as err:
        if set(scorers) == {"simulation"}:
            raise
        _log(str(err))
        return tuple(s for s in scorers if s != "simulation"), [str(err)]
    return tuple(scorers), []


def _collect(source: Iterable[FeatureActivations], config: StudyConfig, decode: Decode):
    records: dict[Group, list[FeatureRecords]] = defaultdict(list)
    skipped: dict[Group, int] = defaultdict(int)
    groups: list[Group] = []
    for fa in source:
        group = (fa.method, fa.hook, int(fa.layer))
        if group not in groups:
            groups.append(group)
        rec = build_records(fa, config.records, decode, config.seed)
        if rec is None:
            skipped[group] += 1
        else:
            records[group].append(rec)
    if not any(records.values()):
        n = sum(skipped.values())
        raise ConfigError(f"autointerp: none of the {n} features sampled is active in at least "
                          f"{config.records.required} fragments of {config.records.fragment_len} tokens: use more "
                          f"text (analysis.tokens, analysis.max_extra_tokens, data.*) or lower "
                          f"analysis.min_fragments" if n else
                          "autointerp: the feature source yielded no features (no live features?)")
    return records, skipped, groups


def _meta(interp, config, scorers, notes, cache, rows, skipped, wall_s, extra) -> dict:
    return _json_safe({
        "explainer": interp.describe(), "label": config.label, "scorers": list(scorers), "notes": notes,
        "normalisation": NORMALISATION_RULE, "config": asdict(config),
        "cache": None if cache is None else cache.stats(), "n_features_scored": len(rows),
        "n_features_unscorable": sum(skipped.values()), "wall_s": round(wall_s, 2),
        "n_undefined": {score: sum(1 for r in rows if score in r["undefined"].split()) for score in SCORE_NAMES},
        "split": "stride split (OpenAI): the top n_explain + n_score_top fragments by max activation dealt "
                 "alternately to the explanation (ranks 0, 2, ...) and to scoring (ranks 1, 3, ...); scoring adds "
                 "n_score_random fragments drawn uniformly from the text (simulation, simulation_random) and "
                 "n_score_random_active drawn from the other active fragments (simulation_random_active)",
        "detection": "positives: fragments where the feature fires (max > 0), by quantile of their max, none shown "
                     "to the explainer, none a negative; " + NEGATIVE_RULE,
        "fuzzing": "each positive twice, n tokens marked both times: its n strongest firing tokens (yes) and n "
                   "tokens where it does not fire (no), n = min(firing, not firing)",
        **dict(extra or {})})


def _stage_and_commit(out: Path, targets: dict[str, Path], rows: list[dict], rec_of: dict, summary: list[dict],
                      meta: dict, config: StudyConfig) -> dict[str, Path]:
    from sae.autointerp.plots import plot_by_layer

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".autointerp-staging-", dir=out))
    try:
        staged = {name: stage / path.name for name, path in targets.items()}
        with open(staged["records"], "w") as fh:
            for row in rows:
                fh.write(_records_line(row, rec_of[(row["method"], row["hook"], row["feature"])]) + "\n")
        staged["meta"].write_text(json.dumps(meta, indent=2))
        _write_csv(staged["csv"], rows)
        plot_by_layer(summary, staged["plot"], _title(meta, config))
        _write_csv(staged["summary"], summary)
        _commit(staged, targets)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return targets


def _title(meta: dict, config: StudyConfig) -> str:
    ex = meta["explainer"]
    who = ex.get("backend", "?") + (f": {ex['model']}" if ex.get("model") else "")
    who += f" ({ex['params']} parameters)" if ex.get("params") else ""
    return f"automatic interpretation, explainer {who}" + (f" ({config.label})" if config.label else "")



RECORD_KEYS = tuple(RecordConfig.__dataclass_fields__)


def study_config(cfg: Mapping[str, Any], label: str | None = None) -> StudyConfig:
    """StudyConfig from the `autointerp` analysis config (plain mapping; unknown keys are the caller's)."""
    rec = RecordConfig(**{k: cfg[k] for k in RECORD_KEYS if k in cfg and cfg[k] is not None})
    return StudyConfig(
        records=rec,
        scorers=tuple(cfg.get("scorers", SCORERS[:3])),
        controls=bool(cfg.get("controls", True)),
        seed=int(cfg.get("seed", 0)),
        n_bootstrap=int(cfg.get("n_bootstrap", 1000)),
        chunk=int(cfg.get("chunk", 16)),
        label=cfg.get("label") or label,
        intruder_k=int(cfg.get("intruder_k", 4)),
        intruder_trials=int(cfg.get("intruder_trials", 5)),
    )


def run_from_config(
    source: Iterable[FeatureActivations],
    decode: Decode,
    out: Path | str,
    analysis: Mapping[str, Any],
    explainer: Mapping[str, Any],
    device: str = "cpu",
    meta: Mapping[str, Any] | None = None,
) -> StudyResult:
    """The one call an entry point makes: cache + interpreter from the configs, then run_study.

    `analysis` is conf/analysis/autointerp.yaml (sizes, scorers, seed, cache_mode, cache_path, overwrite);
    `explainer` is one of conf/explainer/*.yaml. The cache defaults to <out>/autointerp/cache.sqlite.
    """
    from sae.autointerp.backends import make_interpreter

    out = Path(out)
    config = study_config(analysis, explainer.get("label"))
    existing = [str(p) for p in output_paths(out).values() if p.exists()]
    if existing and not analysis.get("overwrite", False):  # before loading any model
        raise ConfigError(f"{existing[0]} exists: pass autointerp.overwrite=true or another out dir")
    cache_path = analysis.get("cache_path") or out / "autointerp" / "cache.sqlite"
    cache = ResponseCache(cache_path, analysis.get("cache_mode", "readwrite"))
    try:
        embedder = None
        if "embedding" in config.scorers:
            from sae.autointerp.embedding import Embedder

            embedder = Embedder(str(analysis.get("embedding_model") or ""), device)
        interp = make_interpreter(explainer, cache, device)
        return run_study(source, interp, decode, out, config, overwrite=bool(analysis.get("overwrite", False)),
                         meta=meta, cache=cache, embedder=embedder)
    finally:
        cache.close()
