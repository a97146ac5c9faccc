"""A two-sided baseline's scores split by side: each direction's heavy-tail side (feature ``i``) against its other side
(feature ``d + i``), from an automatic-interpretation study's ``autointerp.csv`` and ``autointerp/meta.json``.

The study scores a PCA, ICA, random or residual-coordinate direction on both of its sides (see the study page), so
its mean mixes the side a reader would call "what it responds to" with the other one. This table says how much of a
baseline's score each side carries: mean [bootstrap 95% interval] (n scored) per layer, method and side.

    python experiments/autointerp_sides.py <out> --scores simulation detection
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from collections import defaultdict
from pathlib import Path


def interval(values: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    low, high = interval(values)
    return f"{sum(values) / len(values):.2f} [{low:.2f}, {high:.2f}] ({len(values)})"


def sides_table(out: Path, scores: list[str]) -> str:
    meta = json.loads((out / "autointerp" / "meta.json").read_text())
    directions = {(m["method"], m["hook"]): m["n_directions"] for m in meta["methods"]
                  if m.get("n_directions") and m.get("n_features") == 2 * m["n_directions"]}
    if not directions:
        raise SystemExit(f"{out}: no two-sided baseline in this study (a run before the two-sided rule, or no "
                         "baselines): nothing to split")
    cells: dict[tuple[int, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(out / "autointerp.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            d = directions.get((row["method"], row["hook"]))
            if d is None:
                continue
            side = "heavy tail" if int(row["feature"]) < d else "other side"
            for s in scores:
                value = float(row[s]) if row.get(s) not in (None, "") else math.nan
                if math.isfinite(value):
                    cells[(int(row["layer"]), row["method"], side)][s].append(value)
    head = ["layer", "method", "side", *scores]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (layer, method, side), got in sorted(cells.items()):
        lines.append("| " + " | ".join([str(layer), method, side, *(cell(got[s]) for s in scores)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the study's out folder (autointerp.csv and autointerp/meta.json)")
    parser.add_argument("--scores", nargs="+", default=["simulation", "detection"])
    args = parser.parse_args(argv)
    for need in (args.out / "autointerp.csv", args.out / "autointerp" / "meta.json"):
        if not need.is_file():
            raise SystemExit(f"{need} does not exist: give the out folder an analysis=autointerp run wrote")
    print(sides_table(args.out, args.scores))


if __name__ == "__main__":
    main()
