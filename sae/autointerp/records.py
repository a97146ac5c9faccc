"""Records for automatic interpretation: fragments cut from codes, the top/random draw, normalisation, disjoint splits.

Everything here takes plain tensors (codes, token ids) so the caller — whatever computes the codes of a
dictionary or a baseline — hands over tensors and nothing else: no LM, no session, no dictionary object.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sae.errors import ConfigError

NORMALISATION_RULE = "floor(10 * relu(a) / max), max = the feature's largest activation over its records"

Decode = Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class RecordConfig:
    """How many fragments of each kind; the explain and score sets are drawn without overlap."""

    fragment_len: int = 64
    n_top: int = 20  # fragments with the largest max activation
    n_random: int = 20  # random fragments where the feature is non-zero somewhere (not among the top)
    n_explain: int = 5  # the explainer sees the first n_explain top fragments ...
    n_score_top: int = 5  # ... the simulator is scored on the next n_score_top top fragments ...
    n_score_random: int = 5  # ... and on n_score_random of the random ones
    n_quantiles: int = 3  # detection/fuzzing positives: activating fragments from each activation quantile ...
    per_quantile: int = 2  # ... this many from each, and as many non-activating fragments
    min_fragments: int | None = None  # features non-zero in fewer fragments are skipped; None: n_top + n_random

    def __post_init__(self) -> None:
        if self.fragment_len < 1:
            raise ConfigError(f"autointerp.fragment_len={self.fragment_len}: must be at least 1")
        if self.n_explain + self.n_score_top > self.n_top:
            raise ConfigError(f"autointerp: n_explain ({self.n_explain}) + n_score_top ({self.n_score_top}) exceeds "
                              f"n_top ({self.n_top}): the explain and score fragments must not overlap")
        if self.n_score_random > self.n_random:
            raise ConfigError(f"autointerp: n_score_random ({self.n_score_random}) exceeds n_random ({self.n_random})")
        if min(self.n_explain, self.n_score_top + self.n_score_random) < 1:
            raise ConfigError("autointerp: need at least one explanation fragment and one scored fragment")

    @property
    def required(self) -> int:
        """Non-zero fragments a feature needs to be studied (the paper: 20 top + 20 random)."""
        return (
            self.n_top + self.n_random
            if self.min_fragments is None
            else max(self.min_fragments, self.n_top + self.n_random)
        )


@dataclass
class Fragment:
    """One window of text with one feature's activations: raw, and as the 0-10 integers shown to the LLM."""

    index: int  # which fragment of the source (for provenance)
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]
    norm: list[int] = field(default_factory=list)

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0

    def to_json(self) -> dict:
        return {"index": self.index, "token_ids": self.token_ids, "tokens": self.tokens,
                "acts": [round(a, 6) for a in self.acts], "norm": self.norm}


@dataclass
class FeatureActivations:
    """What a feature source yields: one feature's activations over fragments, with their token ids."""

    method: str
    hook: str
    layer: int
    feature: int
    acts: torch.Tensor  # [n_fragments, fragment_len]
    token_ids: torch.Tensor  # [n_fragments, fragment_len]


@dataclass
class FeatureRecords:
    """The fragments one feature is explained and scored on. The explain and score sets never share a fragment."""

    method: str
    hook: str
    layer: int
    feature: int
    max_act: float
    n_active_fragments: int
    explain: list[Fragment]
    score_top: list[Fragment]
    score_random: list[Fragment]
    positives: list[Fragment]  # fragments with a visible activation (>= 1 of 10), across quantiles (detection, fuzzing)
    negatives: list[Fragment]  # fragments that show only zeros (every activation < max / 10)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.method, self.hook, self.feature)

    def to_json(self) -> dict:
        frag = lambda fs: [f.to_json() for f in fs]  # noqa: E731
        return {"max_act": self.max_act, "n_active_fragments": self.n_active_fragments,
                "normalisation": NORMALISATION_RULE, "explain": frag(self.explain), "score_top": frag(self.score_top),
                "score_random": frag(self.score_random), "positives": frag(self.positives),
                "negatives": frag(self.negatives)}


def normalise(acts: Sequence[float], max_act: float) -> list[int]:
    """floor(10 * relu(a) / max), clipped to 10; all zeros when the max is not positive."""
    if not max_act > 0:
        return [0] * len(acts)
    return [min(10, math.floor(10 * max(a, 0.0) / max_act)) for a in acts]


def cut_fragments(codes: torch.Tensor, token_ids: torch.Tensor, features: Sequence[int],
                  fragment_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut contexts into fragments of `fragment_len` tokens (a context's remainder is dropped).

    codes [n_contexts, seq, n_features] and token_ids [n_contexts, seq] -> (acts [n_fragments, fragment_len,
    len(features)], ids [n_fragments, fragment_len]). Only the requested features are kept, so callers can hand
    over a wide dictionary's codes one batch of contexts at a time and concatenate along dim 0.
    """
    if codes.dim() != 3 or token_ids.shape != codes.shape[:2]:
        raise ConfigError(f"autointerp: codes must be [contexts, seq, features] and token ids [contexts, seq]; got "
                          f"{tuple(codes.shape)} and {tuple(token_ids.shape)}")
    n_ctx, seq, width = codes.shape
    if seq < fragment_len:
        raise ConfigError(f"autointerp.fragment_len={fragment_len} is longer than the contexts ({seq} tokens): "
                          f"lower it or use longer contexts")
    bad = [f for f in features if not 0 <= f < width]
    if bad:
        raise ConfigError(f"autointerp: feature indices {bad[:5]} are out of range for {width} features")
    per = seq // fragment_len
    kept = codes[:, : per * fragment_len, list(features)].detach().float().cpu()
    acts = kept.reshape(n_ctx * per, fragment_len, len(features))
    ids = token_ids[:, : per * fragment_len].reshape(n_ctx * per, fragment_len).long().cpu()
    return acts, ids


def live_mask(codes: torch.Tensor) -> torch.Tensor:
    """bool [n_features]: non-zero somewhere in codes [..., n_features]. OR it over batches of contexts."""
    return (codes != 0).flatten(0, -2).any(0).cpu()


def live_features(codes: torch.Tensor) -> torch.Tensor:
    """Indices of features non-zero somewhere in codes [..., n_features]."""
    return torch.nonzero(live_mask(codes)).flatten()


def sample_features(live: torch.Tensor, n: int, seed: int, what: str = "this method") -> list[int]:
    """`n` of the live features (bool mask [n_features]) drawn without replacement (seeded), sorted; all when fewer."""
    idx = torch.nonzero(live.bool()).flatten()
    if idx.numel() == 0:
        raise ConfigError(f"autointerp: no live features for {what} on the held-out text (every code is zero)")
    gen = torch.Generator().manual_seed(seed)
    return sorted(idx[torch.randperm(idx.numel(), generator=gen)[:n]].tolist())


def sample_live_features(codes: torch.Tensor, n: int, seed: int, what: str = "this method") -> list[int]:
    """`n` live features of codes [..., n_features] (see sample_features)."""
    return sample_features(live_mask(codes), n, seed, what)


def iter_feature_activations(method: str, hook: str, layer: int, codes: torch.Tensor, token_ids: torch.Tensor,
                             features: Sequence[int], fragment_len: int = 64) -> Iterator[FeatureActivations]:
    """The feature source for one method at one hook: cut once, then one FeatureActivations per feature."""
    return collect_feature_activations(method, hook, layer, [(codes, token_ids)], features, fragment_len)


def collect_feature_activations(method: str, hook: str, layer: int,
                                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], features: Sequence[int],
                                fragment_len: int = 64) -> Iterator[FeatureActivations]:
    """Like iter_feature_activations, from batches of (codes [b, seq, n_features], token ids [b, seq]).

    Only the chosen features' activations are kept from each batch, so a wide dictionary's codes never have to
    be in memory at once (a first pass ORs `live_mask` over the batches, `sample_features` picks the features).
    """
    parts = [cut_fragments(codes, ids, features, fragment_len) for codes, ids in batches]
    if not parts:
        raise ConfigError(f"autointerp: no held-out contexts for {method} at {hook}")
    acts, ids = torch.cat([a for a, _ in parts]), torch.cat([i for _, i in parts])
    for j, feature in enumerate(features):
        yield FeatureActivations(method, hook, layer, int(feature), acts[:, :, j], ids)


def _fragment(i: int, acts: torch.Tensor, ids: torch.Tensor, decode: Decode) -> Fragment:
    token_ids = ids[i].tolist()
    return Fragment(index=i, token_ids=token_ids, tokens=decode(token_ids), acts=acts[i].tolist())


def _quantile_draw(order: list[int], n_quantiles: int, per_quantile: int, gen: torch.Generator) -> list[int]:
    """`per_quantile` fragments from each of `n_quantiles` equal bins of fragments sorted by max activation."""
    picked: list[int] = []
    for q in range(n_quantiles):
        lo, hi = len(order) * q // n_quantiles, len(order) * (q + 1) // n_quantiles
        members = order[lo:hi]
        if members:
            picked += [members[k] for k in torch.randperm(len(members), generator=gen)[:per_quantile].tolist()]
    return picked


def build_records(fa: FeatureActivations, config: RecordConfig, decode: Decode, seed: int) -> FeatureRecords | None:
    """Top and random fragments of one feature, split disjointly into explain / score sets; None when too few."""
    acts, ids = fa.acts.float(), fa.token_ids
    maxes = acts.clamp(min=0).amax(1)
    active = torch.nonzero(maxes > 0).flatten()
    if active.numel() < config.required:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + fa.feature)
    by_max = active[torch.argsort(maxes[active], descending=True, stable=True)].tolist()
    top, rest = by_max[: config.n_top], by_max[config.n_top:]
    rand = [rest[k] for k in torch.randperm(len(rest), generator=gen)[: config.n_random].tolist()]
    explain = top[: config.n_explain]
    score_top = top[config.n_explain: config.n_explain + config.n_score_top]
    score_random = rand[: config.n_score_random]
    # detection/fuzzing: "activating" and "silent" as the explainer sees them, on the 0-10 scale (a dense
    # baseline such as PCA is non-zero almost everywhere, yet most fragments show only zeros)
    shown = maxes >= float(maxes.max()) / 10
    explained = set(explain)
    visible = [i for i in by_max if bool(shown[i]) and i not in explained]
    positives = _quantile_draw(visible, config.n_quantiles, config.per_quantile, gen)
    silent = torch.nonzero(~shown).flatten()
    negatives = silent[torch.randperm(silent.numel(), generator=gen)[: len(positives)]].tolist()
    max_act = float(maxes[top[0]])
    make = lambda idx: [_fragment(i, acts, ids, decode) for i in idx]  # noqa: E731
    rec = FeatureRecords(fa.method, fa.hook, fa.layer, fa.feature, max_act, int(active.numel()), make(explain),
                         make(score_top), make(score_random), make(positives), make(negatives))
    for frag in all_fragments(rec):
        frag.norm = normalise(frag.acts, max_act)
    return rec


def all_fragments(rec: FeatureRecords) -> list[Fragment]:
    return [*rec.explain, *rec.score_top, *rec.score_random, *rec.positives, *rec.negatives]


def decoder_from_tokenizer(tokenizer) -> Decode:
    """Per-token strings for display: each id decoded alone (memoised), so ' cat' keeps its leading space."""
    memo: dict[int, str] = {}

    def decode(ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in memo:
                memo[i] = tokenizer.decode([int(i)])
            out.append(memo[i])
        return out

    return decode
