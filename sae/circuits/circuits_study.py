"""``evaluate.py analysis=circuits target=...``: the circuit of one target over the dictionaries under ``run`` (one
model, one dictionary per hook), found by ``sae.circuits.discovery`` and judged by ``sae.circuits.faithfulness``.

Order of work: every check that needs no weights (settings, the target, a dictionary at each layer the circuit
descends through, Graphviz) comes first; then the held-out codes (means, top tokens, maxima), the contexts, the
search, the scores and the files ``circuits/<target>/graph.{json,dot,svg,html}``; ``circuits/summary.csv``, one row
per target ever written into this ``out`` (this run's row replacing an earlier one of the same target), comes last.

Targets (``sae.circuits.targets``): a feature (``target=layers.5.resid:123``); a token (``target.token='")"'``: the
live feature of the deepest resid dictionary whose direct-path logit effect on it is largest); a task's logit
difference (``target.task=logit_diff task=ioi``: on each base prompt, the logit of its answer minus the logit of the
subject's name for IOI (the usual IOI logit difference), or of the counterfactual answer for a pairs file; the
contexts are the task's pairs, ``task.n_pairs`` of them).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sae.circuits.config import FORWARD_PASSES_NOTICE, CircuitsSettings
from sae.circuits.contexts import HeldOut, feature_contexts, heldout_statistics
from sae.circuits.discovery import CircuitProblem, Contexts, DiscoverySettings, Level, LevelReport, discover
from sae.circuits.faithfulness import circuit_scores
from sae.circuits.graph import CircuitGraph, Node, have_dot, write_all
from sae.circuits.patching_study import task_settings
from sae.circuits.targets import (
    FeatureTarget,
    TaskTarget,
    TokenTarget,
    check_feature,
    folder_name,
    hook_layer,
    last_hook,
    parse_target,
    upstream_hook,
)
from sae.circuits.tasks import Task, answer_id, batches, build_task
from sae.errors import ConfigError
from sae.evaluation.entries import Entry, eval_tokens, groups, session_for
from sae.evaluation.studies import settings_of
from sae.features.analysis import method_name, read_explanations
from sae.features.logit_effects import direct_logits
from sae.io.atomic import write_csv
from sae.lm.model import model_label, resolve_device
from sae.lm.splice import atoms_in_model_units

SUMMARY = Path("circuits") / "summary.csv"
COLUMNS = ["model", "target", "folder", "selected_by", "contexts", "nodes", "edges", "faithfulness", "random_mean",
           "random_std", "beats_random", "n_random", "completeness_left", "spearman_target", "topk_agreement",
           "seconds_ablation", "seconds_attribution", "cpu_seconds_ablation", "cpu_seconds_attribution", "seconds"]


def settings_problems(settings: CircuitsSettings) -> list[str]:
    """What is wrong with ``analysis=circuits``'s settings (reported with every other problem, before any model runs;
    their types Hydra has checked)."""
    problems = []
    try:
        DiscoverySettings.from_settings(settings)
    except ConfigError as err:
        problems.append(str(err))
    if settings.n_contexts < 1:
        problems.append(f"analysis.n_contexts={settings.n_contexts} must be an integer >= 1")
    if settings.depth is not None and settings.depth < 1:
        problems.append(f"analysis.depth={settings.depth} must be an integer >= 1 (or null)")
    faith = settings.faithfulness
    if faith.ablation not in ("mean", "zero"):
        problems.append(f"analysis.faithfulness.ablation={faith.ablation!r} must be mean or zero")
    if faith.random_circuits < 0:
        problems.append(f"analysis.faithfulness.random_circuits={faith.random_circuits} must be an integer >= 0")
    return problems


def _notice_cost(settings: DiscoverySettings, n_contexts: int, levels: list[Level]) -> None:
    """One line at the start when the search's estimated passes exceed ``FORWARD_PASSES_NOTICE`` (each level's
    dictionary width standing in for its live features; ``fan_in`` nodes per level after the first)."""
    total, nodes = 0, 1
    for level in levels:
        total += settings.forward_passes(n_contexts, level.dictionary.n_features, nodes)
        nodes = nodes * settings.fan_in if settings.width is None else min(nodes * settings.fan_in, settings.width)
    if total > FORWARD_PASSES_NOTICE:
        _log(f"circuits: about {total:,} forward passes estimated (up to); bound them with analysis.candidates, "
             "analysis.depth or analysis.width")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _by_hook(group: list[Entry], chosen: list[str] | None) -> dict[str, Entry]:
    """The one dictionary at each hook (of those named in ``analysis.dictionaries``, when given); several at one hook
    is ambiguous (which one's features would the circuit use?)."""
    names = [e.name for e in group]
    unknown = sorted(set(chosen or []) - set(names))
    if unknown:
        raise ConfigError(f"analysis.dictionaries: no dictionary named {unknown} under run (there: {names})")
    found: dict[str, list[Entry]] = {}
    for entry in group:
        if chosen is None or entry.name in chosen:
            found.setdefault(entry.hook.name, []).append(entry)
    several = {h: [e.name for e in es] for h, es in found.items() if len(es) > 1}
    if several:
        raise ConfigError(f"analysis=circuits needs one dictionary per hook, but {several} share a hook; choose one "
                          "per hook with analysis.dictionaries=[<name>, ...]")
    return {h: es[0] for h, es in found.items()}


def _chain(top: str, widths: dict[str, int], depth: int | None) -> list[str]:
    """The hooks below ``top`` the circuit descends through, one layer at a time (``depth`` of them; null: down to
    layer 0)."""
    steps = depth if depth is not None else hook_layer(top)
    hooks = [top]
    for _ in range(steps):
        hooks.append(upstream_hook(hooks[-1], widths))
    return hooks[1:]


def _ioi_other(task: Task, tokenizer) -> list[int]:
    """Per pair, the token whose logit is subtracted: the subject's name (IOI) or the counterfactual answer."""
    return [answer_id(tokenizer, p.meta["subject"], "IOI subject") if "subject" in p.meta else p.counterfactual_answer
            for p in task.pairs]


def task_contexts(task: Task, tokenizer, batch_rows: int) -> list[Contexts]:
    other = torch.tensor(_ioi_other(task, tokenizer))
    return [Contexts(b.base_ids, torch.full((len(b.base_ids),), b.base_ids.shape[1] - 1), b.base_answer, other[b.index])
            for b in batches(list(task.pairs), batch_rows)]


def _level(entry: Entry, names: dict[str, str]) -> Level:
    return Level(entry.hook, entry.dictionary, names[entry.hook.name], entry.hook.layer)


def _token_feature(session, level: Level, stats: HeldOut, target: TokenTarget) -> tuple[int, dict]:
    """The live feature at ``level`` whose direct-path logit effect on the token is largest."""
    atoms = atoms_in_model_units(level.dictionary).detach().to(session.device)
    effect = direct_logits(session.model, level.hook, atoms)[:, target.token_id].cpu()
    live = stats.context_max.amax(0) > 0
    if not live.any():
        raise ConfigError(f"no feature of {level.label} fires on the held-out text read")
    index = int(torch.where(live, effect, torch.tensor(-math.inf)).argmax())
    rank = int((effect[live] > effect[index]).sum())
    return index, {
        "token": target.token,
        "token_id": target.token_id,
        "feature": index,
        "direct_logit": round(float(effect[index]), 4),
        "rank_among_all": int((effect > effect[index]).sum()),
        "rank_among_live": rank,
        "live_features": int(live.sum()),
    }


def _top_tokens(graph: CircuitGraph, stats: dict, tokenizer, n: int = 3) -> None:
    for node in graph.nodes.values():
        if node.kind == "feature" and node.hook in stats:
            node.top_tokens = [tokenizer.decode([t]) for t in stats[node.hook].top_tokens(node.index, n)]


def _explanations(graph: CircuitGraph, where: Path, names: dict[str, str], entries: dict[str, Entry]) -> int:
    methods = {names[h]: {"name": entries[h].name} for h in names}
    found = read_explanations(where, methods)
    return graph.attach_explanations(
        {(m, i): text for m, by_index in found.items() for i, (text, _) in by_index.items()}
    )


def _finite(value):
    """``value`` with every NaN or infinity replaced by None (JSON has no NaN: a Spearman of a constant ranking)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _summary_row(
    graph: CircuitGraph, folder: str, scores: dict, reports: list[LevelReport], settings, seconds: float
) -> dict:
    agree = [a for r in reports for a in r.topk_agree]
    first = reports[0].spearman[0] if reports and reports[0].spearman else math.nan
    seconds_of = lambda method: round(sum(r.seconds.get(method, 0.0) for r in reports), 1)  # noqa: E731
    return {
        "model": graph.model,
        "target": graph.target,
        "folder": folder,
        "selected_by": settings.primary,
        "contexts": graph.meta["contexts"]["contexts"],
        "nodes": len(graph.nodes),
        "edges": len(graph.edges),
        **{
            k: scores[k]
            for k in ("faithfulness", "random_mean", "random_std", "beats_random", "n_random", "completeness_left")
        },
        "spearman_target": first,
        "topk_agreement": sum(agree) / len(agree) if agree else math.nan,
        "seconds_ablation": seconds_of("ablation"),
        "seconds_attribution": seconds_of("attribution"),
        "cpu_seconds_ablation": seconds_of("ablation_cpu"),
        "cpu_seconds_attribution": seconds_of("attribution_cpu"),
        "seconds": round(seconds, 1),
    }


def _write_summary(out: Path, published: Path, row: dict) -> None:
    """``circuits/summary.csv``: the rows of earlier targets published in this ``out``, this run's row replacing
    its target's."""
    rows = []
    if (published / SUMMARY).is_file():
        with open(published / SUMMARY, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("folder") != row["folder"]]
    write_csv(out / SUMMARY, [*rows, row], COLUMNS)


def study(cfg: DictConfig, entries: list[Entry]) -> dict:
    """Find the circuit of ``cfg.target`` over the dictionaries ``entries``; write its graph and the summary row."""
    analysis: CircuitsSettings = settings_of(cfg)
    settings = DiscoverySettings.from_settings(analysis)
    by_model = groups(entries)
    if len(by_model) != 1:
        raise ConfigError(
            f"analysis=circuits works on one model's dictionaries; run= holds {len(by_model)} models or texts"
        )
    by_hook = _by_hook(by_model[0], analysis.dictionaries)
    widths = {h: e.dictionary.n_features for h, e in by_hook.items()}
    meta = by_model[0][0].meta
    session = session_for(meta, resolve_device(cfg.device), cfg.seed)
    target = parse_target(OmegaConf.to_container(cfg.target) if isinstance(cfg.get("target"), DictConfig)
                          else cfg.get("target"), session.tokenizer)
    task = None
    if isinstance(target, TaskTarget):
        if target.metric != "logit_diff":
            raise ConfigError(f"target.task={target.metric}: a circuit explains a value of each prompt; use logit_diff")
        if cfg.get("task") is None:
            raise ConfigError(
                "target.task=logit_diff needs a task: task=ioi [task.vocabulary=<json>] or task=pairs task.path=<jsonl>"
            )
        task = build_task(task_settings(cfg), session.tokenizer)
        top = last_hook(widths)
        chain = [top, *_chain(top, widths, None if analysis.depth is None else analysis.depth - 1)]
    else:
        if isinstance(target, FeatureTarget):
            check_feature(target, widths)
        top = target.hook if isinstance(target, FeatureTarget) else last_hook(widths)
        chain = _chain(top, widths, analysis.depth)
    if not have_dot():
        raise ConfigError("Graphviz's `dot` is not on PATH, so graph.svg cannot be drawn; install it "
                          "(Debian/Ubuntu: apt-get install graphviz)")
    start = time.perf_counter()
    names = {h: method_name(e, len(entries), len(by_hook)) for h, e in by_hook.items()}
    levels = [_level(by_hook[h], names) for h in chain]
    _notice_cost(settings, len(task.pairs) if task else analysis.n_contexts, levels)
    used = ([] if task else [top]) + chain
    heldout = session.eval_contexts(eval_tokens(meta))
    stats = heldout_statistics(
        session.model,
        session.special_ids,
        {by_hook[h].hook: by_hook[h].dictionary for h in used},
        heldout,
        session.lm_batch_size,
    )
    stats = {h.name: s for h, s in stats.items()}
    label = model_label(meta["model"]["name_or_path"])
    extra: dict = {}
    if task is not None:
        contexts = task_contexts(task, session.tokenizer, settings.batch_rows)
        extra["task"] = task.summary()
        record = {"contexts": len(task.pairs), "what": "the task's base prompts, read at the final position"}
        top_level, index = Level(None, None, "output", levels[0].layer + 1), None
    else:
        top_level = _level(by_hook[top], names)
        index = target.index if isinstance(target, FeatureTarget) else None
        if isinstance(target, TokenTarget):
            index, extra["token_target"] = _token_feature(session, top_level, stats[top], target)
            _log(f"circuits: {target.name} -> {top}:{index} ({extra['token_target']})")
        contexts, record = feature_contexts(
            stats[top], heldout, index, analysis.n_contexts, settings.batch_rows, f"target {top}:{index}"
        )
    name = f"{top}:{index}" if index is not None else f"{task.name} logit difference (answer - subject)"
    graph = CircuitGraph(
        name + (f" (most predicts {target.token!r})" if isinstance(target, TokenTarget) else ""), label
    )
    problem = CircuitProblem(session.model, session.special_ids, contexts, settings.batch_rows)
    if index is not None:
        value = float(problem.activation(top_level, [index])[0])
        graph.add_feature(top, top_level.layer, index, top_level.name, activation=value, effect=value)
    else:
        value = float(problem.mean_value(top_level, [0])[0])
        graph.add_node(Node("output/logit_diff", "output", top_level.layer, f"{task.name} logit_diff", activation=value,
                            effect=value))
    _log(f"circuits: {graph.target} on {record['contexts']} contexts, mean value {value:.4g}")
    reports = discover(problem, [top_level, *levels], index, settings, graph, _log)
    circuit: dict = {}
    for node in graph.nodes.values():
        if node.kind == "feature" and node.hook != (top if index is not None else None):
            circuit.setdefault(by_hook[node.hook].hook, []).append(node.index)
    faith = analysis.faithfulness
    baseline = {lv.hook: stats[lv.label].mean if faith.ablation == "mean" else torch.zeros(lv.dictionary.n_features)
                for lv in levels}
    scores = circuit_scores(problem, top_level, index, levels, circuit, baseline, faith.random_circuits, faith.seed)
    _log(
        f"circuits: faithfulness {scores['faithfulness']:.3f} (random circuits of the same size: "
        f"{scores['random_mean']:.3f} ± {scores['random_std']:.3f}), "
        f"completeness left {scores['completeness_left']:.3f}"
    )
    _top_tokens(graph, stats, session.tokenizer)
    explained = _explanations(
        graph, Path(analysis.explanations or cfg.get("published") or cfg.out), names, by_hook
    )
    seconds = time.perf_counter() - start
    graph.meta = _finite(
        {
            "settings": dataclasses.asdict(analysis),
            "contexts": record,
            "scores": scores,
            "levels": [r.__dict__ for r in reports],
            "explanations": explained,
            "seconds": round(seconds, 1),
            **extra,
        }
    )
    folder = folder_name(FeatureTarget(top, index) if index is not None else target)
    out = Path(cfg.out)
    write_all(graph, out / "circuits" / folder, analysis.dashboard)
    row = _summary_row(graph, folder, scores, reports, settings, seconds)
    _write_summary(out, Path(cfg.get("published") or cfg.out), row)  # last: a summary row means the graph is complete
    print(f"wrote {out / 'circuits' / folder}/graph.{{json,dot,svg,html}} and {out / SUMMARY}")
    return row
