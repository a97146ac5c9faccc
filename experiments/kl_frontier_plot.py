"""The Pareto plot of ``kl_spliced`` against L0, one series per dictionary variant, from an ``evaluate.py`` table.

``evaluate.py``'s own plots draw FVU against L0 per layer and the CE increase per training objective; the SAELens
page's figure is the KL of the spliced model against L0 for every variant at one hook, which this draws from the
``eval.csv`` of evaluations of the same held-out tokens. A row's series is its name up to
the first ``-k``/``-l0``/``-c`` field (``topk-k8-mse`` -> ``topk``), or the ``--series`` mapping's value for the
name's first matching prefix; each series is drawn as points joined in L0 order, its Pareto front (the points no
other point of the series beats on both axes) bold.

    PYTHONPATH=$PWD python experiments/kl_frontier_plot.py <run>/eval/eval.csv \\
        --out docs/layer3_kl_frontier.png \\
        --title "layer 3, neox-owt-14m (stand-in)"
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SERIES = re.compile(r"^(.*?)(?:-(?:k|l0|c|lr)[\d.e-]+.*)?$")


def series_of(name: str, mapping: dict[str, str]) -> str:
    """The series a row belongs to: the first ``mapping`` prefix the name starts with, else its variant prefix."""
    base = name.split("/")[-1]
    for prefix, label in mapping.items():
        if name.startswith(prefix) or base.startswith(prefix):
            return label
    return SERIES.match(base)[1]


def read_rows(path: Path) -> list[dict]:
    """The dictionaries' rows of ``eval.csv`` (baselines are left out) with L0 and kl_spliced as numbers."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "dictionary"]
    if not rows:
        raise SystemExit(f"{path}: no dictionary rows")
    return [{**r, "l0": float(r["l0"]), "kl_spliced": float(r["kl_spliced"])} for r in rows]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both L0 and KL (lower is better on both), in L0 order."""
    front, best = [], float("inf")
    for l0, kl in sorted(points):
        if kl < best:
            front.append((l0, kl))
            best = kl
    return front


def plot(rows: list[dict], out: Path, title: str, mapping: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    from sae.evaluation.plots import save_figure  # evaluate.py's figure writer (Agg backend, tight layout)

    by_series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by_series.setdefault(series_of(r["name"], mapping), []).append((r["l0"], r["kl_spliced"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 colours: the layer-3 plot has more series than the default 10
    for label, points in sorted(by_series.items()):
        points = sorted(points)
        line = ax.plot(*zip(*points), "o", alpha=0.45)[0]
        ax.plot(*zip(*pareto(points)), "-o", color=line.get_color(), label=label, linewidth=2)
    ax.set_xlabel("L0 (active codes per token, held-out)")
    ax.set_ylabel("kl_spliced (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_figure(fig, out, title)
    print(f"wrote {out} ({len(rows)} dictionaries, {len(by_series)} series)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "eval_csv", type=Path, nargs="+", help="one or more eval.csv (evaluations of the same held-out tokens)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="kl_spliced against L0")
    parser.add_argument("--series", nargs="*", default=[], metavar="PREFIX=LABEL",
                        help="name prefixes and the series they belong to (first match wins)")
    args = parser.parse_args()
    mapping = dict(item.split("=", 1) for item in args.series)
    plot([row for path in args.eval_csv for row in read_rows(path)], args.out, args.title, mapping)


if __name__ == "__main__":
    main()
