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
from collections import defaultdict
from pathlib import Path

from sae.autointerp.scoring import bootstrap_ci


def cell(values: list[float]) -> str:
    """``mean [low, high] (n)``, the interval as the study's summary computes it (``bootstrap_ci``)."""
    ci = bootstrap_ci(values)
    return "–" if not ci["n"] else f"{ci['mean']:.2f} [{ci['ci_low']:.2f}, {ci['ci_high']:.2f}] ({ci['n']})"


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
                cells[(int(row["layer"]), row["method"], side)][s].append(float(row.get(s) or "nan"))
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
