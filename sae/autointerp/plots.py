"""The study's figure: mean score with its bootstrap 95% interval per layer, one line per method.

Rows of panels are the scorers (simulation, detection, fuzzing); columns are the explainer's own explanations
and the two controls (shuffled explanations, token lookup), so a score is always seen next to its controls.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLUMNS = (("", "explainer"), ("shuffled_", "control: shuffled explanations"), ("lookup_", "control: token lookup"))
ROWS = (("simulation", "simulation (Pearson r)"), ("detection", "detection (balanced acc.)"),
        ("fuzzing", "fuzzing (balanced acc.)"), ("embedding", "embedding (AUROC)"),
        ("intruder", "intruder (accuracy)"))
COLORS = {"dictionary": "black", "pca": "tab:blue", "ica": "tab:orange", "random": "tab:green", "neurons": "tab:red"}


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _chance(rows: Sequence[dict], score: str) -> float:
    """The panel's chance level, from the summary (intruder's is 1/k), else 0 for correlations and 0.5 otherwise."""
    return next((float(r["chance"]) for r in rows if _finite(r.get("chance"))), 0.0 if score == "simulation" else 0.5)


def plot_by_layer(summary: Sequence[dict], path: Path, title: str) -> None:
    """One panel per scorer x variant that has any finite value; x = layer, y = mean with 95% interval (over all
    scored features: the summary's density terciles are in the CSV)."""
    summary = [r for r in summary if r.get("tercile", "all") == "all"]
    have = {(r["score"]) for r in summary if _finite(r["mean"])}
    rows = [(name, label) for name, label in ROWS if any(p + name in have for p, _ in COLUMNS)] or [ROWS[0]]
    sites = {re.sub(r"[0-9]+", "*", r["hook"]) for r in summary}
    fig, axes = plt.subplots(len(rows), len(COLUMNS), figsize=(4.2 * len(COLUMNS), 3.0 * len(rows)),
                             squeeze=False, sharex=True, sharey="row")
    for i, (name, row_label) in enumerate(rows):
        for j, (prefix, col_label) in enumerate(COLUMNS):
            ax = axes[i][j]
            here = [r for r in summary if r["score"] == prefix + name]
            _panel(ax, here, len(sites) > 1)
            ax.set_title(f"{row_label}\n{col_label}", fontsize=8)
            ax.axhline(_chance(here, name), color="grey", linewidth=0.6, linestyle=":")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one layer: one tick
            if i == len(rows) - 1:
                ax.set_xlabel("layer")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(labels)), fontsize=8)
    height = 3.0 * len(rows)
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / height, va="top")
    fig.subplots_adjust(hspace=0.45, wspace=0.15, top=1 - 0.75 / height, bottom=0.75 / height)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _panel(ax, rows: Sequence[dict], several_sites: bool) -> None:
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        site = re.sub(r"[0-9]+", "*", r["hook"])
        lines[f"{r['method']} [{site}]" if several_sites else r["method"]].append(r)
    drawn = 0
    for k, (key, members) in enumerate(sorted(lines.items())):
        pts = sorted((r for r in members if _finite(r["mean"])), key=lambda r: r["layer"])
        if not pts:
            continue
        drawn += 1
        x = [r["layer"] + 0.06 * (k - (len(lines) - 1) / 2) for r in pts]  # small offsets keep intervals apart
        y = [r["mean"] for r in pts]
        err = [[m - r["ci_low"] for m, r in zip(y, pts)], [r["ci_high"] - m for m, r in zip(y, pts)]]
        method = key.split(" [")[0]
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2, linewidth=1, label=key,
                    color=COLORS.get(method.removesuffix("_topk")), linestyle="--" if method.endswith("_topk") else "-")
    if not drawn:
        ax.text(0.5, 0.5, "not scored", transform=ax.transAxes, ha="center", va="center", color="grey", fontsize=8)
