"""One pass over held-out text per dictionary (or baseline): every feature's contexts, density, token histogram and
logit effects.

A feature *fires* where its code is positive. Signed bases (PCA, ICA, neurons) are read the same way: each
direction's positive half is the feature, so their negative half never counts as firing. BOS, EOS and padding
positions are left out. Everything is returned as JSON-ready dicts; tokens are ids, named by ``token_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sae.dictionaries import Dictionary
from sae.features.logit_effects import causal_logit_change, direct_logits
from sae.features.monosemanticity import token_scores
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_batches, token_mask
from sae.lm.session import LMSession


@dataclass(frozen=True)
class Settings:
    """How much to collect per feature (``analysis.settings.*``; the one default of each:
    ``conf/analysis/features.yaml``)."""

    top_k: int  # top-activating contexts
    window: int  # tokens shown either side of the firing token
    quantiles: int  # activation quantile bins sampled
    per_quantile: int  # contexts sampled per bin
    min_count: int  # a feature is live (scored) when it fires on at least this many tokens
    causal_contexts: int  # top contexts ablated for the causal logit effect
    logit_tokens: int  # tokens listed per logit table
    hist_tokens: int  # tokens shown in the stacked activation histogram (the rest is "other")
    bins: int
    seed: int  # the quantile samples' order


@torch.no_grad()
def feature_codes(session: LMSession, dictionary: Dictionary, hook: HookPoint, contexts: torch.Tensor,
                  batch_size: int = 8) -> torch.Tensor:
    """Codes ``[n_contexts, seq, n_features]`` (positive part; 0 at special positions), on the CPU."""
    dictionary = dictionary.to(session.device)
    out = []
    for ids, acts in read_batches(session.model, [hook], contexts, batch_size, desc=f"codes {hook.name}"):
        codes = dictionary.encode(acts[hook].float()).clamp_min(0)
        out.append((codes * token_mask(ids, session.special_ids).unsqueeze(-1)).cpu())
    return torch.cat(out)


def token_mass(flat: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct token ids ``[u]`` and each feature's summed activation on them ``[u, n_features]``."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return unique, torch.zeros(len(unique), flat.shape[1]).index_add_(0, inverse, flat)


def snippet(contexts: torch.Tensor, codes: torch.Tensor, ctx: int, pos: int, window: int) -> dict:
    """The tokens around (``ctx``, ``pos``) with the feature's activation on each; ``focus`` indexes ``pos``."""
    lo, hi = max(0, pos - window), min(contexts.shape[1], pos + window + 1)
    return {
        "context": ctx,
        "position": pos,
        "activation": round(codes[ctx, pos].item(), 4),
        "tokens": contexts[ctx, lo:hi].tolist(),
        "acts": [round(a, 4) for a in codes[ctx, lo:hi].tolist()],
        "focus": pos - lo,
    }


def quantile_samples(
    values: torch.Tensor, where: torch.Tensor, s: Settings, gen: torch.Generator
) -> list[tuple[float, float, list[int]]]:
    """Per equal-count bin of the non-zero ``values``: its range and up to ``per_quantile`` random flat indices."""
    order = values.argsort()
    bins = []
    for chunk in order.tensor_split(min(s.quantiles, len(order))):
        pick = chunk[torch.randperm(len(chunk), generator=gen)[: s.per_quantile]]
        bins.append((values[chunk[0]].item(), values[chunk[-1]].item(), where[pick].tolist()))
    return bins


def stacked_histogram(values: torch.Tensor, tokens: torch.Tensor, top: list[int], bins: int) -> dict:
    """Counts of ``values`` in ``bins`` equal bins on (0, max], stacked by token: each of ``top``, then the rest."""
    high = values.max().item()
    index = (values / high * bins).ceil().clamp(1, bins).long() - 1
    stacks = []
    for token in [*top, None]:
        keep = ~torch.isin(tokens, torch.tensor(top)) if token is None else tokens == token
        stacks.append({"token": token, "counts": torch.bincount(index[keep], minlength=bins).tolist()})
    return {"edges": torch.linspace(0, high, bins + 1).tolist(), "stacks": stacks}


def _top_tokens(row: torch.Tensor, ids: torch.Tensor, n: int, largest: bool = True) -> list[list]:
    values, index = row.topk(min(n, len(row)), largest=largest)
    return [[int(ids[i]), round(v.item(), 4)] for i, v in zip(index, values)]


def _top_shares(mass: torch.Tensor, ids: torch.Tensor, n: int) -> list[list]:
    """The ``n`` tokens with the largest share of ``mass`` (those with any), as [id, share]."""
    return [pair for pair in _top_tokens(mass / mass.sum(), ids, n) if pair[1] > 0]


class Collector:
    """Per-feature records of one decomposition at one hook, on held-out ``contexts``."""

    def __init__(self, session: LMSession, dictionary: Dictionary, hook: HookPoint, contexts: torch.Tensor,
                 settings: Settings):
        self.session, self.dictionary, self.hook, self.contexts, self.s = session, dictionary, hook, contexts, settings
        self.codes = feature_codes(session, dictionary, hook, contexts)
        self.mask = token_mask(contexts, session.special_ids)
        flat, self.flat_ids = self.codes[self.mask], contexts[self.mask]
        self.flat_ctx, self.flat_pos = self.mask.nonzero(as_tuple=True)
        self.vocab, self.mass = token_mass(flat, self.flat_ids)
        self.count = (flat > 0).sum(0)
        self.density = self.count / len(flat)
        self.scores = token_scores(self.mass)
        self.atoms = (dictionary.decoder_weight() * dictionary.scale).detach().cpu()
        self.direct = direct_logits(session.model, hook, self.atoms.to(session.device)).cpu()
        self.gen = torch.Generator().manual_seed(settings.seed)

    @property
    def live(self) -> torch.Tensor:
        return self.count >= self.s.min_count

    def _snip(self, f: int, flat_index: int) -> dict:
        return snippet(
            self.contexts,
            self.codes[..., f],
            int(self.flat_ctx[flat_index]),
            int(self.flat_pos[flat_index]),
            self.s.window,
        )

    def record(self, f: int) -> dict:
        """Everything the dashboard shows for feature ``f``."""
        values = self.codes[..., f][self.mask]
        fired = values.nonzero().squeeze(-1)
        base = {"index": f, "density": self.density[f].item(), "count": int(self.count[f]),
                "top_token_share": self.scores["top_token_share"][f].item(),
                "token_entropy": self.scores["token_entropy"][f].item(), "live": bool(self.live[f])}
        if len(fired) == 0:
            return base
        top = values.topk(min(self.s.top_k, len(fired))).indices
        top_tokens = _top_shares(self.mass[:, f], self.vocab, self.s.logit_tokens)
        return {
            **base,
            "max": values.max().item(),
            "top_tokens": top_tokens,
            "top": [self._snip(f, i) for i in top.tolist()],
            "quantiles": [
                {"range": [lo, hi], "examples": [self._snip(f, i) for i in picks]}
                for lo, hi, picks in quantile_samples(values[fired], fired, self.s, self.gen)
            ],
            "histogram": stacked_histogram(
                values[fired], self.flat_ids[fired], [t for t, _ in top_tokens[: self.s.hist_tokens]], self.s.bins
            ),
            "direct": self._logit_tables(self.direct[f]),
            "causal": self._causal(f, top),
        }

    def _logit_tables(self, change: torch.Tensor) -> dict:
        ids = torch.arange(len(change))
        return {
            "up": _top_tokens(change, ids, self.s.logit_tokens),
            "down": _top_tokens(change, ids, self.s.logit_tokens, largest=False),
        }

    def _causal(self, f: int, top: torch.Tensor) -> dict:
        """Ablate the feature on its top contexts (the top position of each distinct one) and summarise by token."""
        first: dict[int, int] = {}  # context -> its highest-ranked example
        for i, c in enumerate(self.flat_ctx[top].tolist()):
            first.setdefault(c, int(top[i]))
        chosen = torch.tensor(list(first.values())[: self.s.causal_contexts])
        ctx, pos = self.flat_ctx[chosen], self.flat_pos[chosen]
        change = causal_logit_change(self.session.model, self.hook, self.atoms[f], self.codes[ctx, :, f],
                                     self.contexts[ctx], pos, self.session.special_ids).cpu()
        counts, edges = torch.histogram(change, bins=self.s.bins)
        return {
            **self._logit_tables(change),
            "contexts": len(ctx),
            "hist": {"edges": edges.tolist(), "counts": counts.long().tolist()},
        }

    def records(self, desc: str) -> list[dict]:
        return [self.record(f) for f in tqdm(range(self.codes.shape[-1]), desc=f"features {desc}")]
