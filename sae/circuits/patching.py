"""Feature patching over prompt pairs at one hook with one dictionary (or baseline): the intervention, its metrics
for any patched set, the live features, the attribution scores, and the curves of both orderings.

The intervention, at every ordinary-text position of the base run::

    x' = x + Σ_{j∈F} (c̄_j − c_j) · d_j          (c the base run's codes, c̄ the counterfactual's, d_j in model units)

is the project's one splice, ``sae.lm.splice.spliced_forward`` with a ``PatchCodes`` edit: the base run's
reconstruction error ``x − decode(c)`` is kept, so patching nothing gives the base run exactly and patching everything
gives the counterfactual's reconstruction plus the base error. The only thing added here is ``_Measured``, which
wraps the edit to record ``x' − x`` (the edit's size is one of the study's metrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sae.circuits.curves import curve_rows
from sae.circuits.metrics import PairTotals, kl_patched_to_counterfactual, wide
from sae.circuits.pruning import (
    CurvePoint,
    attribution_curve,
    attribution_sums,
    greedy_prune,
    log_thresholds,
    ranked,
    size_grid,
)
from sae.circuits.tasks import PairBatch, PromptPair, batches
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import token_mask
from sae.lm.splice import PatchCodes, spliced_forward


@dataclass
class CachedBatch:
    """One batch of pairs with what every patched run reuses: both runs' codes at the hook and final logits."""

    pairs: PairBatch
    orders: list[str]
    x: torch.Tensor  # [b, T, d] base activations at the hook
    codes: torch.Tensor  # [b, T, n] base codes
    cf_codes: torch.Tensor  # [b, T, n] counterfactual codes
    base_logits: torch.Tensor  # [b, V] final position
    cf_logits: torch.Tensor  # [b, V]

    def rows(self, order: str) -> list[int]:
        return [i for i, o in enumerate(self.orders) if order == "all" or o == order]


@dataclass
class _Measured:
    """A splice edit that also keeps ``x' − x`` (for the edit-size metric); the edit itself is unchanged."""

    edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    delta: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        out = self.edit(x, keep)
        self.delta = (out - x).detach()
        return out


def _final(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``at`` for the splice: every row's last position (pairs are batched by length, so no padding)."""
    return torch.arange(ids.shape[0]), torch.full((ids.shape[0],), ids.shape[1] - 1)


class PatchingProblem:
    """The pairs' clean runs through the splice, cached once, and the patched run for any set of features."""

    def __init__(self, model: nn.Module, special_ids: Sequence[int], hook: HookPoint, dictionary,
                 pairs: Sequence[PromptPair], batch_size: int = 64):
        if not pairs:
            raise ConfigError("no prompt pairs to patch")
        self.model, self.special_ids, self.hook, self.dictionary = model, list(special_ids), hook, dictionary
        self.device = next(model.parameters()).device
        self.batches: list[CachedBatch] = []
        with torch.no_grad():
            for batch in batches(list(pairs), batch_size):
                batch = PairBatch(**{f.name: getattr(batch, f.name).to(self.device) for f in dataclasses.fields(batch)})
                base_logits, x = self._clean(batch.base_ids)
                cf_logits, x_cf = self._clean(batch.counterfactual_ids)
                codes, cf_codes = self._encode(x), self._encode(x_cf)
                self.batches.append(CachedBatch(batch, [pairs[int(i)].order for i in batch.index], x, codes, cf_codes,
                                                base_logits, cf_logits))
        self.n_features = self.batches[0].codes.shape[-1]
        self.n_pairs = len(pairs)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dictionary.encode(x.to(self.dictionary.b_dec.dtype))

    def _clean(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The untouched run's final logits and its activation at the hook."""
        out = spliced_forward(self.model, ids, {}, self.special_ids, read=[self.hook], at=_final(ids))
        return wide(out.logits.detach()), out.activations[self.hook].detach()

    # ---------------------------------------------------------------- the intervention

    def patch(self, batch: CachedBatch, patched: torch.Tensor, rows: Sequence[int] | None = None) -> PatchCodes:
        """The splice edit patching ``patched`` (a boolean ``[n]`` mask, or ``[k, n]`` for ``k`` sets over the rows
        repeated ``k`` times) from the counterfactual. A float mask ``w`` patches the codes ``c + w (c̄ − c)`` (used
        to check the attribution by finite differences)."""
        r = slice(None) if rows is None else torch.as_tensor(list(rows), device=self.device)
        c, c_cf = batch.codes[r], batch.cf_codes[r]
        w = patched.to(self.device)
        masks = w.reshape(-1, 1, 1, self.n_features)  # [k, 1, 1, n]
        k = masks.shape[0]
        if w.dtype == torch.bool:
            codes = torch.where(masks, c_cf, c)
        else:
            codes = c + masks.to(c.dtype) * (c_cf - c)
        features = (masks != 0).expand(k, c.shape[0], 1, self.n_features).flatten(0, 1)  # one mask per row
        return PatchCodes(self.dictionary, features, codes.flatten(0, 1))

    def patched_logits(self, batch: CachedBatch, patched: torch.Tensor,
                       rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final logits of the patched base run (rows repeated once per set of a ``[k, n]`` mask) and ``x' − x``."""
        ids = (
            batch.pairs.base_ids
            if rows is None
            else batch.pairs.base_ids[torch.as_tensor(list(rows), device=self.device)]
        )
        ids = ids.repeat(patched.reshape(-1, self.n_features).shape[0], 1)
        edit = _Measured(self.patch(batch, patched, rows))
        out = spliced_forward(self.model, ids, {self.hook: edit}, self.special_ids, at=_final(ids))
        return wide(out.logits), edit.delta

    # ---------------------------------------------------------------- metrics

    @torch.no_grad()
    def evaluate(self, patched: torch.Tensor, orders: Sequence[str] = ("all",)) -> dict[str, dict[str, float]]:
        """KL(patched || counterfactual), logit difference restored and edit size per order, in one pass."""
        totals = {order: PairTotals() for order in orders}
        for batch in self.batches:
            logits, delta = self.patched_logits(batch, patched)
            changed = self.changed_positions(batch, patched)
            for order, total in totals.items():
                if rows := batch.rows(order):
                    r = torch.tensor(rows, device=self.device)
                    p = batch.pairs
                    total.add(logits[r], batch.base_logits[r], batch.cf_logits[r], p.base_answer[r],
                              p.counterfactual_answer[r], delta[r], changed[r])
        return {order: total.result() for order, total in totals.items() if total.n}

    def changed_positions(self, batch: CachedBatch, patched: torch.Tensor) -> torch.Tensor:
        """``[b, T]``: the positions the patch of ``patched`` (a ``[n]`` mask) changes: ordinary-text positions where
        some patched feature's code differs between the two runs (never BOS, nor the prefix both prompts share)."""
        differs = ((batch.codes != batch.cf_codes) & patched.to(self.device).bool()).any(-1)
        return differs & token_mask(batch.pairs.base_ids, self.special_ids)

    @torch.no_grad()
    def kl(self, patched: torch.Tensor, order: str = "all") -> float:
        """The pruning metric: mean KL(patched || counterfactual) over the pairs of ``order``."""
        return self.kl_many(patched.reshape(1, -1), order)[0]

    @torch.no_grad()
    def kl_many(self, masks: Sequence[torch.Tensor] | torch.Tensor, order: str = "all") -> list[float]:
        """``kl`` of several patched sets, each batch of pairs run once for all of them (the sets stacked on the
        rows)."""
        masks = torch.stack(list(masks)) if not isinstance(masks, torch.Tensor) else masks
        k = masks.shape[0]
        totals, n = torch.zeros(k, dtype=torch.float64), 0
        for batch in self.batches:
            if not (rows := batch.rows(order)):
                continue
            logits, _ = self.patched_logits(batch, masks, rows)
            cf = batch.cf_logits[torch.tensor(rows, device=self.device)].repeat(k, 1)
            totals += kl_patched_to_counterfactual(logits, cf).reshape(k, len(rows)).sum(1).double().cpu()
            n += len(rows)
        if n == 0:
            raise ConfigError(f"no pairs of order {order!r}")
        return (totals / n).tolist()

    def unpatched(self, orders: Sequence[str] = ("all",)) -> dict[str, dict[str, float]]:
        return self.evaluate(torch.zeros(self.n_features, dtype=torch.bool), orders)

    def orders(self) -> list[str]:
        return ["all", *dict.fromkeys(o for b in self.batches for o in b.orders if o)]

    @torch.no_grad()
    def live(self) -> torch.Tensor:
        """Features whose codes differ between the two runs at some position of some pair (only they can matter)."""
        differs = torch.zeros(self.n_features, dtype=torch.bool, device=self.device)
        for batch in self.batches:
            differs |= (batch.codes != batch.cf_codes).flatten(0, -2).any(0)
        return differs.cpu()

    def attribution(self, ranking: str = "signed") -> torch.Tensor:
        """The rank score of each feature from ``e_j = Σ (c̄ − c)_j · ∂KL/∂c_j``, the predicted change of the mean
        KL over all pairs when feature ``j`` alone is patched (the gradient with respect to the codes the splice's
        ``PatchCodes`` sets, taken at the base run's own codes): ``−e_j`` for ``signed`` (most KL-reducing first; a
        feature predicted to raise the KL ranks last), ``|e_j|`` for ``magnitude``, ``e_j`` itself for
        ``effect``."""
        sums = torch.zeros(self.n_features, dtype=torch.float64)
        for batch in self.batches:
            codes = batch.codes.detach().clone().requires_grad_(True)
            everything = torch.ones(self.n_features, dtype=torch.bool, device=self.device)
            edit = PatchCodes(self.dictionary, everything, codes)
            with torch.enable_grad():
                ids = batch.pairs.base_ids
                logits = spliced_forward(self.model, ids, {self.hook: edit}, self.special_ids, at=_final(ids)).logits
                loss = kl_patched_to_counterfactual(wide(logits), batch.cf_logits).sum() / self.n_pairs
                (grad,) = torch.autograd.grad(loss, codes)
            sums += attribution_sums(batch.cf_codes - batch.codes, grad).cpu()
        return {"signed": -sums, "magnitude": sums.abs(), "effect": sums}[ranking].float()


# -------------------------------------------------------------------------------------------- the study's curves


ORDERINGS = ("greedy", "attribution", "random")
RANKINGS = ("signed", "magnitude")


@dataclass(frozen=True)
class CurveSettings:
    """How the patched sets are chosen (``sae.circuits.config.PatchingSettings``' ``orderings``, ``rankings``,
    ``greedy``, ``attribution``, ``orders``...)."""

    orderings: tuple[str, ...] = ("attribution", "random")
    orders: tuple[str, ...] = ("all", "ABBA", "BABA")
    select_on: str = "all"  # all | each
    rankings: tuple[str, ...] = ("signed",)  # attribution's ranking(s): signed | magnitude, one curve each
    thresholds: tuple[float, ...] = tuple(log_thresholds())
    seed: int = 0
    random_seed: int = 0
    live_only: bool = True
    max_candidates: int | None = None
    lookahead: int = 1  # greedy visits evaluated per batched forward (1: one at a time)
    sizes: tuple[int, ...] | None = None
    points: int = 24

    @classmethod
    def from_settings(cls, s) -> CurveSettings:
        """From a ``PatchingSettings``; one ConfigError naming the first setting out of range."""
        unknown = sorted(set(s.orderings) - set(ORDERINGS))
        if unknown:
            raise ConfigError(f"analysis.orderings: unknown {unknown}; use any of {list(ORDERINGS)}")
        bad = sorted(set(s.rankings) - set(RANKINGS))
        if bad or not s.rankings:
            raise ConfigError(f"analysis.rankings={list(s.rankings)}: use signed and/or magnitude")
        if s.select_on not in ("all", "each"):
            raise ConfigError(f"analysis.select_on={s.select_on!r}; use all or each")
        g, taus = s.greedy, s.greedy.thresholds
        for key, value in (("greedy.max_candidates", g.max_candidates), ("greedy.lookahead", g.lookahead),
                           ("attribution.points", s.attribution.points - 1)):
            if value is not None and value < 1:
                raise ConfigError(f"analysis.{key} must be at least {2 if key.endswith('points') else 1}")
        return cls(orderings=tuple(s.orderings), orders=tuple(s.orders), select_on=s.select_on,
                   rankings=tuple(dict.fromkeys(s.rankings)),
                   thresholds=tuple(log_thresholds(taus.n, taus.low, taus.high)), seed=g.seed,
                   random_seed=s.random_seed, live_only=g.live_only, max_candidates=g.max_candidates,
                   lookahead=g.lookahead, sizes=None if s.attribution.sizes is None else tuple(s.attribution.sizes),
                   points=s.attribution.points)

    def forward_passes(self, n_candidates: int, n_batches: int) -> int:
        """About how many batched forward passes the curves of one (method, hook) cost with ``n_candidates`` live
        features over ``n_batches`` batches of pairs (greedy: one per candidate per threshold; every other curve
        point: one; attribution: one backward)."""
        points = len(self.sizes) if self.sizes is not None else self.points
        per_batch = 1 + points * (("attribution" in self.orderings) * len(self.rankings) + ("random" in self.orderings))
        if "greedy" in self.orderings:
            candidates = min(n_candidates, self.max_candidates or n_candidates)
            per_batch += len(self.thresholds) * (candidates + 1) * (1 if self.select_on == "all" else 3)
        return per_batch * n_batches


def _live(problem: PatchingProblem, settings: CurveSettings) -> torch.Tensor:
    return problem.live() if settings.live_only else torch.ones(problem.n_features, dtype=torch.bool)


def _greedy_start(problem: PatchingProblem, settings: CurveSettings, scores: torch.Tensor | None,
                  live: torch.Tensor) -> torch.Tensor:
    """Greedy's start set: the live features, or only the top ``max_candidates`` of them by attribution (greedy
    costs about one forward per candidate per threshold; the attribution curve always ranks every live feature)."""
    if settings.max_candidates is None or int(live.sum()) <= settings.max_candidates:
        return live
    scores = problem.attribution(settings.rankings[0]) if scores is None else scores
    top = ranked(scores, live)[:int(settings.max_candidates)]
    keep = torch.zeros_like(live)
    keep[top] = True
    return keep


class _LastStats:
    """``stats`` that remembers its last patched set: the attribution curve asks for each point's metric and then
    for its stats, of the same set, and one pass of ``evaluate`` answers both (half the forward passes)."""

    def __init__(self, stats: Callable[[torch.Tensor], dict]):
        self.stats, self.key, self.value = stats, None, None

    def __call__(self, patched: torch.Tensor) -> dict:
        key = patched.cpu().numpy().tobytes()
        if key != self.key:
            self.key, self.value = key, self.stats(patched)
        return self.value


def _rows(points: list[CurvePoint], orders: Sequence[str], unpatched: dict, **key) -> list[dict]:
    """Rows per order from points whose stats hold each order's metrics."""
    rows = []
    for order in orders:
        if order not in unpatched:
            continue
        at_order = [dataclasses.replace(p, metric=p.stats[order]["kl"], stats=p.stats[order]) for p in points]
        rows += curve_rows(at_order, order=order, unpatched_kl=unpatched[order]["kl"], **key)
    return rows


def _random_order(live: torch.Tensor, seed: int) -> torch.Tensor:
    """Scores that rank the live features in a seeded random order: the random ordering's curve patches the same
    number of random live features as each point of the attribution curve (the control)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(live.numel(), generator=gen, dtype=torch.float64)


def patching_curves(problem: PatchingProblem, settings: CurveSettings, *, method: str, hook: str, model: str = "",
                    progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every curve of one (method, hook) as ``curves.csv`` rows: attribution (per ranking), random and greedy,
    measured on each order."""
    orders = [o for o in settings.orders if o in problem.orders()]
    unpatched = problem.unpatched(orders)
    key = dict(method=method, hook=hook, model=model)
    stats = lambda patched: problem.evaluate(patched, orders)  # noqa: E731
    effect = problem.attribution("effect") if {"attribution", "greedy"} & set(settings.orderings) else None
    by_ranking = {r: (-effect if r == "signed" else effect.abs()) for r in settings.rankings} if effect is not None \
        else {}
    live = _live(problem, settings)
    rows: list[dict] = []
    if "greedy" in settings.orderings:
        selections = ["all"] if settings.select_on == "all" else orders
        for chosen_on in selections:
            points = greedy_prune(
                lambda patched: problem.kl(patched, chosen_on),
                problem.n_features,
                settings.thresholds,
                settings.seed,
                stats,
                _greedy_start(problem, settings, by_ranking[settings.rankings[0]], live),
                None
                if progress is None
                else lambda i, tau, n: progress(f"{method} {hook} greedy ({chosen_on}): tau {tau:.2g}, {n} features"),
                metric_many=lambda masks: problem.kl_many(masks, chosen_on),
                lookahead=settings.lookahead,
            )
            measured = orders if settings.select_on == "all" else [chosen_on]
            rows += _rows(points, measured, unpatched, ordering="greedy", **key)
    sizes = settings.sizes if settings.sizes is not None else size_grid(int(live.sum()), settings.points)
    curves = [("attribution", r, by_ranking[r]) for r in settings.rankings if "attribution" in settings.orderings]
    if "random" in settings.orderings:
        curves.append(("random", "", _random_order(live, settings.random_seed)))
    for ordering, ranking, scores in curves:
        measured = _LastStats(stats)
        metric = (lambda patched: measured(patched)["all"]["kl"]) if "all" in orders else problem.kl
        points = attribution_curve(metric, scores, sizes, measured, live)
        rows += _rows(points, orders, unpatched, ordering=ordering, ranking=ranking, **key)
    return rows


def write_outputs(rows: Sequence[dict], out, title: str, target_fraction: float = 0.5) -> dict[str, object]:
    """``patching/curves.csv``, ``patching/summary.csv`` and ``plots/patching_<hook>.png`` under ``out``; the
    title should name the model (labelled when it is a stand-in) and the task."""
    from pathlib import Path

    from sae.circuits.curves import summarise, write_curves, write_summary
    from sae.circuits.plots import plot_patching_hooks

    out = Path(out)
    summary = summarise(rows, target_fraction)
    write_curves(out / "patching" / "curves.csv", rows)
    write_summary(out / "patching" / "summary.csv", summary)
    plots = plot_patching_hooks(rows, out / "plots", title, "all", target_fraction)
    return {"curves": out / "patching" / "curves.csv", "summary": out / "patching" / "summary.csv", "plots": plots,
            "rows": summary}
