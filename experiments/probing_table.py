"""Markdown tables of ``probing.csv`` (``evaluate.py ... analysis=probing``): per task, one row per hook, each
method's accuracy at the chosen ks with its 95% interval over split seeds.

    python experiments/probing_table.py <out>/probing.csv [--ks 1 5 dense]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

COLUMNS = ("accuracy", "ci_low", "ci_high")
ORDER = ["dictionary", "pca", "ica", "neurons", "random", "raw"]


def table(rows: list[dict], task: str, k: str) -> str:
    here = [r for r in rows if r["task"] == task and r["k"] == k]
    methods = sorted({r["method"] for r in here}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    hooks = sorted({r["hook"] for r in here}, key=lambda h: int(h.split(".")[1]))
    lines = [f"| {task}, k = {k} | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for hook in hooks:
        cells = []
        for m in methods:
            r = next((r for r in here if r["hook"] == hook and r["method"] == m), None)
            best = max(float(x["accuracy"]) for x in here if x["hook"] == hook)
            cell = "" if r is None else "{:.2f} [{:.2f}, {:.2f}]".format(*(float(r[c]) for c in COLUMNS))
            cells.append(f"**{cell}**" if r is not None and float(r["accuracy"]) == best else cell)
        lines.append(f"| {hook} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--ks", nargs="+", default=["1", "5", "dense"])
    args = parser.parse_args()
    rows = list(csv.DictReader(args.csv.open()))
    for task in dict.fromkeys(r["task"] for r in rows):
        for k in args.ks:
            print(table(rows, task, k) + "\n")


if __name__ == "__main__":
    main()
