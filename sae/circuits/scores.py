"""Arithmetic for judging a circuit: how much of the target survives when only the circuit is kept (faithfulness),
how much is left when only the circuit is removed (completeness), against random circuits of the same size; and
how well a cheap ranking of upstream features (attribution) agrees with the exact one (ablation).

All are pure functions of numbers the caller measured with the splice; the three measurements are the target's
value (a feature's activation, or a task metric such as the logit difference) with

- the full model (nothing ablated): ``full``;
- everything outside the circuit mean-ablated (errors kept): ``circuit``;
- every feature mean-ablated, the empty circuit (errors kept): ``empty``;
- only the circuit's features mean-ablated: ``without_circuit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def fraction_surviving(value: float, full: float) -> float:
    """``value / full``: the share of the full model's target left (NaN when the full target is 0)."""
    return value / full if abs(full) > 1e-12 else math.nan


def faithfulness(circuit: float, full: float, empty: float) -> float:
    """``(circuit − empty) / (full − empty)`` (Marks et al. 2024): 1 for the full model, 0 for the empty circuit."""
    gap = full - empty
    return (circuit - empty) / gap if abs(gap) > 1e-12 else math.nan


def completeness_left(without_circuit: float, full: float, empty: float) -> float:
    """``(without_circuit − empty) / (full − empty)``: what is left of the target once only the circuit is ablated;
    0 means the circuit holds all of it, 1 that the rest of the model does the same without it."""
    return faithfulness(without_circuit, full, empty)


def against_random(value: float, random_values: Sequence[float]) -> dict[str, float]:
    """A circuit's score beside random circuits of its size: their mean and std and the share of them it beats."""
    values = [float(v) for v in random_values if math.isfinite(float(v))]
    if not values:
        return {"random_mean": math.nan, "random_std": math.nan, "beats_random": math.nan, "n_random": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"random_mean": mean, "random_std": std, "beats_random": sum(value > v for v in values) / len(values),
            "n_random": len(values)}


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-d tensor, ties sharing their average rank (the convention Spearman's rho needs)."""
    values = values.detach().double().flatten().cpu()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    out = torch.empty_like(values)
    i, n = 0, values.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average) ranks. NaN when either is constant."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() != b.numel():
        raise ValueError(f"spearman: {a.numel()} values against {b.numel()}")
    if a.numel() < 2:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / scale if scale > 0 else math.nan


def top_k(values: torch.Tensor, k: int) -> set[int]:
    """Indices of the ``k`` largest values (ties by lower index)."""
    values = values.detach().double().flatten().cpu()
    order = sorted(range(values.numel()), key=lambda j: (-float(values[j]), j))
    return set(order[:k])


def same_top_k(cheap: torch.Tensor, exact: torch.Tensor, k: int = 3) -> bool:
    """Whether a cheap ranking picks the same top ``k`` (as a set) as the exact one."""
    return top_k(cheap, k) == top_k(exact, k)
