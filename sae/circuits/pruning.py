"""Choosing which features to patch: the paper's greedy pruning, and the attribution order as the fast path.

Both work over an abstract metric of a set of patched features, ``metric(patched) -> float`` with ``patched`` a
boolean mask over the candidate features, lower being better (the KL of the patched run to the counterfactual run).
Nothing here runs a model: the caller's metric does, so these are tested on hand-made metrics.

Greedy pruning (Cunningham et al. 2023, sec. 5): start with every candidate patched; for each threshold τ of an
ascending schedule, visit the still-patched features in a seeded random order and un-patch one whenever that raises
the metric by less than τ (a fall counts too). Small τ removes only the features that do nothing; growing τ trades
metric for fewer features, which traces the curve (|F|, metric) from all features down to few.

Attribution: rank features once by ``|(c̄ − c) · ∂metric/∂c|`` (the linear estimate of patching each feature alone,
from one backward pass) and patch the top n for a grid of n.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sae.errors import ConfigError

Metric = Callable[[torch.Tensor], float]
Stats = Callable[[torch.Tensor], dict]


@dataclass(frozen=True)
class CurvePoint:
    """One point of a patching curve: the patched set after a threshold (greedy) or a grid size (attribution)."""

    n_features: int
    metric: float
    threshold: float | None  # greedy: τ; attribution and the starting point: None
    features: tuple[int, ...]  # indices of the patched features
    evaluations: int  # metric calls so far (the cost of reaching this point)
    stats: dict = field(default_factory=dict)


def log_thresholds(n: int = 50, low: float = 1e-5, high: float = 1.0) -> list[float]:
    """``n`` thresholds log-spaced from ``low`` to ``high`` inclusive, ascending."""
    if n < 1 or not 0 < low <= high:
        raise ConfigError(f"thresholds: need n >= 1 and 0 < low <= high (got n={n}, low={low}, high={high})")
    if n == 1:
        return [float(low)]
    step = (math.log(high) - math.log(low)) / (n - 1)
    return [math.exp(math.log(low) + i * step) for i in range(n)]


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values or any(not t > 0 or not math.isfinite(t) for t in values) \
            or any(b < a for a, b in zip(values, values[1:])):
        raise ConfigError(f"thresholds must be positive, finite and ascending (got {values[:5]}...)")
    return values


def _point(
    patched: torch.Tensor, value: float, threshold: float | None, evaluations: int, stats: Stats | None
) -> CurvePoint:
    features = tuple(int(i) for i in patched.nonzero().flatten())
    return CurvePoint(len(features), float(value), threshold, features, evaluations,
                      dict(stats(patched.clone())) if stats is not None else {})


def greedy_prune(metric: Metric, n_features: int, thresholds: Sequence[float] | None = None, seed: int = 0,
                 stats: Stats | None = None, candidates: torch.Tensor | None = None,
                 progress: Callable[[int, float, int], None] | None = None,
                 metric_many: Callable[[list[torch.Tensor]], Sequence[float]] | None = None,
                 lookahead: int = 1) -> list[CurvePoint]:
    """The curve of greedy pruning: the starting point (every candidate patched), then one point per threshold.

    ``candidates`` (a boolean mask, default all) limits the start set, e.g. to features whose codes differ between
    the two runs somewhere (the others cannot matter). ``stats(patched)`` adds the caller's numbers (edit size,
    logit difference) to each recorded point; it is called once per point, not per visit. ``progress(i, τ, |F|)``
    is told after each threshold.

    With ``metric_many`` (the metric of several masks at once, e.g. one batched forward) and ``lookahead`` k > 1,
    the next k visits are evaluated together, each as if the earlier ones were kept; the first accepted removal
    invalidates the rest, which are re-evaluated. The result is the same as the one-at-a-time walk; only the
    number of evaluations (``CurvePoint.evaluations``) grows, while the number of batched calls falls.
    """
    schedule = _check_thresholds(log_thresholds() if thresholds is None else thresholds)
    patched = torch.ones(n_features, dtype=torch.bool) if candidates is None else candidates.clone().bool().cpu()
    if patched.shape != (n_features,):
        raise ConfigError(f"candidates has shape {tuple(patched.shape)}, expected ({n_features},)")
    if lookahead < 1:
        raise ConfigError(f"greedy lookahead={lookahead} must be at least 1")
    step = lookahead if metric_many is not None else 1
    rng = random.Random(seed)
    current, evaluations = float(metric(patched.clone())), 1
    curve = [_point(patched, current, None, evaluations, stats)]
    for i, tau in enumerate(schedule):
        order = [int(j) for j in patched.nonzero().flatten()]
        rng.shuffle(order)
        position = 0
        while position < len(order):
            chunk = order[position:position + step]
            trials = [_without(patched, j) for j in chunk]
            values = [float(metric(trials[0]))] if len(trials) == 1 else [float(v) for v in metric_many(trials)]
            evaluations += len(trials)
            for j, value in zip(chunk, values):
                position += 1
                if value - current < tau:
                    patched[j], current = False, value
                    break  # the later trials assumed j patched: evaluate them again
        curve.append(_point(patched, current, tau, evaluations, stats))
        if progress is not None:
            progress(i, tau, int(patched.sum()))
    return curve


def _without(patched: torch.Tensor, j: int) -> torch.Tensor:
    trial = patched.clone()
    trial[j] = False
    return trial


def attribution_sums(delta_codes: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``Σ (c̄ − c) · ∂metric/∂c`` per feature ``[n_features]`` (float64), summing every leading dim; signed, so
    that sums over batches can be added before the magnitude is taken."""
    if delta_codes.shape != grad.shape:
        raise ValueError(f"delta_codes {tuple(delta_codes.shape)} and grad {tuple(grad.shape)} differ")
    return (delta_codes.double() * grad.double()).reshape(-1, delta_codes.shape[-1]).sum(0)


def attribution_scores(delta_codes: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|Σ (c̄ − c) · ∂metric/∂c|`` per feature ``[n_features]``, summing every leading dim (pairs, positions).

    ``delta_codes`` is ``c̄ − c`` (counterfactual minus base codes) and ``grad`` the metric's gradient with respect
    to the codes at the base run, both ``[..., n_features]``: the sum is the first-order change of the metric when
    one feature is patched at every position, and its magnitude the rank (a feature that raises KL also matters).
    """
    return attribution_sums(delta_codes, grad).abs().float()


def size_grid(n_features: int, points: int = 24) -> list[int]:
    """Patched-set sizes for the attribution curve: 0, then about log-spaced up to ``n_features``, no repeats."""
    if n_features < 0 or points < 2:
        raise ConfigError(f"size grid: need n_features >= 0 and points >= 2 (got {n_features}, {points})")
    if n_features == 0:
        return [0]
    sizes = {0, n_features}
    for i in range(points - 1):
        sizes.add(int(round(n_features ** (i / (points - 2))) if points > 2 else n_features))
    return sorted(s for s in sizes if 0 <= s <= n_features)


def ranked(scores: torch.Tensor, candidates: torch.Tensor | None = None) -> list[int]:
    """Feature indices by descending score (ties by index, so the order is deterministic), candidates only."""
    scores = scores.detach().double().cpu()
    keep = range(scores.numel()) if candidates is None else [int(i) for i in candidates.nonzero().flatten()]
    return sorted(keep, key=lambda j: (-float(scores[j]), j))


def attribution_curve(metric: Metric, scores: torch.Tensor, sizes: Sequence[int] | None = None,
                      stats: Stats | None = None, candidates: torch.Tensor | None = None) -> list[CurvePoint]:
    """Patch the top ``n`` features by ``scores`` for each ``n`` of ``sizes`` (default ``size_grid``), ascending."""
    order = ranked(scores, candidates)
    sizes = size_grid(len(order)) if sizes is None else sorted({int(n) for n in sizes})
    if sizes and (sizes[0] < 0 or sizes[-1] > len(order)):
        raise ConfigError(f"attribution sizes must lie in [0, {len(order)}] (got {sizes[0]}..{sizes[-1]})")
    curve = []
    for k, n in enumerate(sizes, 1):
        patched = torch.zeros(scores.numel(), dtype=torch.bool)
        patched[order[:n]] = True
        curve.append(_point(patched, float(metric(patched.clone())), None, k, stats))
    return curve
