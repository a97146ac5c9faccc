"""Markdown tables of an automatic-interpretation study's summary (``autointerp_summary.csv``), for the results pages.

One row per (layer, method), one column per score: the mean over the scored features and its bootstrap 95% interval,
then how many features were sampled, how many could not be scored (too few active fragments) and, per score, how
many were undefined (e.g. a correlation over fragments where the feature never fires).

    python experiments/autointerp_table.py <out>/autointerp_summary.csv \
        --scores simulation shuffled_simulation detection_auroc shuffled_detection_auroc
    python experiments/autointerp_table.py <summary> --terciles --scores simulation   # by density tercile
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

DEFAULT_SCORES = ("simulation", "shuffled_simulation", "detection_auroc", "shuffled_detection_auroc",
                  "fuzzing_auroc", "shuffled_fuzzing_auroc", "embedding", "shuffled_embedding")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cell(row: dict | None) -> str:
    """``mean [low, high]`` (``n`` scored, ``u`` undefined when any), or a dash."""
    if row is None or row["mean"] in ("", "nan"):
        return "–"
    text = f"{float(row['mean']):.2f} [{float(row['ci_low']):.2f}, {float(row['ci_high']):.2f}]"
    undefined = int(float(row["n_undefined"] or 0))
    return text + (f" ({undefined} undef.)" if undefined else "")


def table(rows: list[dict], scores: list[str], tercile: str = "all") -> str:
    by = defaultdict(dict)
    for r in rows:
        if r["tercile"] == tercile:
            by[(int(r["layer"]), r["method"])][r["score"]] = r
    present = [s for s in scores if any(s in v for v in by.values())]
    head = ["layer", "method", "sampled (unscorable)", *present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (layer, method), got in sorted(by.items()):
        any_row = next(iter(got.values()))
        sampled = f"{any_row['n_features']} ({any_row['n_unscorable']})"
        lines.append("| " + " | ".join([str(layer), method, sampled, *(cell(got.get(s)) for s in present)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="an autointerp_summary.csv")
    parser.add_argument("--scores", nargs="+", default=list(DEFAULT_SCORES))
    parser.add_argument("--terciles", action="store_true", help="one table per density tercile (low, mid, high)")
    args = parser.parse_args(argv)
    if not args.summary.is_file():
        raise SystemExit(f"{args.summary} does not exist: give the autointerp_summary.csv an analysis=autointerp "
                         "run wrote")
    rows = read(args.summary)
    for tercile in ("low", "mid", "high") if args.terciles else ("all",):
        if args.terciles:
            print(f"\n**Density tercile: {tercile}**\n")
        print(table(rows, args.scores, tercile))


if __name__ == "__main__":
    main()
