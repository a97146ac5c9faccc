"""``evaluate.py analysis=autointerp``: automatic interpretation of every dictionary under ``run`` and of the
baselines fitted at the same hooks, on the run's held-out text, with the explainer of ``explainer=...``.

The entry point's part is computing codes; everything after (records, explanations, scores, controls, files) is
``run_from_config``. Codes are never all in memory: the LM is read once per group of hooks that fits in
``analysis.memory_mb``, each method's codes are encoded in batches twice (which features are live, then only the
sampled features' activations are kept), and the source is lazy, so a bad explainer (no key, no log-probs for a
simulation-only study) is refused before any LM forward.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf

from sae.autointerp.backends import BACKENDS
from sae.autointerp.config import AutointerpSettings
from sae.autointerp.records import (
    FeatureActivations,
    RecordConfig,
    collect_feature_activations,
    decoder_from_tokenizer,
    extend_rare,
    fire_counts,
    sample_features,
    skew_signs,
)
from sae.autointerp.study import RECORD_KEYS, SCORERS, StudyResult, output_paths, run_from_config
from sae.dictionaries.base import CODE_PART_BYTES, encode_parts
from sae.errors import ConfigError
from sae.evaluation.entries import Entry, baseline_problems, fit_baselines, groups, session_for, sparsified
from sae.evaluation.studies import settings_of
from sae.features.analysis import EXPLANATIONS  # where the features dashboard reads explanations
from sae.io.atomic import write_json
from sae.lm.hooks import HookPoint
from sae.lm.model import model_label, resolve_device
from sae.lm.reader import read_batches, token_mask
from sae.lm.session import LMSession

POSITIVE_INTS = ("n_features", "n_bootstrap", "chunk", "memory_mb", "intruder_trials")


# -- settings ------------------------------------------------------------------------------------------------------
def record_config(settings: AutointerpSettings) -> RecordConfig:
    """The fragment sizes of the settings (a ConfigError for sizes that cannot work)."""
    return RecordConfig(**{k: getattr(settings, k) for k in RECORD_KEYS if getattr(settings, k) is not None})


def settings_problems(analysis: DictConfig | AutointerpSettings) -> list[str]:
    """What is wrong with ``analysis=autointerp``'s settings and its explainer, found before any model loads."""
    settings = analysis if isinstance(analysis, AutointerpSettings) else OmegaConf.to_object(analysis)
    problems = baseline_problems(settings.baselines, "analysis.baselines")
    problems += [f"analysis.{k}={getattr(settings, k)} must be an integer >= 1" for k in POSITIVE_INTS
                 if getattr(settings, k) < 1]
    if settings.tokens is not None and settings.tokens < 1:
        problems.append(f"analysis.tokens={settings.tokens} must be an integer >= 1")
    if settings.max_extra_tokens < 0:
        problems.append(f"analysis.max_extra_tokens={settings.max_extra_tokens} must be an integer >= 0")
    try:
        record_config(settings)
    except ConfigError as err:
        problems.append(str(err))
    scorers = list(settings.scorers)
    if not scorers or any(s not in SCORERS for s in scorers):
        problems.append(f"analysis.scorers={scorers}: expected a non-empty subset of [{','.join(SCORERS)}]")
    if "embedding" in scorers:
        from sae.autointerp.embedding import embedding_problems

        problems += embedding_problems(settings.embedding_model)
    if settings.intruder_k < 2:
        problems.append(f"analysis.intruder_k={settings.intruder_k} must be an integer >= 2")
    if settings.cache_mode not in ("readwrite", "replay", "off"):
        problems.append(f"analysis.cache_mode={settings.cache_mode}: expected readwrite, replay or off")
    if settings.explainer is None:
        return problems + ["no explainer: choose one with explainer=token_lookup|hf_local|openai"]
    return problems + explainer_problems(_plain(settings.explainer), scorers)


def _plain(node: Any) -> dict:
    """A settings dataclass (or mapping) as a plain dict."""
    return asdict(node) if is_dataclass(node) else dict(node)


def explainer_problems(explainer: Mapping[str, Any], scorers: list[str]) -> list[str]:
    """An unknown backend, a missing model file, a missing key, an endpoint that does not answer, or simulation
    asked alone of a chat-only endpoint (no prompt log-probs)."""
    backend = explainer.get("backend")
    if backend not in BACKENDS:
        return [f"explainer.backend={backend}: expected one of {', '.join(BACKENDS)}"]
    if backend == "hf_local":
        return _hf_local_problems(explainer)
    if backend == "openai":
        return _openai_problems(explainer, scorers)
    return []


def _hf_local_problems(explainer: Mapping[str, Any]) -> list[str]:
    from sae.autointerp.backends.hf_local import resolve_model

    if not explainer.get("model"):
        return ["explainer=hf_local needs explainer.model (a hub id, a directory or a .gguf file)"]
    try:
        _, gguf = resolve_model(str(explainer["model"]), explainer.get("gguf_file"))
    except ConfigError as err:
        return [str(err)]
    missing = [m for m in ("gguf", "accelerate") if gguf and not _importable(m)]
    problem = (f"explainer.model={explainer['model']} is a GGUF file, which needs {' and '.join(missing)}: "
               f"pip install -e \".[autointerp]\"")
    return [problem] if missing else []


def _openai_problems(explainer: Mapping[str, Any], scorers: list[str]) -> list[str]:
    problems = []
    if not _importable("openai"):
        problems.append("explainer=openai needs the `openai` package: pip install -e \".[autointerp]\"")
    key_env = explainer.get("api_key_env")
    if key_env and not os.environ.get(key_env):
        problems.append(
            f"explainer.api_key_env={key_env}: that environment variable is not set (export the key "
            f"there; it is never written to disk), or explainer.api_key_env=null for a server that needs none"
        )
    chat_only = explainer.get("completions") in (False, "false")
    if chat_only and set(scorers) == {"simulation"}:
        problems.append(
            f"explainer.completions=false (chat only): {explainer.get('model')} gives no prompt "
            f"log-probabilities, which simulation needs; add detection or fuzzing to analysis.scorers, or "
            f"use a /v1/completions endpoint with echo and logprobs (vLLM, llama.cpp) or explainer=hf_local"
        )
    unreachable = endpoint_problem(str(explainer.get("base_url") or ""), float(explainer.get("timeout_s") or 5))
    return problems + ([unreachable] if unreachable else [])


def endpoint_problem(base_url: str, timeout_s: float) -> str | None:
    """One line when nothing accepts a connection at ``base_url``'s host and port (a TCP connect, no request)."""
    url = urlparse(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"explainer.base_url={base_url}: expected an http(s) URL such as http://127.0.0.1:8000/v1"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=min(timeout_s, 5.0)):
            return None
    except OSError as err:
        why = err.strerror or type(err).__name__
        return f"explainer.base_url={base_url}: cannot connect to {url.hostname}:{port} ({why})"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- methods -------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One row of the study's figure: a dictionary or a baseline at one hook, under its name in the outputs."""

    name: str
    entry: Entry
    info: dict = field(default_factory=dict)  # filled while its codes are read: width, live, sampled, L0
    sign: torch.Tensor | None = None  # +-1 per scored feature (None: the codes as they are); see ``baseline_signs``

    def __post_init__(self) -> None:
        self.info["method"] = self.name


def dictionary_names(entries: list[Entry], prefix: str = "") -> dict[str, str]:
    """``dictionary`` when each hook has one (a line across layers), else ``dictionary_<name>``."""
    per_hook = max(sum(e.hook == h for e in entries) for h in {e.hook for e in entries})
    return {
        e.name: prefix + ("dictionary" if per_hook == 1 else f"dictionary_{e.name.replace('/', '_')}") for e in entries
    }


def _baseline_name(entry: Entry, prefix: str) -> str:
    k = getattr(entry.dictionary, "k", None)
    return prefix + (
        entry.kind if k is None or not entry.kind.endswith("_topk") else f"{entry.kind.removesuffix('_topk')}_topk{k}"
    )


# -- codes ---------------------------------------------------------------------------------------------------------
def hook_chunks(
    hooks: list[HookPoint], widths: dict[HookPoint, int], n_tokens: int, memory_mb: int
) -> list[list[HookPoint]]:
    """Hooks in groups whose float32 activations over ``n_tokens`` fit in ``memory_mb`` (at least one hook each)."""
    chunks: list[list[HookPoint]] = [[]]
    used = 0
    for hook in hooks:
        size = n_tokens * widths[hook] * 4
        if chunks[-1] and used + size > memory_mb * 2**20:
            chunks.append([])
            used = 0
        chunks[-1].append(hook)
        used += size
    return chunks


@torch.no_grad()
def read_contexts(session: LMSession, hooks: list[HookPoint], contexts: torch.Tensor) -> dict[HookPoint, torch.Tensor]:
    """Activations ``[n_contexts, seq, width]`` (float32, CPU) at each hook: one LM pass for all of them."""
    parts: dict[HookPoint, list[torch.Tensor]] = {h: [] for h in hooks}
    for _, acts in read_batches(session.model, hooks, contexts, session.lm_batch_size):
        for hook in hooks:
            parts[hook].append(acts[hook].float().cpu())
    return {h: torch.cat(p) for h, p in parts.items()}


@torch.no_grad()
def code_batches(entry: Entry, acts: torch.Tensor, keep: torch.Tensor, device: torch.device,
                 sign: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The entry's codes ``[b, seq, n_scored]`` over batches of contexts, zero at special tokens (BOS, EOS). With
    ``sign`` (``baseline_signs``), the codes are repeated to its length and multiplied by it: a baseline's
    directions, each on both of its sides."""
    dictionary = entry.dictionary.to(device)
    n_ctx, seq, width = acts.shape
    step = _contexts_per_batch(acts, entry, sign)
    for start in range(0, n_ctx, step):
        x = acts[start: start + step].to(device)
        codes = dictionary.encode(x.reshape(-1, width)).reshape(len(x), seq, -1)
        if sign is not None:
            codes = codes.repeat(1, 1, len(sign) // codes.shape[-1]) * sign.to(device)
        yield (codes * keep[start: start + step, :, None].to(device)).cpu()


@torch.no_grad()
def baseline_signs(entry: Entry, sample: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The signs a baseline's codes are scored with: ``[s, -s]``, where ``s`` (+-1 per direction) makes the codes
    positively skewed on the fitting sample ``[n, d_in]``. Feature ``i`` is direction ``i``'s heavy-tail side,
    feature ``d + i`` its other side.

    Why both sides: the sign a fit returns is arbitrary, and keeping only each direction's heavy-tail side puts the
    shared tail of directions that share their strongest text (random directions in an MLP space all lean on its few
    outlying tokens) on the positive side of every one of them, so another direction's explanation describes it and
    the shuffled control leaves chance (0.09 for random directions at the stand-in's MLP block 1). Scoring both
    sides privileges neither; naming the heavy-tail side ``i`` keeps a flipped direction's scores the same. Only
    the MLP's own neurons (``neurons`` at ``hook.site=mlp``) keep one side, ``s`` alone: their sign is the
    activation function's, whose other side is a small dip below zero."""
    dictionary = entry.dictionary.to(device)
    s = skew_signs(codes.cpu() for _, codes in encode_parts(dictionary, sample.to(device)))
    return s if entry.kind.startswith("neurons") and entry.hook.site == "mlp" else torch.cat([s, -s])


def counts_and_l0(method: Method, acts: torch.Tensor, keep: torch.Tensor, device: torch.device,
                  fragment_len: int) -> tuple[torch.Tensor, float]:
    """Fragments of the text where each feature fires (a positive code), and the mean number of firing codes per
    ordinary token (a dictionary's non-zero ones; a two-sided baseline direction counts once): counts, never a
    tokens x features tensor."""
    counts, nonzero = None, 0.0
    for codes in code_batches(method.entry, acts, keep, device, method.sign):
        fired = fire_counts(codes, fragment_len)
        counts = fired if counts is None else counts + fired
        nonzero += float((codes > 0).sum())
    return counts, nonzero / max(1, int(keep.sum()))


def method_activations(method: Method, acts: torch.Tensor, contexts: torch.Tensor, keep: torch.Tensor,
                       settings: AutointerpSettings, device: torch.device,
                       more: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                       ) -> Iterator[FeatureActivations]:
    """The method's features at its hook sampled uniformly among the live ones (firing in at least one fragment,
    whatever their density), as the study's feature source; a sampled feature active in fewer than the minimum of
    fragments gets the codes of ``more()`` (further held-out text, read only as far as needed)."""
    entry = method.entry
    counts, mean_l0 = counts_and_l0(method, acts, keep, device, settings.fragment_len)
    live = counts > 0
    features = sample_features(live, settings.n_features, settings.seed, f"{method.name} at {entry.hook.name}")
    required = record_config(settings).required
    width = entry.dictionary.n_features
    method.info.update(entry=entry.name, hook=entry.hook.name, n_features=len(counts), n_directions=width,
                       n_live=int(live.sum()), n_live_below_minimum=int(((counts > 0) & (counts < required)).sum()),
                       n_sampled=len(features), l0=round(mean_l0, 3),
                       oriented=None if method.sign is None else int((method.sign[:width] < 0).sum()))
    step = _contexts_per_batch(acts, entry, method.sign)
    batches = zip(code_batches(entry, acts, keep, device, method.sign), contexts.split(step))
    found = list(collect_feature_activations(method.name, entry.hook.name, entry.hook.layer, batches, features,
                                             settings.fragment_len))
    rare = sum(int(counts[f]) < required for f in features)
    method.info.update(n_sampled_below_minimum=rare)
    if rare and more is not None:
        read = [0]
        found = extend_rare(found, required, _counted(more(), read), settings.fragment_len)
        method.info.update(extra_tokens_read=read[0], n_sampled_below_minimum_after_extra=sum(
            int((fa.acts > 0).any(1).sum()) < required for fa in found))
    yield from found


def _counted(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], read: list[int]) -> Iterator:
    """The batches, adding the tokens of each to ``read[0]``."""
    for codes, ids in batches:
        read[0] += ids.numel()
        yield codes, ids


def extra_batches(group: Group, hook: HookPoint, method: Method, settings: AutointerpSettings,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The method's codes and the token ids over the held-out text after the study's own contexts, up to
    ``max_extra_tokens`` tokens, read a chunk of contexts at a time (activations within ``memory_mb``)."""
    n_base, seq = group.contexts.shape
    n_more = math.ceil(settings.max_extra_tokens / seq)
    if n_more <= 0:
        return
    session = group.session
    extra = session.eval_contexts((n_base + n_more) * seq)[n_base:]
    width = method.entry.dictionary.d_in
    chunk = max(1, settings.memory_mb * 2**20 // (seq * width * 4))
    for start in range(0, len(extra), chunk):
        ctx = extra[start: start + chunk]
        acts = read_contexts(session, [hook], ctx)[hook]
        keep = token_mask(ctx, session.special_ids)
        yield from zip(code_batches(method.entry, acts, keep, device, method.sign),
                       ctx.split(_contexts_per_batch(acts, method.entry, method.sign)))


def _contexts_per_batch(acts: torch.Tensor, entry: Entry, sign: torch.Tensor | None = None) -> int:
    """Contexts encoded at once, so a batch of codes stays within ``CODE_PART_BYTES`` (the bound of
    ``encode_parts``, which this study cannot use as is: its batches also cut the token ids and the special-token
    mask)."""
    width = entry.dictionary.n_features if sign is None else len(sign)
    return max(1, CODE_PART_BYTES // (acts.shape[1] * width * 4))


# -- the study -----------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """The dictionaries trained on one model and text, with the session that reads them."""

    entries: list[Entry]
    session: LMSession
    contexts: torch.Tensor
    prefix: str  # prepended to method names when several models are studied at once


def _groups(cfg: DictConfig, entries: list[Entry], device: torch.device) -> list[Group]:
    parts = groups(entries)
    tokens = cfg.eval_tokens if cfg.eval_tokens is not None else settings_of(cfg).tokens
    out = []
    for part in parts:
        session = session_for(part[0].meta, device, cfg.seed)
        try:
            contexts = session.eval_contexts(tokens)
        except ValueError as err:
            raise ConfigError(
                f"{part[0].name}: {err}; set data.heldout_fraction=... or another text with data.*"
            ) from None
        prefix = "" if len(parts) == 1 else f"{Path(session.model_name).name}:"
        out.append(Group(part, session, contexts, prefix))
    return out


def methods_at(group: Group, hook: HookPoint, sample: torch.Tensor | None, settings: AutointerpSettings,
               seed: int) -> Iterator[Method]:
    """The dictionaries at ``hook``, then the baselines fitted on ``sample`` (and their top-k versions, matched to
    the dictionaries' L0 measured on the way)."""
    names = dictionary_names(group.entries, group.prefix)
    dictionaries = [Method(names[e.name], e) for e in group.entries if e.hook == hook]
    yield from dictionaries
    if sample is None:
        return
    dense = fit_baselines(sample, list(settings.baselines), hook, dictionaries[0].entry.meta, seed)
    sparse = sparsified(dense, [m.info["l0"] for m in dictionaries]) if settings.topk_baselines else []
    for entry in dense + sparse:  # each direction scored on both sides, its heavy tail (on the fitting sample) first
        yield Method(_baseline_name(entry, group.prefix), entry, sign=baseline_signs(entry, sample, sample.device))


def feature_source(groups_: list[Group], cfg: DictConfig, device: torch.device, methods: list[Method],
                   meta_methods: list[dict]) -> Iterator[FeatureActivations]:
    """Every method's sampled features, hook by hook; ``methods`` collects what was studied and ``meta_methods``
    their info (meta.json's list, filled while the study consumes the source)."""
    settings = settings_of(cfg)
    for group in groups_:
        session, contexts = group.session, group.contexts
        keep = token_mask(contexts, session.special_ids)
        hooks = list(dict.fromkeys(e.hook for e in group.entries))
        widths = {h: next(e.dictionary.d_in for e in group.entries if e.hook == h) for h in hooks}
        for chunk in hook_chunks(hooks, widths, contexts.numel(), settings.memory_mb):
            acts = read_contexts(session, chunk, contexts)
            samples = session.sample(chunk, cfg.baseline_tokens) if settings.baselines else {}
            for hook in chunk:
                for method in methods_at(group, hook, samples.get(hook.name), settings, cfg.seed):
                    methods.append(method)
                    meta_methods.append(method.info)
                    more = functools.partial(extra_batches, group, hook, method, settings, device)
                    yield from method_activations(method, acts[hook], contexts, keep, settings, device, more)
            del acts, samples


def lm_label(groups_: list[Group]) -> dict:
    """The LMs studied, with their sizes (the 14M stand-ins say so by their size on every figure)."""
    out = []
    for group in groups_:
        n = sum(p.numel() for p in group.session.model.parameters())
        out.append({"name": group.session.model_name, "n_params": n, "params": _size(n)})
    return {"lms": out, "lm_label": "; ".join(f"LM {model_label(m['name'])} ({m['params']} parameters)" for m in out)}


def _size(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.1f}B"


def study(cfg: DictConfig, entries: list[Entry]) -> StudyResult:
    """Explain and score the features of every dictionary and baseline; write the outputs under ``out``."""
    out = Path(cfg.out)  # under evaluate.py a staging directory, published over ``published`` at the end
    published = Path(cfg.get("published") or out)
    settings = settings_of(cfg)
    analysis = _plain(settings)
    explainer = _plain(analysis.pop("explainer"))
    existing = [str(p) for p in output_paths(published).values() if p.exists()]
    if existing and not analysis["overwrite"]:
        raise ConfigError(f"{existing[0]} exists: pass analysis.overwrite=true or another out=...")
    # the cache lives where the results are published, not in the staging directory, so a killed study's answers
    # are there for the next run of the same command
    analysis["cache_path"] = analysis.get("cache_path") or str(published / "autointerp" / "cache.sqlite")
    device = resolve_device(cfg.device)
    parts = _groups(cfg, entries, device)
    labels = lm_label(parts)
    analysis["label"] = analysis.get("label") or explainer.get("label") or labels["lm_label"]
    methods: list[Method] = []
    meta: dict[str, Any] = {"study": "evaluate.py analysis=autointerp", "run": str(cfg.run), **labels,
                            "heldout_tokens": sum(g.contexts.numel() for g in parts),
                            "baseline_tokens": cfg.baseline_tokens if analysis["baselines"] else None,
                            "methods": []}
    source = feature_source(parts, cfg, device, methods, meta["methods"])
    result = run_from_config(source, decoder_from_tokenizer(parts[0].session.tokenizer), out, analysis, explainer,
                             str(device), meta)
    write_explanations(out, result, methods)
    _redraw_dashboard(published, out, parts[0].session.tokenizer)
    _print_summary(result, out)
    return result


def write_explanations(out: Path, result: StudyResult, methods: list[Method]) -> None:
    """``autointerp/explanations.json``: each entry's explanations by feature index, for the features dashboard."""
    entry_of = {(m.name, m.entry.hook.name): m.entry.name for m in methods}
    by_entry: dict[str, dict[str, str]] = {}
    for row in result.rows:
        if row.get("explanation"):
            by_entry.setdefault(entry_of[(row["method"], row["hook"])], {})[str(row["feature"])] = row["explanation"]
    ex = result.meta.get("explainer", {})
    by = (
        ex.get("backend", "?")
        + (f" {ex['model']}" if ex.get("model") else "")
        + (f" ({ex['params']} parameters)" if ex.get("params") else "")
    )
    write_json(out / EXPLANATIONS, {"explainer": by, "label": result.meta.get("label"), "entries": by_entry})


def _redraw_dashboard(published: Path, out: Path, tokenizer) -> None:
    """Put the explanations on the features dashboard when ``analysis=features`` wrote one under the same ``out``
    (``published``: where it is; ``out``: this study's staging directory, published over it)."""
    from sae.features.analysis import redraw_dashboard

    if (published / "dashboard" / "index.html").is_file() and (published / "features").is_dir():
        redraw_dashboard(published, out, tokenizer)
        print("explanations added to the features dashboard")


def _print_summary(result: StudyResult, out: Path) -> None:
    shown = ("simulation", "detection", "fuzzing", "lookup_simulation", "shuffled_simulation")
    lines = [
        f"{r['method']:>16} {r['hook']:>28} {r['score']:>20} {r['mean']:+.3f} "
        f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] n={r['n']} undefined={r['n_undefined']} "
        f"unscorable={r['n_unscorable']}"
        for r in result.summary
        if r["score"] in shown and r["tercile"] == "all" and r.get("mean") is not None and math.isfinite(r["mean"])
    ]
    print("\n".join(lines))
    print(f"wrote {result.paths['summary']} ({len(result.rows)} features) and {result.paths['plot']}")
