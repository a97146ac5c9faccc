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
            zero = torch.zeros_like(delta)
            for order, total in totals.items():
                if rows := batch.rows(order):
                    r = torch.tensor(rows, device=self.device)
                    p = batch.pairs
                    total.add(logits[r], batch.base_logits[r], batch.cf_logits[r], p.base_answer[r],
                              p.counterfactual_answer[r], delta[r], zero[r])
        return {order: total.result() for order, total in totals.items() if total.n}

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

    def attribution(self, signed: bool = False) -> torch.Tensor:
        """``|Σ (c̄ − c) · ∂KL/∂c|`` per feature: the gradient of the mean KL over all pairs with respect to the codes
        the splice's ``PatchCodes`` sets, taken at the base run's own codes (nothing patched yet)."""
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
        return sums.float() if signed else sums.abs().float()


# -------------------------------------------------------------------------------------------- the study's curves


@dataclass(frozen=True)
class CurveSettings:
    """How the patched sets are chosen (conf/analysis/patching.yaml's ``greedy``, ``attribution``, ``orders``...)."""

    orderings: tuple[str, ...] = ("greedy", "attribution")
    orders: tuple[str, ...] = ("all", "ABBA", "BABA")
    select_on: str = "all"  # all | each
    thresholds: tuple[float, ...] = tuple(log_thresholds())
    seed: int = 0
    live_only: bool = True
    max_candidates: int | None = None
    lookahead: int = 1  # greedy visits evaluated per batched forward (1: one at a time)
    sizes: tuple[int, ...] | None = None
    points: int = 24

    @classmethod
    def from_config(cls, cfg) -> CurveSettings:
        greedy, attribution = cfg.get("greedy", {}) or {}, cfg.get("attribution", {}) or {}
        taus = greedy.get("thresholds", {}) or {}
        orderings = tuple(cfg.get("orderings", cls.orderings))
        unknown = sorted(set(orderings) - {"greedy", "attribution"})
        if unknown:
            raise ConfigError(f"patching.orderings: unknown {unknown}; use greedy and/or attribution")
        if cfg.get("select_on", "all") not in ("all", "each"):
            raise ConfigError(f"patching.select_on={cfg.get('select_on')!r}; use all or each")
        sizes = attribution.get("sizes")
        return cls(orderings=orderings, orders=tuple(cfg.get("orders", cls.orders)),
                   select_on=str(cfg.get("select_on", "all")),
                   thresholds=tuple(log_thresholds(int(taus.get("n", 50)), float(taus.get("low", 1e-5)),
                                                   float(taus.get("high", 1.0)))),
                   seed=int(greedy.get("seed", 0)), live_only=bool(greedy.get("live_only", True)),
                   max_candidates=greedy.get("max_candidates"), lookahead=int(greedy.get("lookahead", 1)),
                   sizes=None if sizes is None else tuple(int(s) for s in sizes),
                   points=int(attribution.get("points", 24)))


def _live(problem: PatchingProblem, settings: CurveSettings) -> torch.Tensor:
    return problem.live() if settings.live_only else torch.ones(problem.n_features, dtype=torch.bool)


def _greedy_start(problem: PatchingProblem, settings: CurveSettings, scores: torch.Tensor | None,
                  live: torch.Tensor) -> torch.Tensor:
    """Greedy's start set: the live features, or only the top ``max_candidates`` of them by attribution (greedy
    costs about one forward per candidate per threshold; the attribution curve always ranks every live feature)."""
    if settings.max_candidates is None or int(live.sum()) <= settings.max_candidates:
        return live
    top = ranked(problem.attribution() if scores is None else scores, live)[:int(settings.max_candidates)]
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


def patching_curves(problem: PatchingProblem, settings: CurveSettings, *, method: str, hook: str, model: str = "",
                    progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every curve of one (method, hook) as ``curves.csv`` rows: greedy and attribution, measured on each order."""
    orders = [o for o in settings.orders if o in problem.orders()]
    unpatched = problem.unpatched(orders)
    key = dict(method=method, hook=hook, model=model)
    stats = lambda patched: problem.evaluate(patched, orders)  # noqa: E731
    scores = problem.attribution() if "attribution" in settings.orderings else None
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
                _greedy_start(problem, settings, scores, live),
                None
                if progress is None
                else lambda i, tau, n: progress(f"{method} {hook} greedy ({chosen_on}): tau {tau:.2g}, {n} features"),
                metric_many=lambda masks: problem.kl_many(masks, chosen_on),
                lookahead=settings.lookahead,
            )
            measured = orders if settings.select_on == "all" else [chosen_on]
            rows += _rows(points, measured, unpatched, ordering="greedy", **key)
    if "attribution" in settings.orderings:
        sizes = settings.sizes if settings.sizes is not None else size_grid(int(live.sum()), settings.points)
        measured = _LastStats(stats)
        metric = (lambda patched: measured(patched)["all"]["kl"]) if "all" in orders else problem.kl
        points = attribution_curve(metric, scores, sizes, measured, live)
        rows += _rows(points, orders, unpatched, ordering="attribution", **key)
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
