"""The LLM-free explainer and simulator: a feature is 'its most activating tokens'.

The explanation is a table from token text to the token's mean normalised activation over the explanation
fragments; the simulator looks each token up (0 when unseen). It is the control that shows how much of an LLM
score a bag of tokens already earns, and a fast interpretability proxy that runs anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sae.autointerp.interpret import Explanation, Interpreter, Judgement
from sae.autointerp.records import FeatureRecords, Fragment


def lookup_table(fragments: Sequence[Fragment]) -> dict[str, float]:
    """Mean normalised activation of each token text over every occurrence in `fragments`."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for frag in fragments:
        for token, value in zip(frag.tokens, frag.norm):
            sums[token] += value
            counts[token] += 1
    return {t: sums[t] / counts[t] for t in sums}


class TokenLookup(Interpreter):
    name = "token_lookup"

    def __init__(self, n_shown: int = 5, threshold: float = 1.0):
        self.n_shown, self.threshold = n_shown, threshold  # threshold: predicted 0-10 value that counts as "fires"

    def explain(self, records: Sequence[FeatureRecords]) -> list[Explanation]:
        out = []
        for rec in records:
            table = lookup_table(rec.explain)
            best = sorted((t for t in table if table[t] > 0), key=lambda t: (-table[t], t))[: self.n_shown]
            text = "tokens " + ", ".join(repr(t) for t in best) if best else None
            out.append(Explanation(text, text or "", lookup=table))
        return out

    def _predict(self, expl: Explanation, tokens: Sequence[str]) -> list[float] | None:
        if expl.lookup is None:
            return None
        return [expl.lookup.get(t, 0.0) for t in tokens]

    def simulate(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[list[float] | None]:
        return [self._predict(e, f.tokens) for e, f in jobs]

    def _judgement(self, values: list[float] | None) -> Judgement:
        if values is None:
            return Judgement(None)
        score = max(values) if values else 0.0
        return Judgement(score >= self.threshold, score / 10)

    def detect(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[Judgement]:
        return [self._judgement(self._predict(e, f.tokens)) for e, f in jobs]

    def fuzz(self, jobs: Sequence[tuple[Explanation, Fragment, Sequence[bool]]]) -> list[Judgement]:
        out = []
        for e, f, marked in jobs:
            values = self._predict(e, f.tokens)
            picked = None if values is None else [v for v, m in zip(values, marked) if m]
            if picked is None:
                out.append(Judgement(None))
            else:
                out.append(self._judgement([sum(picked) / len(picked)] if picked else [0.0]))
        return out

    def intruder(self, jobs: Sequence[tuple[Explanation, Sequence[Fragment]]]) -> list[int | None]:
        """The passage with the lowest predicted maximum (the first of equals: the intruder's place is random)."""
        out: list[int | None] = []
        for expl, frags in jobs:
            peaks = [max(v, default=0.0) for v in (self._predict(expl, f.tokens) for f in frags) if v is not None]
            out.append(None if len(peaks) < len(frags) else min(range(len(frags)), key=lambda k: peaks[k]))
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "model": None, "endpoint": None}
