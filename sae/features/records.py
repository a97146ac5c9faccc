"""Two streaming passes over held-out text per dictionary (or baseline): every feature's contexts, density, token
histogram and logit effects, in memory that grows with the features x the examples kept per feature, never with the
tokens read (no ``[tokens, features]`` tensor is ever held; one batch's codes at a time).

Pass 1 counts each feature's firings, its maximum and its activation mass per token id (sparse: ``TokenMass``), and
keeps per feature its ``top_k`` firings and a uniform sample of ``sample`` firings (``RunningTopK``, merged batch by
batch; ties go to the earlier position). Pass 2 encodes the same text again and bins every firing into the stacked
histogram (whose range and tokens pass 1 fixed) and reads the kept examples' windows. The causal logit effect costs
two forwards per feature, so it is measured on a seeded sample of ``causal_features`` live features.

A feature *fires* where its code is positive. Signed bases (PCA, ICA, neurons) are read the same way: each
direction's positive half is the feature, so their negative half never counts as firing. BOS, EOS and padding
positions are left out. Everything is returned as JSON-ready dicts; tokens are ids, named by ``token_names``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sae.dictionaries import Dictionary, encode_parts
from sae.features.config import CollectSettings
from sae.features.logit_effects import causal_logit_change, direct_logits
from sae.features.monosemanticity import pair_scores
from sae.features.streaming import RunningTopK, TokenMass
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_batches, token_mask
from sae.lm.session import LMSession


@dataclass
class Settings(CollectSettings):
    """``analysis.settings.*`` (``CollectSettings``: their meanings and the one default of each,
    ``conf/analysis/features.yaml``) and what the run adds."""

    seed: int = 0
    """The samples' order (the run's seed)."""
    batch_size: int = 8
    """Held-out contexts read by one LM forward (their codes are encoded in bounded parts: ``encode_parts``)."""


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


def _top_tokens(row: torch.Tensor, ids: torch.Tensor, n: int, largest: bool = True) -> list[list]:
    values, index = row.topk(min(n, len(row)), largest=largest)
    return [[int(ids[i]), round(v.item(), 4)] for i, v in zip(index, values)]


def _split(top: RunningTopK) -> list[tuple[list, list, list]]:
    """Every feature's (keys, values, indices) of ``top`` as Python lists, largest key first."""
    counts = torch.bincount(top.feature, minlength=top.n_features).tolist()
    parts = (t.split(counts) for t in (top.key, top.value, top.index))
    return [(k.tolist(), v.tolist(), i.tolist()) for k, v, i in zip(*parts)]


@dataclass
class Examples:
    """The (feature, flat position) pairs whose windows pass 2 reads; ``windows[i]`` the feature's codes at
    ``2 * window + 1`` positions around example ``i`` (0 outside the context)."""

    feature: torch.Tensor
    index: torch.Tensor
    windows: torch.Tensor


class Collector:
    """Per-feature records of one decomposition at one hook, on held-out ``contexts``."""

    def __init__(self, session: LMSession, dictionary: Dictionary, hook: HookPoint, contexts: torch.Tensor,
                 settings: Settings):
        self.session, self.hook, self.contexts, self.s = session, hook, contexts, settings
        self.dictionary = dictionary.to(session.device)
        self.atoms = (dictionary.decoder_weight() * dictionary.scale).detach().cpu()
        self.n_features, self.seq = self.atoms.shape[0], contexts.shape[1]
        self.gen = torch.Generator().manual_seed(settings.seed)
        self._first_pass()
        self.direct = self._direct_tables()
        self._plan()
        self._second_pass()

    # pass 1: counts, maxima, token mass, top-k and sample
    def _batches(self, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first context, codes ``[contexts, seq, n_features]`` on the CPU: positive part, 0 at special positions), in
        parts of bounded size (``encode_parts``)."""
        batches = read_batches(self.session.model, [self.hook], self.contexts, self.s.batch_size, desc=desc)
        start = 0
        with torch.no_grad():
            for ids, acts in batches:
                keep = token_mask(ids, self.session.special_ids).unsqueeze(-1)
                for first, codes in encode_parts(self.dictionary, acts[self.hook].float()):
                    yield start + first, codes.clamp_min_(0).mul_(keep[first: first + len(codes)]).cpu()
                start += len(ids)

    def _fired(self, start: int, codes: torch.Tensor):
        """The batch's firings: feature, activation, flat position (context x seq + position), token id."""
        ctx, pos, feature = codes.nonzero(as_tuple=True)
        ctx_global = ctx + start
        return feature, codes[ctx, pos, feature], ctx_global * self.seq + pos, self.contexts[ctx_global, pos]

    def _first_pass(self) -> None:
        n, s = self.n_features, self.s
        self.count, self.high = torch.zeros(n, dtype=torch.long), torch.zeros(n)
        self.top, self.sampled, mass = RunningTopK(n, s.top_k), RunningTopK(n, s.sample), TokenMass(n)
        for start, codes in self._batches(f"features {self.hook.name} (pass 1)"):
            feature, value, index, token = self._fired(start, codes)
            self.count += torch.bincount(feature, minlength=n)
            self.high.scatter_reduce_(0, feature, value, "amax")
            self.top.add(feature, value, index)
            self.sampled.add(feature, torch.rand(len(feature), generator=self.gen), index, value)
            mass.add(feature, token, value)
        self.density = self.count / token_mask(self.contexts, self.session.special_ids).sum().clamp_min(1)
        feature, token, amount = mass.pairs()
        self.scores = pair_scores(feature, amount, n)
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, feature, amount)
        shares = RunningTopK(n, s.logit_tokens)
        shares.add(feature, amount / total[feature], token)
        self.top_tokens = [[[t, round(v, 4)] for t, v in zip(i, k) if round(v, 4) > 0] for k, _, i in _split(shares)]

    @property
    def live(self) -> torch.Tensor:
        return self.count >= self.s.min_count

    def _direct_tables(self, chunk: int = 512) -> tuple[torch.Tensor, ...]:
        """Each atom's ``logit_tokens`` largest and smallest direct-path logits (values and ids), atoms in chunks."""
        n, parts = min(self.s.logit_tokens, self.session.model.get_output_embeddings().weight.shape[0]), []
        for atoms in self.atoms.split(chunk):
            logits = direct_logits(self.session.model, self.hook, atoms.to(self.session.device)).cpu()
            parts.append((*logits.topk(n), *logits.topk(n, largest=False)))
        return tuple(torch.cat(p) for p in zip(*parts))

    # between the passes: which examples, histogram ranges and causal contexts
    def _plan(self) -> None:
        s, examples = self.s, []
        self.plan: list[dict] = []
        top, sampled = _split(self.top), _split(self.sampled)
        for f in range(self.n_features):
            _, top_values, top_index = top[f]
            _, values, where = sampled[f]
            bins = quantile_samples(torch.tensor(values), torch.tensor(where, dtype=torch.long), s, self.gen) \
                if values else []
            first = len(examples)
            examples += [(f, i) for i in top_index] + [(f, i) for _, _, picks in bins for i in picks]
            ids = iter(range(first, len(examples)))
            self.plan.append({"top": [next(ids) for _ in top_index],
                              "quantiles": [(lo, hi, [next(ids) for _ in picks]) for lo, hi, picks in bins]})
        pairs = torch.tensor(examples, dtype=torch.long).reshape(-1, 2)
        self.examples = Examples(pairs[:, 0], pairs[:, 1], torch.zeros(len(pairs), 2 * s.window + 1))
        self.stack_tokens = torch.full((self.n_features, s.hist_tokens), -1, dtype=torch.long)
        for f, tokens in enumerate(self.top_tokens):
            ids = [t for t, _ in tokens[: s.hist_tokens]]
            self.stack_tokens[f, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.hist = torch.zeros(self.n_features, s.hist_tokens + 1, s.bins, dtype=torch.long)
        self.causal_contexts = self._causal_plan(top)
        self.causal_rows: dict[tuple[int, int], torch.Tensor] = {}

    def _causal_plan(self, top: list[tuple[list, list, list]]) -> dict[int, list[tuple[int, int]]]:
        """The features given a causal effect (a seeded sample of the live ones) and each one's (context,
        position) pairs: the top position of each of its ``causal_contexts`` highest-ranked distinct contexts."""
        live = self.live.nonzero().squeeze(-1)
        n = len(live) if self.s.causal_features is None else min(self.s.causal_features, len(live))
        chosen = live[torch.randperm(len(live), generator=self.gen)[:n]].sort().values.tolist()
        plan = {}
        for f in chosen:
            first: dict[int, int] = {}  # context -> its highest-ranked position
            for i in top[f][2]:
                first.setdefault(i // self.seq, i % self.seq)
            plan[f] = list(first.items())[: self.s.causal_contexts]
        return plan

    # pass 2: the histograms, the examples' windows, the causal features' codes
    def _second_pass(self) -> None:
        s, w = self.s, self.s.window
        ex_ctx = self.examples.index // self.seq
        order = ex_ctx.argsort(stable=True)
        bounds = torch.searchsorted(ex_ctx[order], torch.arange(len(self.contexts) + 1))
        offsets = torch.arange(-w, w + 1)
        wanted = {(c, f) for f, pairs in self.causal_contexts.items() for c, _ in pairs}
        for start, codes in self._batches(f"features {self.hook.name} (pass 2)"):
            feature, value, _, token = self._fired(start, codes)
            edge = (value / self.high[feature] * s.bins).ceil().clamp(1, s.bins).long() - 1
            match = self.stack_tokens[feature] == token.unsqueeze(-1)
            stack = torch.where(match.any(-1), match.int().argmax(-1), s.hist_tokens)
            flat = (feature * (s.hist_tokens + 1) + stack) * s.bins + edge
            self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))
            rows = order[bounds[start] : bounds[start + len(codes)]]
            if len(rows):
                at = self.examples.index[rows] % self.seq
                cols = at.unsqueeze(-1) + offsets
                inside = (cols >= 0) & (cols < self.seq)
                local = (ex_ctx[rows] - start).unsqueeze(-1)
                picked = codes[local, cols.clamp(0, self.seq - 1), self.examples.feature[rows].unsqueeze(-1)]
                self.examples.windows[rows] = picked * inside
            for c, f in wanted:
                if start <= c < start + len(codes):
                    self.causal_rows[c, f] = codes[c - start, :, f].clone()

    def _snip(self, i: int) -> dict:
        """Example ``i``: the tokens around it with the feature's activation on each; ``focus`` indexes it."""
        index, w = int(self.examples.index[i]), self.s.window
        ctx, pos = divmod(index, self.seq)
        lo, hi = max(0, pos - w), min(self.seq, pos + w + 1)
        acts = self.examples.windows[i, lo - pos + w : hi - pos + w]
        return {
            "context": ctx,
            "position": pos,
            "activation": round(self.examples.windows[i, w].item(), 4),
            "tokens": self.contexts[ctx, lo:hi].tolist(),
            "acts": [round(a, 4) for a in acts.tolist()],
            "focus": pos - lo,
        }

    def record(self, f: int) -> dict:
        """Everything the dashboard shows for feature ``f`` (``causal`` only for the sampled features)."""
        base = {"index": f, "density": self.density[f].item(), "count": int(self.count[f]),
                "top_token_share": self.scores["top_token_share"][f].item(),
                "token_entropy": self.scores["token_entropy"][f].item(), "live": bool(self.live[f])}
        if self.count[f] == 0:
            return base
        plan, high = self.plan[f], self.high[f].item()
        record = {
            **base,
            "max": high,
            "top_tokens": self.top_tokens[f],
            "top": [self._snip(i) for i in plan["top"]],
            "quantiles": [{"range": [lo, hi], "examples": [self._snip(i) for i in ids]}
                          for lo, hi, ids in plan["quantiles"]],
            "histogram": self._histogram(f, high),
            "direct": self._direct(f),
        }
        if f in self.causal_contexts:
            record["causal"] = self._causal(f)
        return record

    def _histogram(self, f: int, high: float) -> dict:
        """Counts of the activations in ``bins`` equal bins on (0, max], stacked by token: each of the feature's
        top ``hist_tokens`` tokens by mass, then the rest (``None``)."""
        h = self.s.hist_tokens
        tokens = [t for t, _ in self.top_tokens[f][:h]]
        stacks = [{"token": t, "counts": self.hist[f, j].tolist()} for j, t in enumerate(tokens)]
        return {"edges": torch.linspace(0, high, self.s.bins + 1).tolist(),
                "stacks": [*stacks, {"token": None, "counts": self.hist[f, h].tolist()}]}

    def _direct(self, f: int) -> dict:
        up, up_ids, down, down_ids = (t[f].tolist() for t in self.direct)
        return {"up": [[i, round(v, 4)] for i, v in zip(up_ids, up)],
                "down": [[i, round(v, 4)] for i, v in zip(down_ids, down)]}

    def _logit_tables(self, change: torch.Tensor) -> dict:
        ids = torch.arange(len(change))
        return {
            "up": _top_tokens(change, ids, self.s.logit_tokens),
            "down": _top_tokens(change, ids, self.s.logit_tokens, largest=False),
        }

    def _causal(self, f: int) -> dict:
        """Ablate the feature on its top contexts (the top position of each distinct one) and summarise by token."""
        pairs = self.causal_contexts[f]
        ctx, pos = torch.tensor([c for c, _ in pairs]), torch.tensor([p for _, p in pairs])
        codes = torch.stack([self.causal_rows[c, f] for c, _ in pairs])
        change = causal_logit_change(self.session.model, self.hook, self.atoms[f], codes, self.contexts[ctx], pos,
                                     self.session.special_ids).cpu()
        counts, edges = torch.histogram(change, bins=self.s.bins)
        return {
            **self._logit_tables(change),
            "contexts": len(ctx),
            "hist": {"edges": edges.tolist(), "counts": counts.long().tolist()},
        }
