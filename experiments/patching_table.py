"""The patching results' table, signed against magnitude ranking, from the ``patching/`` outputs of
``evaluate.py analysis=patching 'analysis.rankings=[signed,magnitude]'`` runs (one per hook, or one for several).

Per hook and method (all pairs): the fewest features reaching ``target_fraction`` x the unpatched KL on the signed and
the magnitude attribution curves and on the random-order control (a grid value), the same crossing interpolated
linearly in n between the two grid points around it (grids differ between methods), the minimum KL, and the edit
size ``edit_per_changed_position`` at the signed curve's fewest set. Prints a Markdown table.

    python experiments/patching_table.py $RUNS/ioi_mixed_1m/patching_l{0,1,2,3,4,5}
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.circuits.curves import read_rows  # noqa: E402

CURVES = (("attribution", "signed"), ("attribution", "magnitude"), ("random", ""))


def crossing(points: list[dict], target: float) -> float:
    """The n where the curve (sorted by n) first falls to ``target``, linear between grid points; NaN if never."""
    points = sorted(points, key=lambda r: int(r["n_features"]))
    for before, after in zip(points, points[1:]):
        k0, k1 = float(before["kl"]), float(after["kl"])
        if k1 <= target < k0:
            n0, n1 = int(before["n_features"]), int(after["n_features"])
            return n0 + (k0 - target) / (k0 - k1) * (n1 - n0)
    return 0.0 if points and float(points[0]["kl"]) <= target else math.nan


def cell(summary: dict | None, curve: list[dict], target: float) -> str:
    if summary is None:
        return "n/a"
    fewest = summary["fewest_features"] or "—"
    interpolated = crossing(curve, target)
    shown = "—" if math.isnan(interpolated) else f"{interpolated:.1f}"
    return f"{fewest} ({shown}) / {float(summary['min_kl']):.2f}"


def _lookup(summaries: list[dict], curves: list[dict], hook: str, method: str, ordering: str, ranking: str):
    key = (hook, method, ordering, ranking)
    row = next((r for r in summaries if (r["hook"], r["method"], r["ordering"], r["ranking"] or "") == key), None)
    curve = [r for r in curves if (r["hook"], r["method"], r["ordering"], r["ranking"] or "") == key]
    return row, curve


def by_hook(summaries: list[dict], curves: list[dict], methods: list[str], labels: list[str]) -> None:
    """One row per hook, one column per method: the signed curve's cell, and the magnitude curve's beside it where
    they differ; then the same layout for the random control."""
    hooks = sorted({r["hook"] for r in summaries}, key=lambda h: int(h.split(".")[1]))
    for title, ordering in (("attribution: signed [magnitude where it differs]", "attribution"),
                            ("random control", "random")):
        print(f"\n{title}\n\n| hook | {' | '.join(labels)} |\n|---|{'---|' * len(labels)}")
        for hook in hooks:
            cells = []
            for method in methods:
                at = lambda ranking: _lookup(summaries, curves, hook, method, ordering, ranking)  # noqa: E731
                row, curve = at("signed" if ordering == "attribution" else "")
                text = cell(row, curve, float(row["target_kl"]) if row else math.nan)
                if ordering == "attribution":
                    other_row, other_curve = at("magnitude")
                    other = cell(other_row, other_curve, float(other_row["target_kl"]) if other_row else math.nan)
                    text += "" if other == text else f" [{other.split(' / ')[0]}]"
                cells.append(text)
            print(f"| {hook} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outs", nargs="+", type=Path, help="evaluate.py out directories holding patching/")
    parser.add_argument("--order", default="all")
    parser.add_argument("--methods", nargs="*", help="by-hook layout: methods as columns, a dictionary's name with "
                        "{layer} for its layer (e.g. l{layer} l{layer}_k64 pca ica neurons random)")
    args = parser.parse_args()
    summaries, curves = [], []
    for out in args.outs:
        summaries += [r for r in read_rows(out / "patching" / "summary.csv") if r["order"] == args.order]
        curves += [r for r in read_rows(out / "patching" / "curves.csv") if r["order"] == args.order]
    if args.methods:
        for r in summaries + curves:  # a dictionary's name with its layer replaced, so one column holds every layer
            layer = r["hook"].split(".")[1]
            for m in args.methods:
                if "{layer}" in m and r["method"] == m.format(layer=layer):
                    r["method"] = m
        by_hook(summaries, curves, args.methods, args.methods)
        return
    print("| hook | method | signed: fewest (interp.) / min KL | magnitude | random control | edit at signed fewest |")
    print("|---|---|---|---|---|---|")
    keys = dict.fromkeys((r["hook"], r["method"]) for r in summaries)
    for hook, method in sorted(keys, key=lambda k: (int(k[0].split(".")[1]), k[1])):
        cells, edit = [], "—"
        for ordering, ranking in CURVES:
            row = next((r for r in summaries if (r["hook"], r["method"], r["ordering"], r["ranking"] or "")
                        == (hook, method, ordering, ranking)), None)
            curve = [r for r in curves if (r["hook"], r["method"], r["ordering"], r["ranking"] or "")
                     == (hook, method, ordering, ranking)]
            cells.append(cell(row, curve, float(row["target_kl"]) if row else math.nan))
            if ranking == "signed" and row and row["edit_per_changed_position_at_fewest"]:
                edit = f"{float(row['edit_per_changed_position_at_fewest']):.2f}"
        print(f"| {hook} | {method} | {' | '.join(cells)} | {edit} |")


if __name__ == "__main__":
    main()
