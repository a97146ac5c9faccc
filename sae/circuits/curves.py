"""The patching study's tables: every curve point as a row (``patching/curves.csv``) and, per method and hook, the
fewest features that bring the KL down to a fraction of the unpatched KL and the lowest KL reached
(``patching/summary.csv``).

A row is a plain dict with the keys of ``CURVE_FIELDS``; ``ordering`` is how the patched set was chosen (greedy
pruning, attribution or random), ``ranking`` how attribution ranked the features (signed or magnitude; empty for the
other orderings), ``order`` the pairs it was measured on (ABBA, BABA or all). The edit size is
``edit_per_changed_position``: ``||x' − x||`` over the positions the patch changes only (``sae.circuits.metrics``),
``changed_positions`` of them per pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sae.circuits.pruning import CurvePoint
from sae.errors import ConfigError
from sae.io.atomic import write_csv

CURVE_FIELDS = ("model", "method", "hook", "order", "ordering", "ranking", "threshold", "n_features", "kl",
                "unpatched_kl", "logit_diff_restored", "edit_per_changed_position", "changed_positions", "evaluations")
SUMMARY_FIELDS = ("model", "method", "hook", "order", "ordering", "ranking", "unpatched_kl", "target_kl",
                  "fewest_features", "kl_at_fewest", "edit_per_changed_position_at_fewest", "min_kl",
                  "n_features_at_min_kl", "edit_per_changed_position_at_min_kl")
EDIT = "edit_per_changed_position"
KEY = ("model", "method", "hook", "order", "ordering", "ranking")


def curve_rows(points: Sequence[CurvePoint], *, method: str, hook: str, order: str, ordering: str,
               unpatched_kl: float, model: str = "", ranking: str = "") -> list[dict]:
    """Rows of one curve; a point's ``stats`` supply ``logit_diff_restored``, ``edit_per_changed_position`` and
    ``changed_positions`` when present."""
    return [{"model": model, "method": method, "hook": hook, "order": order, "ordering": ordering, "ranking": ranking,
             "threshold": p.threshold, "n_features": p.n_features, "kl": p.metric, "unpatched_kl": float(unpatched_kl),
             "logit_diff_restored": p.stats.get("logit_diff_restored"),
             "edit_per_changed_position": p.stats.get("edit_per_changed_position"),
             "changed_positions": p.stats.get("changed_positions"), "evaluations": p.evaluations} for p in points]


def _group(rows: Iterable[Mapping]) -> dict[tuple, list[Mapping]]:
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k, "") for k in KEY), []).append(row)
    return groups


def summarise(rows: Iterable[Mapping], target_fraction: float = 0.5) -> list[dict]:
    """Per curve: the fewest features with KL <= target_fraction x unpatched KL (empty when never reached; the
    smallest edit among such points breaks ties) and the minimum KL with its size."""
    if not 0 < target_fraction <= 1:
        raise ConfigError(f"patching.target_fraction={target_fraction} must be in (0, 1]")
    out = []
    for key, group in _group(rows).items():
        unpatched = float(group[0]["unpatched_kl"])
        target = target_fraction * unpatched
        finite = [r for r in group if math.isfinite(float(r["kl"]))]
        reached = [r for r in finite if float(r["kl"]) <= target]
        best = min(reached, key=lambda r: (int(r["n_features"]), _edit(r))) if reached else None
        lowest = min(finite, key=lambda r: (float(r["kl"]), int(r["n_features"]))) if finite else None
        out.append({**dict(zip(KEY, key)), "unpatched_kl": unpatched, "target_kl": target,
                    "fewest_features": None if best is None else int(best["n_features"]),
                    "kl_at_fewest": None if best is None else float(best["kl"]),
                    "edit_per_changed_position_at_fewest": None if best is None else best.get(EDIT),
                    "min_kl": None if lowest is None else float(lowest["kl"]),
                    "n_features_at_min_kl": None if lowest is None else int(lowest["n_features"]),
                    "edit_per_changed_position_at_min_kl": None if lowest is None else lowest.get(EDIT)})
    return out


def _edit(row: Mapping) -> float:
    value = row.get(EDIT)
    return math.inf if value in (None, "") else float(value)


def write_curves(path: Path, rows: Iterable[Mapping]) -> None:
    write_csv(path, [{k: _cell(v) for k, v in r.items()} for r in rows], CURVE_FIELDS, only=True)


def write_summary(path: Path, rows: Iterable[Mapping]) -> None:
    write_csv(path, [{k: _cell(v) for k, v in r.items()} for r in rows], SUMMARY_FIELDS, only=True)


def read_rows(path: Path) -> list[dict]:
    """A curves or summary CSV back as dicts of strings (empty cells as None)."""
    import csv

    with open(path, newline="") as handle:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(handle)]


def _cell(value) -> object:
    """Empty for a missing value, floats at full precision, the rest as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value
