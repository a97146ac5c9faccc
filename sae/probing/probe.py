"""The probes: balanced one-vs-rest problems on seeded train/test splits, the k latents chosen on the training
split by class-mean difference (SAEBench's rule), a logistic regression (scikit-learn), and an interval over splits.

Everything here works on pooled latents ``[n_texts, n_latents]`` (numpy), so it is independent of the LM and of
how the latents were computed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

DENSE = "dense"  # the k of a probe that sees every latent


@dataclass
class Problem:
    """One binary problem of one split: rows of the pooled latents and their labels (1: the positive class)."""

    positive: str
    train: np.ndarray
    train_y: np.ndarray
    test: np.ndarray
    test_y: np.ndarray


def split(labels: list[str], test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)``: per class, a ``test_fraction`` share (at least one text, never all) to test."""
    y = np.asarray(labels)
    train, test = [], []
    for c in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def balanced(rows: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` cut to as many negatives as positives (each side a random sample of the larger one's size),
    shuffled, with their 0/1 labels: SAEBench's balanced one-vs-rest sets."""
    pos, neg = rows[positive], rows[~positive]
    n = min(len(pos), len(neg))
    chosen = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    order = rng.permutation(2 * n)
    return chosen[order], y[order]


def problems(labels: list[str], test_fraction: float, seed: int) -> list[Problem]:
    """The binary problems of one split: one (the second class against the first) for two classes, else each
    class against a balanced sample of the others (SAEBench's one-vs-rest); the accuracy is their mean."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train, test = split(labels, test_fraction, rng)
    classes = sorted(set(labels))
    out = []
    for c in classes[1:] if len(classes) == 2 else classes:
        tr, tr_y = balanced(train, y[train] == c, rng)
        te, te_y = balanced(test, y[test] == c, rng)
        out.append(Problem(c, tr, tr_y, te, te_y))
    return out


def top_k_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` columns of ``x`` whose class means differ most, |mean(x | y=1) - mean(x | y=0)| (SAEBench's rule),
    largest first; ties broken by the lower index."""
    difference = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-difference, kind="stable")[:k]


def probe_accuracy(x: np.ndarray, problem: Problem, k: int | str, C: float, max_iter: int) -> float:
    """Test accuracy of a logistic regression trained on ``problem``'s training rows of ``x`` restricted to the
    ``k`` latents chosen there (all of them for ``k='dense'``)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train, test = x[problem.train], x[problem.test]
    if k != DENSE:
        columns = top_k_by_mean_difference(train, problem.train_y, int(k))
        train, test = train[:, columns], test[:, columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # as SAEBench: max_iter bounds the fit
        probe = LogisticRegression(C=C, max_iter=max_iter).fit(train, problem.train_y)
    return float((probe.predict(test) == problem.test_y).mean())


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, low, high, sd)``: the mean over splits with a Student-t interval (low = high = mean for one split)."""
    from scipy.stats import t

    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, mean, mean, 0.0
    sd = float(a.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, len(a) - 1)) * sd / math.sqrt(len(a))
    return mean, mean - half, mean + half, sd


def ks_for(width: int, ks: list[int], dense: bool) -> list[int | str]:
    """The probe sizes that apply to a method of ``width`` latents."""
    return [k for k in ks if k < width] + ([DENSE] if dense else [])
