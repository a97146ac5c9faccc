"""The probing figure: accuracy against k, one line per method, one panel per hook (a row of panels per task)."""

from __future__ import annotations

from pathlib import Path

from sae.evaluation.plots import COLORS, plt, save_figure
from sae.probing.probe import DENSE

MARKERS = {"dictionary": "*", "raw": "D"}


def _x(k, ks: list) -> int:
    return ks.index(k)


def plot_probing(rows: list[dict], path: Path, title: str) -> None:
    """Mean test accuracy over splits with its interval, against the probe's k (``dense`` last)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    hooks = sorted(dict.fromkeys(r["hook"] for r in rows), key=lambda h: (next(r["layer"] for r in rows
                                                                               if r["hook"] == h), h))
    ks = sorted({r["k"] for r in rows if r["k"] != DENSE}) + ([DENSE] if any(r["k"] == DENSE for r in rows) else [])
    fig, axes = plt.subplots(len(tasks), len(hooks), figsize=(3.0 * len(hooks), 2.6 * len(tasks)), squeeze=False,
                             sharex=True)
    for i, task in enumerate(tasks):
        for j, hook in enumerate(hooks):
            ax = axes[i, j]
            here = [r for r in rows if r["task"] == task and r["hook"] == hook]
            for method in dict.fromkeys(r["method"] for r in here):
                line = sorted((r for r in here if r["method"] == method), key=lambda r: _x(r["k"], ks))
                xs = [_x(r["k"], ks) for r in line]
                ys = [r["accuracy"] for r in line]
                err = [[r["accuracy"] - r["ci_low"] for r in line], [r["ci_high"] - r["accuracy"] for r in line]]
                base = "dictionary" if method.startswith("dictionary") else method
                ax.errorbar(xs, ys, yerr=err, label=method, color=COLORS.get(base, "tab:purple" if base == "raw"
                                                                             else None),
                            marker=MARKERS.get(base, "o"), markersize=4, linewidth=1, capsize=2)
            ax.set_xticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(hook, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{task}\ntest accuracy", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("k latents", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, bbox_to_anchor=(0.5, 0.0))
    save_figure(fig, path, title)
