"""Scores: expected activation from log-probs, correlation of simulated and true activations, detection and
fuzzing metrics, and bootstrap intervals. Undefined scores are NaN (and counted), never a crash or a fake 0."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DIGITS = tuple(str(i) for i in range(11))


def expected_value(table: Mapping[str, float] | None, p_zero_after_one: float | None = None) -> float:
    """E[activation] under the next-token distribution restricted to "0".."10" (renormalised); NaN if none there.

    Keys are token texts (whitespace stripped before matching, so " 7" counts as "7"). Where the tokenizer writes
    "10" as "1" then "0" (SmolLM2, Llama, Mistral, Qwen), pass ``p_zero_after_one`` = P("0" | the prompt, "1"), read
    from a second step: the mass on "1" is then split into P("1")·P("0"|"1") for 10 and the rest for 1.
    """
    if not table:
        return math.nan
    mass = np.zeros(len(DIGITS))
    for token, logprob in table.items():
        key = token.strip()
        if key in DIGITS and logprob is not None and math.isfinite(logprob):
            mass[int(key)] += math.exp(logprob)
    if p_zero_after_one is not None and math.isfinite(p_zero_after_one):
        ten = mass[1] * min(1.0, max(0.0, p_zero_after_one))
        mass[10] += ten
        mass[1] -= ten
    total = mass.sum()
    return float((mass * np.arange(len(DIGITS))).sum() / total) if total > 0 else math.nan


def digit_share(table: Mapping[str, float] | None, digit: str) -> float:
    """P(digit) / P(any of "0".."10") in a first-token table; 0 when there is no digit mass."""
    if not table:
        return 0.0
    mass = {d: 0.0 for d in DIGITS}
    for token, logprob in table.items():
        key = token.strip()
        if key in mass and logprob is not None and math.isfinite(logprob):
            mass[key] += math.exp(logprob)
    total = sum(mass.values())
    return mass[digit] / total if total > 0 else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where both are finite; NaN when either side is constant or too short."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-12 else math.nan


def _concat(parts: Iterable[Sequence[float] | None], like: Iterable[Sequence[float]]) -> list[float]:
    """Concatenate simulations; a missing one (None) becomes NaNs of its fragment's length."""
    out: list[float] = []
    for sim, true in zip(parts, like):
        out += list(sim) if sim is not None else [math.nan] * len(true)
    return out


def simulation_scores(true_top: Sequence[Sequence[float]], sim_top: Sequence[Sequence[float] | None],
                      true_random: Sequence[Sequence[float]], sim_random: Sequence[Sequence[float] | None]) -> dict:
    """Correlation over all scored tokens concatenated (top + random, the paper's default), and each set alone."""
    flat = lambda frags: [max(0.0, float(v)) for f in frags for v in f]  # noqa: E731  (relu: what was shown)
    t_top, t_rand = flat(true_top), flat(true_random)
    s_top, s_rand = _concat(sim_top, true_top), _concat(sim_random, true_random)
    if all(s is None for s in [*sim_top, *sim_random]):
        return {"all": math.nan, "top": math.nan, "random": math.nan}
    return {"all": pearson(t_top + t_rand, s_top + s_rand), "top": pearson(t_top, s_top),
            "random": pearson(t_rand, s_rand)}


def balanced_accuracy(labels: Sequence[bool], answers: Sequence[bool | None]) -> float:
    """Mean of the true-positive and true-negative rates; an unreadable answer (None) counts as wrong."""
    pos = [a is True for lab, a in zip(labels, answers) if lab]
    neg = [a is False for lab, a in zip(labels, answers) if not lab]
    if not pos or not neg:
        return math.nan
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half) over finite scores; NaN if a class is missing."""
    pairs = [(bool(lab), float(s)) for lab, s in zip(labels, scores) if s is not None and math.isfinite(s)]
    pos = np.array([s for lab, s in pairs if lab])
    neg = np.array([s for lab, s in pairs if not lab])
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and percentile bootstrap interval over the finite values (features resampled with replacement)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n_undefined = len(values) - x.size
    if x.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "n_undefined": n_undefined}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1) if x.size > 1 else np.full(n_boot, x[0])
    tail = (1 - level) / 2
    return {
        "mean": float(x.mean()),
        "ci_low": float(np.quantile(means, tail)),
        "ci_high": float(np.quantile(means, 1 - tail)),
        "n": int(x.size),
        "n_undefined": int(n_undefined),
    }
