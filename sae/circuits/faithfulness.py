"""How much of the target a circuit carries, measured through the splice: every feature outside the circuit at each
layer the circuit spans set to its held-out mean (or to zero), the reconstruction errors kept, against random
circuits of the same size per layer (drawn from the features live on the contexts: a dead feature ablated changes
nothing, so drawing from all would flatter the control's emptiness). The arithmetic is ``sae.circuits.scores``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sae.circuits.discovery import CircuitProblem, Level
from sae.circuits.scores import against_random, completeness_left, faithfulness
from sae.lm.hooks import HookPoint
from sae.lm.splice import PatchCodes


def _edits(span: Sequence[Level], kept: Mapping[HookPoint, torch.Tensor], baseline: Mapping[HookPoint, torch.Tensor]):
    """At each level's hook, every feature not ``kept`` (a bool ``[n]`` mask) set to its ``baseline`` code."""
    return {lv.hook: PatchCodes(lv.dictionary, ~kept[lv.hook], baseline[lv.hook]) for lv in span}


def _mask(level: Level, features, device) -> torch.Tensor:
    mask = torch.zeros(level.dictionary.n_features, dtype=torch.bool, device=device)
    mask[list(features)] = True
    return mask


def circuit_scores(problem: CircuitProblem, target: Level, target_index: int | None, span: Sequence[Level],
                   circuit: Mapping[HookPoint, Sequence[int]], baseline: Mapping[HookPoint, torch.Tensor],
                   random_circuits: int = 10, seed: int = 0) -> dict[str, float]:
    """The target's mean value with the full model, the circuit only, nothing (every feature ablated) and the
    model without the circuit; faithfulness and completeness from them, and the random circuits' faithfulness."""
    device = problem.device
    index = [target_index if target_index is not None else 0]
    baseline = {h: b.to(device) for h, b in baseline.items()}

    def value(kept: Mapping[HookPoint, torch.Tensor]) -> float:
        edits = _edits(span, kept, baseline)
        return float(problem.mean_value(target, index, lambda batch: edits)[0])

    masks = {lv.hook: _mask(lv, circuit.get(lv.hook, ()), device) for lv in span}
    full = float(problem.mean_value(target, index)[0])
    empty = value({h: torch.zeros_like(m) for h, m in masks.items()})
    kept = value(masks)
    without = value({h: ~m for h, m in masks.items()})
    gen = torch.Generator().manual_seed(seed)
    randoms = []
    for _ in range(random_circuits):
        drawn = {}
        for lv in span:
            live = problem.live(lv).nonzero().squeeze(-1).cpu()
            size = min(int(masks[lv.hook].sum()), len(live))
            drawn[lv.hook] = _mask(lv, live[torch.randperm(len(live), generator=gen)[:size]].tolist(), device)
        randoms.append(faithfulness(value(drawn), full, empty))
    score = faithfulness(kept, full, empty)
    return {
        "full": full,
        "empty": empty,
        "circuit": kept,
        "without_circuit": without,
        "faithfulness": score,
        "completeness_left": completeness_left(without, full, empty),
        "circuit_size": int(sum(m.sum() for m in masks.values())),
        **against_random(score, randoms),
    }
