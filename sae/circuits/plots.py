"""The patching study's figure, one per hook (``plots/patching_<hook>.png``), after the paper's: the number of
patched features against the KL to the counterfactual, and the edit size against the same KL, one line per method
(solid: greedy pruning, dashed: attribution order). The unpatched KL and the target are drawn as horizontal lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sae.io.atomic import atomic_path  # noqa: E402

BASELINE_COLORS = {"pca": "tab:blue", "ica": "tab:orange", "random": "tab:green", "neurons": "tab:red"}
DICTIONARY_COLORS = ["black", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray"]
LINESTYLES = {"greedy": "-", "attribution": "--"}


def _num(value) -> float:
    return math.nan if value in (None, "") else float(value)


def _colors(methods: list[str]) -> dict[str, str]:
    dictionaries = [m for m in methods if m not in BASELINE_COLORS]
    out = {m: DICTIONARY_COLORS[i % len(DICTIONARY_COLORS)] for i, m in enumerate(dictionaries)}
    return {**out, **{m: c for m, c in BASELINE_COLORS.items() if m in methods}}


def safe_name(hook: str) -> str:
    """A hook name as a file name part (``layers.3.resid`` stays as it is; anything odd becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", hook)


def plot_patching(rows: Iterable[Mapping], path: Path, title: str, order: str = "all",
                  target_fraction: float = 0.5) -> None:
    """The two panels for the curves of one hook (``rows`` of ``curves.csv``, any types), pairs of ``order``."""
    rows = [r for r in rows if r["order"] == order]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = _colors(methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    curves = dict.fromkeys((r["method"], r["ordering"], r.get("ranking") or "") for r in rows)
    for (method, ordering, ranking) in curves:
        curve = sorted((r for r in rows if r["method"] == method and r["ordering"] == ordering
                        and (r.get("ranking") or "") == ranking), key=lambda r: _num(r["n_features"]))
        kl = [_num(r["kl"]) for r in curve]
        style = dict(color=colors[method], linestyle=LINESTYLES.get(ordering, ":"), marker=".", markersize=4,
                     label=f"{method} ({ordering}{', ' + ranking if ranking else ''})")
        left.plot([_num(r["n_features"]) for r in curve], kl, **style)
        edit = [_num(r["edit_per_changed_position"]) for r in curve]
        edits = [(e, k) for e, k in zip(edit, kl) if not math.isnan(e)]
        if edits:
            edits.sort()
            right.plot([e for e, _ in edits], [k for _, k in edits], **style)
    unpatched = {_num(r["unpatched_kl"]) for r in rows}
    for value in unpatched:
        for ax in (left, right):
            ax.axhline(value, color="gray", linewidth=0.8)
            ax.axhline(target_fraction * value, color="gray", linewidth=0.8, linestyle=":")
    left.set_xscale("symlog", linthresh=1.0)
    left.set_xlim(left=0)
    left.set_xlabel("features patched")
    right.set_xlabel("edit size: mean ||x' - x|| over the positions the patch changes")
    left.set_ylabel("KL(patched || counterfactual) at the final position")
    left.set_title("features needed", fontsize=9)
    right.set_title(f"edit size (grey: unpatched KL, dotted: {target_fraction:g} x it)", fontsize=9)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_patching_hooks(rows: Iterable[Mapping], directory: Path, title: str, order: str = "all",
                        target_fraction: float = 0.5) -> list[Path]:
    """One ``patching_<hook>.png`` per hook under ``directory``; the title should name the model (a stand-in is
    labelled as one) and the task."""
    rows = list(rows)
    paths = []
    for hook in dict.fromkeys(r["hook"] for r in rows):
        path = Path(directory) / f"patching_{safe_name(hook)}.png"
        plot_patching([r for r in rows if r["hook"] == hook], path, f"{title}; {hook}; {order} pairs", order,
                      target_fraction)
        paths.append(path)
    return paths
