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
NEGATIVE_RULE = ("negatives: fragments where the feature does not fire (every activation <= 0); for a feature silent "
                 "in fewer than min_silent_fraction of the fragments (a dense direction), the weaker half of its "
                 "active fragments by peak activation; positives never come from them")

Decode = Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class RecordConfig:
    """How many fragments of each kind; the explain and score sets never share a fragment.

    The split is OpenAI's (Bills et al. 2023): the top ``n_explain + n_score_top`` fragments by max activation are
    dealt alternately (a stride split) to the explanation and to scoring, so the scored top fragments are as strong as
    the explained ones; scoring adds ``n_score_random`` fragments drawn uniformly from the whole text (active or not).
    ``n_score_random_active`` fragments drawn from the other active ones give the separately named
    ``simulation_random_active`` score.

    Detection, fuzzing, embedding and intruder contrast fragments where the feature fires with fragments where it
    does not (``NEGATIVE_RULE``). A sparse feature is silent in most fragments, a fair sample of the text. A dense
    direction (a PCA, ICA or random direction, a busy neuron) fires somewhere in almost every 64-token fragment:
    its few silent fragments are odd text (code, numbers, lists), which any explanation naming common words tells
    apart, so even another feature's explanation scores above chance. When fewer than ``min_silent_fraction`` of the
    fragments are silent, its negatives are therefore drawn from the weaker half of its active fragments by peak:
    ordinary text where it is weak, against positives from the stronger half.
    """

    fragment_len: int = 64
    n_explain: int = 5  # top fragments the explainer sees (ranks 0, 2, 4, ... of the stride split)
    n_score_top: int = 5  # top fragments the simulator is scored on (ranks 1, 3, 5, ...)
    n_score_random: int = 5  # fragments drawn uniformly from the text (the paper's "random")
    n_score_random_active: int = 5  # fragments drawn from the other active ones (simulation_random_active); 0: none
    n_quantiles: int = 3  # detection/fuzzing: activating fragments from each activation quantile ...
    per_quantile: int = 2  # ... this many from each, and as many negatives (``NEGATIVE_RULE``)
    min_silent_fraction: float = 0.1  # fewer silent fragments than this: a dense direction's negatives (below)
    min_fragments: int | None = None  # active fragments a feature needs; None: n_explain + n_score_top

    def __post_init__(self) -> None:
        if self.fragment_len < 1:
            raise ConfigError(f"autointerp.fragment_len={self.fragment_len}: must be at least 1")
        if min(self.n_explain, self.n_score_top) < 1:
            raise ConfigError("autointerp: n_explain and n_score_top must be >= 1 (one fragment to explain, one "
                              "top fragment to score)")
        if min(self.n_score_random, self.n_score_random_active, self.n_quantiles, self.per_quantile) < 0:
            raise ConfigError("autointerp: fragment counts must be >= 0")
        if not 0 <= self.min_silent_fraction <= 1:
            raise ConfigError(f"autointerp.min_silent_fraction={self.min_silent_fraction}: must be in [0, 1]")
        if self.min_fragments is not None and self.min_fragments < 1:
            raise ConfigError(f"autointerp.min_fragments={self.min_fragments}: must be >= 1 (or null)")

    @property
    def n_top(self) -> int:
        """Top fragments dealt to the explanation and to scoring."""
        return self.n_explain + self.n_score_top

    @property
    def required(self) -> int:
        """Active fragments a feature needs to be scored: at least one, and by default a full stride split."""
        return self.n_top if self.min_fragments is None else self.min_fragments


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
    score_random: list[Fragment]  # drawn uniformly from the text's fragments (active or not), not explain/top
    positives: list[Fragment]  # fragments where the feature fires, across activation quantiles (detection, fuzzing)
    negatives: list[Fragment]  # fragments where it does not fire at all, or its weakest (``NEGATIVE_RULE``)
    score_random_active: list[Fragment] = field(default_factory=list)  # drawn from the other active fragments
    n_fragments: int = 0  # fragments of text the feature was read on

    @property
    def density(self) -> float:
        """Fraction of the text's fragments where the feature fires somewhere."""
        return self.n_active_fragments / max(1, self.n_fragments)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.method, self.hook, self.feature)

    def to_json(self) -> dict:
        frag = lambda fs: [f.to_json() for f in fs]  # noqa: E731
        return {"max_act": self.max_act, "n_active_fragments": self.n_active_fragments,
                "n_fragments": self.n_fragments, "normalisation": NORMALISATION_RULE, "explain": frag(self.explain),
                "score_top": frag(self.score_top), "score_random": frag(self.score_random),
                "score_random_active": frag(self.score_random_active), "positives": frag(self.positives),
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


def skew_signs(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """+1 or -1 per feature: the sign that makes its codes positively skewed (third central moment >= 0) over the
    rows of batches [n, n_features]. A baseline direction's sign is whatever the fit returned; multiplying its codes
    by this sign puts the direction's heavy tail on the positive side, the side the study scores."""
    n, s1, s2, s3 = 0, None, None, None
    for codes in batches:
        c = codes.reshape(-1, codes.shape[-1]).double()
        n += c.shape[0]
        parts = (c.sum(0), (c * c).sum(0), (c * c * c).sum(0))
        s1, s2, s3 = parts if s1 is None else (s1 + parts[0], s2 + parts[1], s3 + parts[2])
    if not n:
        raise ConfigError("autointerp: no sample to orient the baselines on")
    mean = s1 / n
    third = s3 / n - 3 * mean * s2 / n + 2 * mean**3
    return torch.where(third < 0, -1.0, 1.0).float()


def fire_counts(codes: torch.Tensor, fragment_len: int) -> torch.Tensor:
    """long [n_features]: fragments of codes [n_contexts, seq, n_features] where each feature fires (a positive code
    somewhere); sum it over batches of contexts for the feature's density."""
    n_ctx, seq, width = codes.shape
    per = seq // fragment_len
    frags = codes[:, : per * fragment_len].reshape(n_ctx * per, fragment_len, width)
    return (frags > 0).any(1).sum(0).cpu()


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


def extend_rare(found: Sequence[FeatureActivations], required: int,
                more: Iterable[tuple[torch.Tensor, torch.Tensor]], fragment_len: int = 64) -> list[FeatureActivations]:
    """The features of ``found`` active in fewer than ``required`` fragments, their text extended with the fragments
    cut from ``more`` (batches of (codes [b, seq, n_features], token ids [b, seq]) over further text), read only
    until every such feature has enough or ``more`` runs out: a rare feature gets the text it needs to be scored.

    Returns ``found`` with those features replaced (the others untouched). Memory: the extra fragments of the rare
    features only (extra tokens x rare features floats, and the extra token ids once)."""
    def active(acts: torch.Tensor) -> int:
        return int((acts > 0).any(1).sum())

    rare = [j for j, fa in enumerate(found) if active(fa.acts) < required]
    if not rare:
        return list(found)
    features = [found[j].feature for j in rare]
    have = {j: active(found[j].acts) for j in rare}
    acts_parts, id_parts = [], []
    for codes, ids in more:
        acts, frag_ids = cut_fragments(codes, ids, features, fragment_len)
        acts_parts.append(acts)
        id_parts.append(frag_ids)
        for k, j in enumerate(rare):
            have[j] += active(acts[:, :, k])
        if all(n >= required for n in have.values()):
            break
    if not acts_parts:
        return list(found)
    extra, extra_ids = torch.cat(acts_parts), torch.cat(id_parts)
    out = list(found)
    for k, j in enumerate(rare):
        fa = found[j]
        out[j] = FeatureActivations(fa.method, fa.hook, fa.layer, fa.feature, torch.cat([fa.acts, extra[:, :, k]]),
                                    torch.cat([fa.token_ids, extra_ids]))
    return out


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


def stride_split(ranked: Sequence[int], n_explain: int, n_score: int) -> tuple[list[int], list[int]]:
    """Deal fragments ranked by max activation alternately to explanation and scoring (OpenAI's stride split).

    With equal counts the explanation gets ranks 0, 2, 4, ... and scoring 1, 3, 5, ...; with unequal counts the
    deal is spread evenly over the first n_explain + n_score ranks. Fewer ranked fragments: each side gets its share.
    """
    total = n_explain + n_score
    explain, score = [], []
    for r, i in enumerate(ranked[:total]):
        # rank r goes to the explanation when ceil(r * n_explain / total) steps up (rank 0 always does)
        step = -(-(r + 1) * n_explain // total) > -(-r * n_explain // total)
        (explain if step else score).append(i)
    return explain, score


def _draw(pool: Sequence[int], n: int, gen: torch.Generator) -> list[int]:
    """`n` members of `pool` uniformly without replacement (all when fewer), in draw order."""
    return [pool[k] for k in torch.randperm(len(pool), generator=gen)[:n].tolist()]


def negative_pool(maxes: torch.Tensor, min_silent_fraction: float) -> list[int]:
    """The fragments negatives are drawn from, given each fragment's peak activation ``maxes``: those where the
    feature is silent (peak <= 0) when they are at least ``min_silent_fraction`` of all; else (a dense direction,
    whose few silent fragments are odd text) the weaker half of its active fragments by peak (ties to the earlier
    fragment)."""
    silent = torch.nonzero(maxes <= 0).flatten()
    if len(silent) >= min_silent_fraction * len(maxes):
        return silent.tolist()
    active = torch.nonzero(maxes > 0).flatten()
    weaker = torch.argsort(maxes[active], stable=True)[: len(active) // 2]
    return active[weaker].tolist()


def build_records(fa: FeatureActivations, config: RecordConfig, decode: Decode, seed: int) -> FeatureRecords | None:
    """One feature's explain / score / detection sets; None when it fires in fewer than `config.required` fragments.

    Fires means a positive activation (codes are shown as relu(a); baselines are oriented before they get here).
    """
    acts, ids = fa.acts.float(), fa.token_ids
    maxes = acts.clamp(min=0).amax(1)
    active = torch.nonzero(maxes > 0).flatten()
    if active.numel() < max(1, config.required):
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + fa.feature)
    by_max = active[torch.argsort(maxes[active], descending=True, stable=True)].tolist()
    explain, score_top = stride_split(by_max, config.n_explain, config.n_score_top)
    taken = set(explain) | set(score_top)
    others = [i for i in range(len(maxes)) if i not in taken]
    score_random = _draw(others, config.n_score_random, gen)
    rest_active = [i for i in by_max if i not in taken]
    score_random_active = _draw(rest_active, config.n_score_random_active, gen)
    # detection/fuzzing: activating fragments (not shown to the explainer) across quantiles of their max, against
    # fragments where the feature does not fire at all, or for a dense direction its weakest (``NEGATIVE_RULE``)
    silent = negative_pool(maxes, config.min_silent_fraction)
    excluded = set(explain) | set(silent)
    positives = _quantile_draw([i for i in by_max if i not in excluded], config.n_quantiles, config.per_quantile, gen)
    negatives = _draw(silent, len(positives), gen)
    max_act = float(maxes[by_max[0]])
    make = lambda idx: [_fragment(i, acts, ids, decode) for i in idx]  # noqa: E731
    rec = FeatureRecords(fa.method, fa.hook, fa.layer, fa.feature, max_act, int(active.numel()), make(explain),
                         make(score_top), make(score_random), make(positives), make(negatives),
                         make(score_random_active), n_fragments=len(maxes))
    for frag in all_fragments(rec):
        frag.norm = normalise(frag.acts, max_act)
    return rec


def all_fragments(rec: FeatureRecords) -> list[Fragment]:
    return [*rec.explain, *rec.score_top, *rec.score_random, *rec.score_random_active, *rec.positives, *rec.negatives]


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
